"""Concept quality as in the method, over precomputed, L2-normalised embeddings (pure functions).

* Visual: each of a latent's top images, non-active patches blurred, against *every* candidate
  concept text; softmax of ``scale · cosine`` over the candidates; the score of an image is the
  probability of the latent's own concept. Per latent: mean and variance over its images, plus the
  raw cosine and the rank of its own concept (1 = best) for people who distrust softmaxes.
* Textual: cosine of the concept with the ±``window`` tokens around each top text's peak; mean.
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


def textual_scores(window_emb: np.ndarray, concept_emb: np.ndarray) -> np.ndarray:
    """Cosine of each window with its concept (rows paired)."""
    return (window_emb * concept_emb).sum(axis=1)


def concepts_agree(visual: str | None, textual: str | None, cosine: float | None, threshold: float) -> bool:
    """Same concept: equal after normalisation, one's words inside the other's, or embeddings close."""
    if not visual or not textual:
        return False
    v, t = normalise_concept(visual), normalise_concept(textual)
    if v == t or set(t.split()) <= set(v.split()) or set(v.split()) <= set(t.split()):
        return True
    return cosine is not None and cosine >= threshold


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


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
