"""One concept from several short answers, by a rule fixed before any evaluation numbers existed.

The per-image mode of the transformers explainer asks a small VLM one question per top image
("what is shown ?") and gets up to ``explainer.examples`` (5) short descriptions such as
"small red circle". The concept of the latent is what most of those descriptions share. The same
rule names the textual concept from the top texts' peak words (the small VLM cannot read marked
text, so the words are combined, not asked about).

Rule (:func:`combine_answers`), for the answers ``a_1 … a_n`` of one latent in rank order:

1. **Words.** Each answer is lower-cased and split into words and punctuation runs with
   ``\\w+|[^\\w\\s]+`` (the split of msae's word-level tokenizer); the answer position's name
   ``<answer position>`` (:mod:`msae.latents.answer_position`) is one word.
2. **Candidates.** Every contiguous n-gram of ``n = 1 … max_ngram`` (3) words made of content words
   only: a stop word (``explainer.transformers.stop_words`` for visual answers: function words
   such as "a", "and", "of", "the", "is"; ``textual_stop_words`` for peak words, empty by default)
   or a punctuation run (no letter or digit) breaks the answer into runs and no candidate spans
   it. An answer's n-gram is counted once however often it appears in that answer.
3. **Support** of a candidate: the number of answers that contain it.
4. **Qualifying**: support ≥ ``required = min(min_support, ceil(min_support_fraction · n))``;
   with the defaults (3, 0.6): 3 of 5, 3 of 4, 2 of 3, 2 of 2, 1 of 1.
5. **Choice** among the qualifying: the highest support; ties → the longer n-gram; then the one
   whose first occurrence is earliest (the best-ranked answer, then the earliest word in it);
   then the lexicographically smallest. The concept is its words joined by single spaces.
   Every qualifying n-gram is kept in that order (:attr:`Combined.qualifying`): the explainer
   reports them as the answer's candidates, among which ``scores.select_by_detection`` may choose.
6. **None qualifies** → no concept: the stage records it as the parser's ``no_concept`` status
   with ``concept`` None ("No visual concept" / "No textual concept").

Why content-only n-grams, stricter than dropping the n-grams made *only* of function words: with
that looser rule, answers "a small red circle" tie "a small red" with "small red circle" (same
support and length) and the earlier one wins; answers "red circle and blue square" give
"red circle and". Requiring every word to be a content word keeps the concept a noun phrase
("red circle") without a tie-break that depends on articles.

Why the textual stop list is empty: the ground truth counts a latent that fires on "the" as a
textual latent (msae.score.ground_truth), so function words must stay nameable as textual
concepts; punctuation never is one, there or here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from msae.latents.answer_position import ANSWER_POSITION

RULE_VERSION = 3
"""Bump when the rule's code changes (it enters the explainer version, so answers are recomputed).
2: the qualifying n-grams are recorded as the answer's candidates (the choice is unchanged).
3: the answer position's name is one word."""

_WORDS = re.compile(re.escape(ANSWER_POSITION) + r"|\w+|[^\w\s]+")

DEFAULT_STOP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "and", "or", "of", "is", "are", "was", "be", "with", "without", "in", "on", "at",
    "to", "by", "for", "from", "as", "it", "its", "this", "that", "these", "those", "there", "some",
)
"""Function words that never make a visual concept (punctuation is always excluded)."""


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation runs of an answer."""
    return _WORDS.findall(text.lower())


def is_punctuation(word: str) -> bool:
    return not any(ch.isalnum() for ch in word)


def content_ngrams(text: str, stop_words: Iterable[str], max_ngram: int) -> list[tuple[str, ...]]:
    """The answer's candidate n-grams (n = 1..max_ngram, content words only), in order of first
    occurrence (by start position, shorter first), each once."""
    stop = set(stop_words)
    toks = words(text)
    keep = [not (is_punctuation(w) or w in stop) for w in toks]
    seen: dict[tuple[str, ...], None] = {}
    for start in range(len(toks)):
        for n in range(1, max_ngram + 1):
            end = start + n
            if end > len(toks) or not all(keep[start:end]):
                break
            seen.setdefault(tuple(toks[start:end]), None)
    return list(seen)


def required_support(n_answers: int, min_support: int, min_fraction: float) -> int:
    """Answers a candidate must appear in: min(min_support, ceil(min_fraction · n)), at least 1."""
    # the small epsilon keeps 0.6 * 5 = 3.0000000000000004-style float noise from rounding up
    return max(1, min(min_support, math.ceil(min_fraction * n_answers - 1e-9)))


@dataclass(frozen=True)
class Combined:
    """The outcome of the rule for one latent."""

    concept: str | None
    """The chosen n-gram, or None when no candidate qualifies."""
    support: int
    """Answers containing the chosen n-gram (0 when none)."""
    required: int
    n: int
    """Number of answers combined."""
    qualifying: tuple[str, ...] = ()
    """Every qualifying n-gram, in the rule's order of preference (the concept first)."""


@dataclass(frozen=True)
class CombineRule:
    """The rule's parameters (see the module doc); :meth:`params` goes into explainer versions."""

    stop_words: tuple[str, ...] = DEFAULT_STOP_WORDS
    min_support: int = 3
    min_fraction: float = 0.6
    max_ngram: int = 3

    def params(self) -> dict:
        return {"rule_version": RULE_VERSION, "stop_words": sorted(set(self.stop_words)),
                "min_support": self.min_support, "min_fraction": self.min_fraction, "max_ngram": self.max_ngram}

    def __call__(self, answers: Sequence[str]) -> Combined:
        return combine_answers(answers, self)


def combine_answers(answers: Sequence[str], rule: CombineRule = CombineRule()) -> Combined:
    """The concept the answers share, by the rule in the module doc (pure and deterministic)."""
    n = len(answers)
    required = required_support(n, rule.min_support, rule.min_fraction)
    support: dict[tuple[str, ...], int] = {}
    first: dict[tuple[str, ...], tuple[int, int]] = {}
    for a, text in enumerate(answers):
        for rank, gram in enumerate(content_ngrams(text, rule.stop_words, rule.max_ngram)):
            support[gram] = support.get(gram, 0) + 1
            first.setdefault(gram, (a, rank))
    qualifying = [g for g, s in support.items() if s >= required]
    if not n or not qualifying:
        return Combined(None, 0, required, n)
    ranked = sorted(qualifying, key=lambda g: (-support[g], -len(g), first[g], g))
    best = ranked[0]
    return Combined(" ".join(best), support[best], required, n, tuple(" ".join(g) for g in ranked))
