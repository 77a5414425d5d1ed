"""Concept quality over precomputed, L2-normalised embeddings (pure functions).

Both scores are *contrastive*: a concept counts only as far as it tells the latent's own examples
from random ones, so a concept true of every example ("background", "the") sits at chance.

* Visual: the AUROC of ``cos(view, concept)`` over the latent's top views (non-active patches
  blurred) against control views — random dataset images with the latent's own patch masks
  transplanted and blurred the same way, so that only the image content differs. Also kept, for
  comparison: the old softmax of ``scale · cosine`` over all candidate concepts (which splits
  probability between co-true attributes such as a colour and a shape), the raw cosine and the
  rank of the latent's concept among the candidates.
* Textual: the AUROC of ``cos(window, concept)`` over the ±``window`` tokens around each top text's
  peak against windows around random tokens of other samples; the old absolute cosine is kept.
* Random baselines: the same AUROC with random stand-ins in place of the latent's top examples
  (for images, one control per mask, so the masks are still the latent's): it sits at 0.5 by
  construction, and its spread over draws shows how far chance alone moves a score.
* Embedding detection (offline stand-in for an LLM judge): does cos(concept, example) separate the
  latent's own top examples from other latents' top examples? AUROC per latent.
"""

from __future__ import annotations

import re

import numpy as np


def normalise_concept(text: str) -> str:
    """Case, whitespace and trailing punctuation do not make two concepts different."""
    return re.sub(r"\s+", " ", text.strip().strip(".\"'").lower())


def candidate_concepts(*concept_lists: list[str | None]) -> list[str]:
    """Unique normalised concepts (kept answers only), in first-seen order: the softmax's classes."""
    seen: dict[str, None] = {}
    for concepts in concept_lists:
        for c in concepts:
            if c:
                seen.setdefault(normalise_concept(c), None)
    return list(seen)


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def visual_image_scores(image_emb: np.ndarray, own: np.ndarray, concept_emb: np.ndarray,
                        scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: (probability of its own concept, cosine with it, rank of it among the candidates).

    ``own[i]`` is the candidate index of image i's latent's concept.
    """
    cos = image_emb @ concept_emb.T
    prob = softmax_rows(scale * cos)
    rows = np.arange(len(own))
    own_cos = cos[rows, own]
    rank = 1 + (cos > own_cos[:, None]).sum(axis=1)
    return prob[rows, own], own_cos, rank


def concepts_agree(visual: str | None, textual: str | None, cosine: float | None, threshold: float) -> bool:
    """Same concept: equal after normalisation, one's words inside the other's, or embeddings close."""
    if not visual or not textual:
        return False
    v, t = normalise_concept(visual), normalise_concept(textual)
    if v == t or set(t.split()) <= set(v.split()) or set(v.split()) <= set(t.split()):
        return True
    return cosine is not None and cosine >= threshold


def beaten_shares(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Per positive, the share of negatives it beats (ties half); their mean is the AUROC."""
    if len(negative) == 0:
        return np.full(len(positive), np.nan)
    diff = np.asarray(positive, np.float64)[:, None] - np.asarray(negative, np.float64)[None, :]
    return (diff > 0).mean(axis=1) + 0.5 * (diff == 0).mean(axis=1)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    return float(beaten_shares(positive, negative).mean())


def auroc_rows(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of ``positive[d]`` [D, n] against ``negative[d]`` [D, m] (one value per draw)."""
    if positive.shape[1] == 0 or negative.shape[1] == 0:
        return np.full(len(positive), np.nan)
    diff = np.asarray(positive, np.float64)[:, :, None] - np.asarray(negative, np.float64)[:, None, :]
    return (diff > 0).mean(axis=(1, 2)) + 0.5 * (diff == 0).mean(axis=(1, 2))


def contrastive_score(own: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """(AUROC of the own examples' similarities vs the controls', its variance over own examples).

    The variance is that of each own example's beaten share, whose mean is the AUROC.
    """
    if len(own) == 0 or len(controls) == 0:
        return float("nan"), float("nan")
    shares = beaten_shares(own, controls)
    return float(shares.mean()), float(shares.var())


def baseline_score(stand_ins: np.ndarray, controls: np.ndarray) -> float:
    """Mean over draws of the AUROC of random stand-ins [D, n] vs controls [D, m]: chance is 0.5."""
    if stand_ins.size == 0 or controls.size == 0:
        return float("nan")
    return float(auroc_rows(stand_ins, controls).mean())


# --- control and baseline draws (indices only, so both prompting modes share them) -------------
def draw_controls(eligible: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of the eligible items: without replacement when there are enough, else with."""
    if len(eligible) == 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(eligible, size=n, replace=len(eligible) < n).astype(np.int64)


def draw_excluding(n_pool: int, exclude: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices of ``range(n_pool)`` outside ``exclude``, distinct when enough remain.

    A large pool is never enumerated: ``n + len(exclude)`` distinct draws, the excluded dropped.
    """
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    if n <= 0 or n_pool - len(exclude) <= 0:
        return np.zeros(0, dtype=np.int64)
    if n_pool <= 4 * (n + len(exclude)):
        return draw_controls(np.setdiff1d(np.arange(n_pool), exclude), n, rng)
    picks = rng.choice(n_pool, size=n + len(exclude), replace=False)
    return picks[~np.isin(picks, exclude)][:n].astype(np.int64)


def mask_balanced_split(groups: np.ndarray, draws: int,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Visual random baseline: per draw, one control of each mask group stands in for the top images.

    ``groups[j]`` is the top image whose mask control j carries. Returns indices into the controls:
    the stand-ins [draws, groups present] and the remaining controls [draws, K - groups present],
    which serve as that draw's controls. No new images are embedded.
    """
    present = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in present]
    everything = np.arange(len(groups))
    pos = np.array([[rng.choice(m) for m in members] for _ in range(draws)], dtype=np.int64)
    pos = pos.reshape(draws, len(present))
    neg = np.array([np.setdiff1d(everything, p) for p in pos], dtype=np.int64).reshape(draws, -1)
    return pos, neg


def stand_in_draws(eligible: np.ndarray, n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
    """Textual random baseline: per draw, ``n`` eligible items (distinct within a draw when possible)."""
    if len(eligible) == 0 or n <= 0:
        return np.zeros((draws, 0), dtype=np.int64)
    return np.stack([rng.choice(eligible, size=n, replace=len(eligible) < n) for _ in range(draws)]).astype(np.int64)


def window_baseline_draws(eligible: np.ndarray, controls: np.ndarray, n: int, draws: int,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Textual random baseline: per draw, ``n`` random windows stand in for the top windows.

    Stand-ins come from the eligible windows outside the controls, scored against all controls;
    when fewer than ``n`` are left (a small pool), from the controls, scored against the others.
    Returns (stand-ins [draws, n], controls [draws, m]); both empty when neither is possible.
    """
    others = np.setdiff1d(eligible, controls)
    if n > 0 and len(others) >= n:
        return stand_in_draws(others, n, draws, rng), np.tile(np.asarray(controls, np.int64), (draws, 1))
    if n <= 0 or len(controls) <= n:
        return np.zeros((draws, 0), dtype=np.int64), np.zeros((draws, 0), dtype=np.int64)
    perms = np.stack([rng.permutation(controls) for _ in range(draws)]).astype(np.int64)
    return perms[:, :n], perms[:, n:]


# --- Network Dissection categories, by lexicon ----------------------------------------------------
_CATEGORY_WORDS = {
    "color": "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet teal "
             "beige gold silver maroon navy turquoise colorful colourful dark bright",
    "texture": "striped stripes dotted polka checkered grid mesh mesh-like woven knitted fuzzy furry smooth rough "
               "wavy zigzag spotted patterned pattern lattice honeycomb bumpy grainy scaly textured",
    "material": "wood wooden metal metallic glass plastic fabric cloth leather stone brick concrete paper "
                "ceramic marble rubber water grass sand snow",
    "scene": "background sky street road beach kitchen bedroom room indoor outdoor city forest field ocean sea "
             "mountain park office landscape scene",
    "part": "wheel wheels leg legs eye eyes face hand hands handle wing wings tail head window windows door edge "
            "edges corner corners roof ear ears nose mouth",
}
CATEGORIES = ("scene", "object", "part", "material", "texture", "color")


def concept_category(concept: str | None) -> str | None:
    """scene / object / part / material / texture / color (Bau et al. 2017) from the concept's words.

    The head (last) word decides first ("red circle" is an object, "red" a colour); a concept made
    only of colour words is a colour; anything unrecognised is an object. A lexicon is crude but
    deterministic and auditable; an LLM-judged label would be the upgrade.
    """
    if not concept:
        return None
    words = normalise_concept(concept).replace("-", " ").split()
    lookup = {w: cat for cat, ws in _CATEGORY_WORDS.items() for w in ws.split()}
    head = lookup.get(words[-1])
    if head is not None and head != "color":
        return head
    if all(lookup.get(w) == "color" for w in words):
        return "color"
    return "object"
