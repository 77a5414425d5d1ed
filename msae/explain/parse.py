"""Turn an explainer's free-text answer into a concept, and collapse concepts for scoring.

Parsing rules (:func:`parse_concept`):

- The concept is what follows the first ``Concept:`` (case-insensitive, markdown such as
  ``**Concept:**`` allowed) anywhere in the answer; chatter before it is ignored. If nothing
  follows on that line, the next non-empty line is used. A template echo (``<concept>``) is
  skipped in favour of a later ``Concept:``.
- The value is cleaned: markdown emphasis, surrounding quotes/brackets and trailing punctuation
  are removed, whitespace collapsed, and a trailing explanation after a sentence break
  ("red circles. They appear …") is cut off.
- "No visual concept", "No textual concept", "none", "n/a", "no clear/common … concept" and the
  like give ``no_concept`` - whatever the request's kind, since an explainer that says "no
  textual concept" to a visual prompt still declines.
- **Without a ``Concept:`` marker the answer is ``unparsed``, even if it is one short line.**
  Why strict: the prompts demand the format, the method parses after ``Concept:``, and accepting
  bare lines would turn refusals and chatter ("I cannot tell.", "Sure!") into concepts that
  then enter the softmax over candidates. The one exception is a line that starts with a
  no-concept phrase ("No visual concept.", "None"), which is unambiguous. ``raw`` is always kept, so
  unparsed answers can be audited or re-parsed later.
- A concept longer than ``max_chars`` is ``too_long`` (the method drops such concepts).

Duplicates (:func:`filter_duplicates`, :func:`unique_concepts`): the visual score is a softmax
over *all* kept concept texts, so two latents with the same concept must not appear as two
competing candidates (each would get at most half the probability). We therefore collapse
duplicate concept *texts* into one candidate (:func:`unique_concepts`) but keep every latent's
answer (:func:`filter_duplicates` only drops unusable answers and repeated answers for the same
latent): both latents are scored against the shared candidate. Dropping the latents themselves
would bias the scores toward rare concepts and lose latents that are genuinely redundant.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from msae.explain.base import ConceptKind, ExplainAnswer

STATUSES = ("ok", "no_concept", "too_long", "unparsed", "error")

_MARKER = re.compile(r"\bconcept\b[ \t*_`\"']*:[ \t]*(.*)", re.IGNORECASE)
_EMPHASIS = re.compile(r"(\*\*|__|\*|`)")
_QUOTES = "\"'“”‘’«»`"
_BRACKETS = {"<": ">", "[": "]", "(": ")", "{": "}"}
_SENTENCE_BREAK = re.compile(r"(?<=[a-z0-9)\]])[.!;]\s+(?=[A-Z])")
_NO_CONCEPT = re.compile(
    r"^(?:none|n/?a|nothing|no answer|"
    r"no(?:\s+(?:clear|common|shared|meaningful|single|specific|obvious|consistent|discernible|identifiable))*"
    r"(?:\s+(?:visual|textual|text|image))?\s+(?:concepts?|patterns?)"
    r")\b.*$",
    re.IGNORECASE,
)
_PLACEHOLDERS = {"concept", "<concept>", "your concept", "the concept"}


def normalise_concept(concept: str) -> str:
    """The comparison key of a concept: lower-case, whitespace collapsed, outer punctuation off."""
    text = " ".join(concept.split()).lower()
    return text.strip(" .,;:!?" + _QUOTES)


def _clean(value: str) -> str:
    value = _EMPHASIS.sub("", value)
    value = " ".join(value.split())
    m = _SENTENCE_BREAK.search(value)
    if m:
        value = value[: m.start()]
    changed = True
    while changed and value:
        changed = False
        stripped = value.strip().rstrip(".,;:!").strip()
        if stripped != value:
            value, changed = stripped, True
        if len(value) >= 2 and value[0] in _QUOTES and value[-1] in _QUOTES:
            value, changed = value[1:-1], True
        elif len(value) >= 2 and _BRACKETS.get(value[0]) == value[-1]:
            value, changed = value[1:-1], True
    return value


def is_no_concept(text: str) -> bool:
    """Whether a (cleaned) answer declines to name a concept."""
    return bool(_NO_CONCEPT.match(normalise_concept(_clean(text))))


def parse_concept(raw: str, kind: ConceptKind, max_chars: int) -> tuple[str | None, str]:
    """``(concept, status)`` from an explainer's raw answer; see the module doc for the rules.

    ``kind`` is accepted so callers need not special-case; a no-concept phrase of either kind
    counts as declining.
    """
    del kind  # any kind's "No … concept" declines (see module doc)
    if not raw or not raw.strip():
        return None, "unparsed"
    lines = raw.replace("\r\n", "\n").split("\n")
    for i, line in enumerate(lines):
        for m in _MARKER.finditer(line):
            value = m.group(1)
            if not _clean(value):
                # "Concept:" alone on its line: take the next non-empty line
                value = next((ln for ln in lines[i + 1:] if _clean(ln)), "")
            concept = _clean(value)
            if not concept or concept.lower() in _PLACEHOLDERS:
                continue
            if is_no_concept(concept):
                return None, "no_concept"
            if len(concept) > max_chars:
                return None, "too_long"
            return concept, "ok"
    if any(is_no_concept(ln) for ln in lines if _clean(ln)):
        return None, "no_concept"
    return None, "unparsed"


def filter_duplicates(answers: Iterable[ExplainAnswer]) -> list[ExplainAnswer]:
    """The answers that enter scoring: status ok, one per (latent, kind, prompting), in order.

    Latents sharing a concept are all kept (see the module doc); only a repeated answer for the
    *same* latent/kind/prompting is dropped (the first wins), e.g. after merging two runs.
    """
    seen: set[tuple[int, str, str]] = set()
    out: list[ExplainAnswer] = []
    for a in answers:
        key = (a.latent, a.kind, a.prompting)
        if a.status != "ok" or a.concept is None or key in seen:
            continue
        seen.add(key)
        out.append(a)
    return out


def _one_group(answers: Sequence[ExplainAnswer]) -> None:
    groups = {(a.kind, a.prompting) for a in answers}
    if len(groups) > 1:
        raise ValueError(f"answers mix kinds/promptings {sorted(groups)}; score each group separately")


def unique_concepts(answers: Iterable[ExplainAnswer]) -> list[str]:
    """Candidate concept texts for the softmax: one per distinct normalised concept, first seen wins.

    All answers must share one kind and prompting (each group has its own candidate set). Map a
    latent to its candidate with ``concept_index(candidates)[normalise_concept(answer.concept)]``.
    """
    kept = filter_duplicates(answers)
    _one_group(kept)
    out: dict[str, str] = {}
    for a in kept:
        out.setdefault(normalise_concept(a.concept or ""), a.concept or "")
    return list(out.values())


def concept_index(candidates: Sequence[str]) -> dict[str, int]:
    """Normalised concept -> position in the candidate list from :func:`unique_concepts`."""
    return {normalise_concept(c): i for i, c in enumerate(candidates)}


def shared_concepts(answers: Iterable[ExplainAnswer]) -> dict[str, list[int]]:
    """Normalised concepts proposed for more than one latent -> those latents (for reports)."""
    kept = filter_duplicates(answers)
    _one_group(kept)
    by: dict[str, list[int]] = {}
    for a in kept:
        by.setdefault(normalise_concept(a.concept or ""), []).append(a.latent)
    return {k: v for k, v in by.items() if len(v) > 1}
