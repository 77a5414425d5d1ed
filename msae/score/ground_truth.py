"""Ground-truth modality labels on an annotated world, from annotations and activations only.

The paper has no ground truth for its visual / textual / multimodal labels; the synthetic shapes
world does. Nothing here looks at an explainer's answer or an embedder: a latent's label follows
from how its activation relates to annotated sets of tokens.

Populations and concepts
* Visual: every base-grid patch of every annotated sample, except the *partial* ones — patches an
  object covers, but by less than ``MIN_COVERAGE`` (a quarter). Such a patch is neither its object
  (the mask leaves it out) nor background (it shows part of an object), and the residual stream of
  a patch beside an object carries that object, so as a negative it cuts the precision of a
  genuine "purple cross" latent to about 0.6. ``benchmarks/bench_gt_partial.py`` compares the
  census and the pipeline's macro-F1 with partial patches left out and kept as background
  (``benchmarks/RESULTS.md``, "Ground truth: partial patches").
  Concepts are those of the dissection
  explainer (:class:`msae.explain.dissection.AnnotationGrids`): each colour, shape and size value,
  each "colour shape" pair present in the world, and "background".
* Textual: every non-template text token, plus each sample's *answer position* — the token right
  before the answer (the ":" of "assistant :", the generation prompt's last token; template or
  special). That position is where a VLM computes its answer, so latents specialise on it; it
  becomes the concept :data:`ANSWER_POSITION` instead of being lumped with punctuation or dropped
  with the template. Every other token is the word it shows (display form, stripped, lower-cased).
  Words: the concept vocabulary (every word of a visual concept name) plus every other word with a
  letter or digit that occurs at least ``min_positive`` times. Function words such as "the" are
  kept on purpose: a latent that fires exactly on "the" is a textual latent. Punctuation-only
  tokens are never a concept (they stay in the population as negatives).
* A concept is measured only when it has at least ``min_positive`` positive and ``min_positive``
  negative tokens; otherwise its AUROC and precision are NaN and it cannot be grounded.

Evidence per latent × concept, in each modality
* AUROC of the activation separating the concept's tokens from the rest (ties — the many tokens
  where a TopK latent is 0 — count half). It rewards *coverage*: firing on every red patch.
* Precision over the latent's *strong* tokens: those where its activation ≥ ``strong_fraction`` ×
  its largest activation in that modality (and > 0); precision = share of them showing the concept.
  It rewards *selectivity*: a latent firing only on some red circles (low AUROC for "red circle"'s
  coverage) still has precision 1 there.

Label rule (:class:`GroundingRule`, :func:`label_latents`)
* A concept is grounded for a latent when AUROC ≥ ``auroc`` (0.9), or when precision ≥
  ``precision`` (0.8) with at least ``min_firing`` strong tokens in that modality and a lift
  (precision / the concept's share of the population) of at least ``min_lift``. The lift guard
  exists because precision alone is a base rate for frequent concepts: background covers most
  patches, so *any* latent's strong patches, even a random one's, are mostly background; a genuine
  background latent is grounded by its AUROC instead.
* Named concept per modality: when some concept is precision-grounded, the most specific one (the
  most words: "red circle" when it keeps the precision, else "red"; then higher precision, then
  name order); otherwise the AUROC-grounded one with the highest AUROC, the simplest among those
  within ``tolerance`` (0.01) of it winning ("red" over "red circle", as the explainer names one
  attribute). Not grounded: the concept is null, the AUROC / precision columns still hold the
  best values, so near misses stay visible.
* ``multimodal`` when the *same* concept is grounded in both modalities: a word that is itself a
  visual concept name ("red" on patches and the word "red"). A "colour shape" pair agrees with one
  of its words only through that word: the pair's single-word parent must be grounded visually too.
  The shared concept is reported as the textual concept; the visual concept stays the named one
  when it is that word or contains it, else it becomes the shared word.
  Grounded in both without a shared concept → ``mixed``; only one → ``visual`` / ``textual``;
  neither, or a latent that never fires → ``none``.

The same evidence is relabelled at several AUROC thresholds (:func:`census_by_auroc`) so that the
report can show how the ground-truth census depends on that choice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.explain.dissection import ATTRIBUTES, BACKGROUND, AnnotationGrids
from msae.latents.answer_position import ANSWER_POSITION, answer_position_rows

MODALITIES = ("visual", "textual", "multimodal", "mixed", "none")
SIMPLER_WITHIN = 0.01
"""Concepts this close to the best AUROC count as tied; the simplest of them is reported."""
ANNOTATIONS = ("world", "annotations.parquet")

GT_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32, "gt_modality": pl.Utf8,
    "gt_visual_concept": pl.Utf8, "gt_visual_auroc": pl.Float64, "gt_visual_precision": pl.Float64,
    "gt_visual_strong": pl.Int64, "gt_visual_rule": pl.Utf8,
    "gt_visual_second": pl.Utf8, "gt_visual_second_auroc": pl.Float64,
    "gt_textual_concept": pl.Utf8, "gt_textual_auroc": pl.Float64, "gt_textual_precision": pl.Float64,
    "gt_textual_strong": pl.Int64, "gt_textual_rule": pl.Utf8,
    "gt_textual_second": pl.Utf8, "gt_textual_second_auroc": pl.Float64,
}


# --- AUROC, vectorised ----------------------------------------------------------------------------
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks along axis 0 with ties given their average rank (``scipy.stats.rankdata``'s
    'average', axis=0), in numpy so that scipy is not a dependency. [N] or [N, W] → float64."""
    a = np.asarray(x)
    if a.ndim == 1:
        return average_ranks(a[:, None])[:, 0]
    n, w = a.shape
    if n == 0:
        return np.zeros((0, w), dtype=np.float64)
    order = np.argsort(a, axis=0, kind="stable")
    s = np.take_along_axis(a, order, axis=0)
    idx = np.arange(n)[:, None]
    first = np.ones((n, w), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    last = np.ones((n, w), dtype=bool)
    last[:-1] = first[1:]
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=0)
    end = np.minimum.accumulate(np.where(last, idx, n - 1)[::-1], axis=0)[::-1]
    ranks = np.empty((n, w), dtype=np.float64)
    np.put_along_axis(ranks, order, (start + end) / 2.0 + 1.0, axis=0)
    return ranks


def auroc_matrix(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUROC of every score column separating every positive set: [N, W] × bool [N, V] → [W, V].

    Mann–Whitney form, (Σ ranks of positives − n₁(n₁+1)/2) / (n₁ n₀), with average ranks so ties
    (a TopK latent is 0 on most tokens) count half — the same number as sklearn's roc_auc_score.
    NaN where a positive set is empty or holds every row.

    A TopK code is 0 on most tokens, so each column ranks only its nonzero entries; its zeros are one
    tie block whose average rank is known (after the negative entries, before the positive ones).
    That is the same sum as ranking all N, at the cost of the column's nonzeros.
    """
    s = np.asarray(scores)
    pos = np.asarray(positives, dtype=bool)
    if s.ndim != 2 or pos.ndim != 2 or s.shape[0] != pos.shape[0]:
        raise ValueError(f"scores {s.shape} and positives {pos.shape} must be [N, W] and [N, V]")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    n, w = s.shape
    n1 = pos.sum(axis=0).astype(np.float64)
    n0 = n - n1
    out = np.full((w, pos.shape[1]), np.nan)
    valid = (n1 > 0) & (n0 > 0)
    if n == 0 or w == 0 or not valid.any():
        return out
    p = pos[:, valid].astype(np.float64)
    n1v, n0v = n1[valid], n0[valid]
    for j in range(w):
        nz = np.flatnonzero(s[:, j])
        values = s[nz, j].astype(np.float64)
        n_zero = n - len(nz)
        ranks = average_ranks(values) + n_zero * (values > 0)  # zeros rank below the positive values
        zero_rank = float((values < 0).sum()) + (n_zero + 1) / 2.0
        p_nz = p[nz]
        rank_sum = ranks @ p_nz + (n1v - p_nz.sum(axis=0)) * zero_rank
        out[j, valid] = (rank_sum - n1v * (n1v + 1) / 2) / (n1v * n0v)
    return out


# --- positive sets --------------------------------------------------------------------------------
def concept_words(name: str) -> frozenset[str]:
    """The words of a concept name ("red circle" → {"red", "circle"})."""
    return frozenset(name.split())


def visual_concept_names(grids: AnnotationGrids) -> list[str]:
    """Every concept the world can show: "background", each attribute value, each colour–shape pair
    present somewhere; in that order (singles sorted by attribute then value, pairs sorted)."""
    names = [BACKGROUND]
    for a in ATTRIBUTES:
        names += sorted(set(grids.values[a].ravel()) - {""} - set(names))
    color, shape = grids.values["color"].ravel(), grids.values["shape"].ravel()
    names += sorted({f"{c} {s}" for c, s in zip(color, shape) if c and s})
    return names


def _cells(grids: AnnotationGrids, sample_image: Mapping[str, str],
           rows: pl.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image index, grid row, grid col) of each base-grid patch row, checked against the grids."""
    image_ids = [sample_image.get(s) for s in rows["sample_id"].cast(pl.Utf8).to_list()]
    missing = sorted({s for s, i in zip(rows["sample_id"].to_list(), image_ids) if i not in grids.index})
    if missing:
        raise ValueError(f"{len(missing)} samples have no annotated image (e.g. {missing[:3]}); filter them out")
    img = np.array([grids.index[i] for i in image_ids], dtype=np.int64)
    r = rows["grid_row"].to_numpy().astype(np.int64)
    c = rows["grid_col"].to_numpy().astype(np.int64)
    _, R, C = grids.values["color"].shape
    if len(r) and (r.min() < 0 or c.min() < 0 or r.max() >= R or c.max() >= C):
        raise ValueError(f"token base grid exceeds the annotation grid {R}×{C}: annotations and activations "
                         "come from different geometries")
    return img, r, c


def visual_positives(grids: AnnotationGrids, sample_image: Mapping[str, str],
                     rows: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    """(concept names, bool [P, V]): which concepts each base-grid patch row shows.

    ``rows``: the base-view image rows of tokens.parquet (columns ``sample_id``, ``grid_row``,
    ``grid_col``); ``sample_image``: sample id → image id. Every row's sample must have an
    annotated image and its cell must lie on the annotation grid (filter first): a silently
    unannotated patch would count as a negative of every concept, including background.
    """
    names = visual_concept_names(grids)
    img, r, c = _cells(grids, sample_image, rows)
    cell = {a: grids.values[a][img, r, c] for a in ATTRIBUTES}
    out = np.zeros((len(img), len(names)), dtype=bool)
    for k, name in enumerate(names):
        if name == BACKGROUND:
            out[:, k] = cell["color"] == ""
        elif " " in name:
            col, shp = name.split(" ", 1)
            out[:, k] = (cell["color"] == col) & (cell["shape"] == shp)
        else:  # a value may in principle name two attributes: either counts
            out[:, k] = np.logical_or.reduce([cell[a] == name for a in ATTRIBUTES])
    return names, out


def partial_patches(grids: AnnotationGrids, sample_image: Mapping[str, str], rows: pl.DataFrame) -> np.ndarray:
    """bool [P]: the patch row is covered by an object, but by less than ``MIN_COVERAGE`` (module
    doc: such patches are left out of the visual population); all False for grids without it."""
    img, r, c = _cells(grids, sample_image, rows)
    if grids.partial is None:
        return np.zeros(len(img), dtype=bool)
    return grids.partial[img, r, c]


def text_vocabulary(words: Sequence[str], concept_names: Sequence[str], min_count: int) -> list[str]:
    """Words that may be a latent's textual concept (sorted): the words of the visual concepts that
    occur at all, plus any word with a letter or digit occurring ≥ ``min_count`` times."""
    counts = Counter(words)
    concept = {w for n in concept_names if n != BACKGROUND for w in n.split()}
    vocab = {w for w in concept if counts[w] > 0}
    vocab |= {w for w, n in counts.items() if n >= min_count and any(ch.isalnum() for ch in w)}
    return sorted(vocab)


def textual_positives(words: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """bool [T, V']: text token t is word v (``words`` already stripped and lower-cased)."""
    w = np.asarray(list(words), dtype=object)
    return np.stack([w == v for v in vocabulary], axis=1) if len(vocabulary) else np.zeros((len(w), 0), bool)


def mask_small_sets(auroc: np.ndarray, positives: np.ndarray, min_positive: int) -> np.ndarray:
    """AUROC with NaN in the columns whose positive or negative set is smaller than ``min_positive``
    (an AUROC over a handful of tokens is noise, not grounding)."""
    n1 = positives.sum(axis=0)
    n0 = positives.shape[0] - n1
    out = np.array(auroc, dtype=np.float64, copy=True)
    out[:, (n1 < min_positive) | (n0 < min_positive)] = np.nan
    return out


# --- precision over strong activations -------------------------------------------------------------
def strong_mask(acts: np.ndarray, fraction: float) -> np.ndarray:
    """bool [N, W]: token n is a strong activation of latent w (> 0 and ≥ ``fraction`` × the
    latent's largest activation over these N tokens)."""
    a = np.asarray(acts)
    if not len(a):
        return np.zeros(a.shape, dtype=bool)
    peak = a.max(axis=0, keepdims=True)
    return (a > 0) & (a >= fraction * peak)


def precision_matrix(acts: np.ndarray, positives: np.ndarray, fraction: float,
                     *, max_cells: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """(precision [W, V], strong count [W]): the share of each latent's strong tokens that are each
    concept's positives (NaN for a latent without strong tokens). Columns in chunks, as in
    :func:`auroc_matrix`."""
    a = np.asarray(acts)
    pos = np.asarray(positives, dtype=np.float32)
    if a.ndim != 2 or pos.ndim != 2 or a.shape[0] != pos.shape[0]:
        raise ValueError(f"acts {a.shape} and positives {pos.shape} must be [N, W] and [N, V]")
    n, w = a.shape
    hits = np.zeros((w, pos.shape[1]), dtype=np.float64)
    strong = np.zeros(w, dtype=np.int64)
    step = max(1, max_cells // max(n, 1))
    for j in range(0, w, step):
        s = strong_mask(a[:, j: j + step], fraction)
        strong[j: j + step] = s.sum(axis=0)
        hits[j: j + step] = s.T.astype(np.float32) @ pos
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(strong[:, None] > 0, hits / np.maximum(strong, 1)[:, None], np.nan)
    return prec, strong


# --- the label rule -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroundingRule:
    """When a concept counts as grounded for a latent (module doc); defaults = ``scores.gt_*``."""

    auroc: float = 0.9
    precision: float = 0.8
    min_firing: int = 20
    min_lift: float = 2.0
    tolerance: float = SIMPLER_WITHIN


@dataclass(frozen=True)
class ModalityEvidence:
    """One modality's evidence for W latents × V concepts (NaN = not measurable)."""

    names: list[str]
    auroc: np.ndarray       # [W, V]
    precision: np.ndarray   # [W, V], over the latent's strong tokens
    strong: np.ndarray      # [W] strong tokens per latent
    base_rate: np.ndarray   # [V] the concept's share of the population

    def __post_init__(self) -> None:
        w, v = len(self.strong), len(self.names)
        for what, arr, shape in (("auroc", self.auroc, (w, v)), ("precision", self.precision, (w, v)),
                                 ("base_rate", self.base_rate, (v,))):
            if np.shape(arr) != shape:
                raise ValueError(f"{what} has shape {np.shape(arr)}, expected {shape}")

    @classmethod
    def auroc_only(cls, names: Sequence[str], auroc: np.ndarray) -> "ModalityEvidence":
        """Evidence without precision (nothing can be precision-grounded): AUROC-rule tests, old runs."""
        a = np.asarray(auroc, dtype=np.float64)
        return cls(list(names), a, np.full(a.shape, np.nan), np.zeros(len(a), np.int64),
                   np.full(len(names), np.nan))


def grounded(ev: ModalityEvidence, rule: GroundingRule) -> tuple[np.ndarray, np.ndarray]:
    """(by AUROC, by precision): bool [W, V] each (module doc for the rule)."""
    by_auroc = np.nan_to_num(ev.auroc, nan=-np.inf) >= rule.auroc
    prec = np.nan_to_num(ev.precision, nan=-np.inf)
    with np.errstate(invalid="ignore"):
        lift_ok = prec >= rule.min_lift * np.nan_to_num(ev.base_rate, nan=np.inf)[None, :]
    by_precision = (prec >= rule.precision) & lift_ok & (np.asarray(ev.strong) >= rule.min_firing)[:, None]
    return by_auroc, by_precision


def choose_concepts(auroc: np.ndarray, names: Sequence[str], tolerance: float = SIMPLER_WITHIN,
                    allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``auroc`` [W, V]: (index of the reported concept or -1, its AUROC or NaN).

    Candidates are within ``tolerance`` of the row's best; the fewest-word candidate wins, then the
    higher AUROC, then the earlier name. ``allowed`` (bool [W, V]) restricts the choice.
    """
    a = np.where(np.isnan(auroc), -np.inf, auroc)
    if allowed is not None:
        a = np.where(allowed, a, -np.inf)
    w = a.shape[0]
    if a.shape[1] == 0:
        return np.full(w, -1), np.full(w, np.nan)
    best = a.max(axis=1)
    complexity = _complexity(names)
    # complexity dominates (AUROC ∈ [0, 1]); argmin takes the first index among exact ties
    key = np.where(a >= best[:, None] - tolerance, 4.0 * complexity[None, :] - a, np.inf)
    idx = key.argmin(axis=1)
    ok = np.isfinite(best)
    idx = np.where(ok, idx, -1)
    value = np.where(ok, auroc[np.arange(w), np.maximum(idx, 0)], np.nan)
    return idx, value


def most_specific(precision: np.ndarray, names: Sequence[str], allowed: np.ndarray) -> np.ndarray:
    """Per row: index of the allowed concept with the most words, then the highest precision, then
    the earliest name; -1 when none is allowed."""
    if precision.shape[1] == 0:
        return np.full(len(precision), -1)
    key = np.where(allowed, -4.0 * _complexity(names)[None, :] - np.nan_to_num(precision, nan=0.0), np.inf)
    return np.where(allowed.any(axis=1), key.argmin(axis=1), -1)


def _complexity(names: Sequence[str]) -> np.ndarray:
    return np.array([len(n.split()) for n in names], dtype=np.float64)


def _second(auroc: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Highest-AUROC concept other than the chosen one (-1/NaN when none)."""
    a = np.where(np.isnan(auroc), -np.inf, auroc)
    if a.shape[1] == 0:
        return np.full(len(a), -1), np.full(len(a), np.nan)
    rows = np.flatnonzero(chosen >= 0)
    a[rows, chosen[rows]] = -np.inf
    idx = a.argmax(axis=1)
    val = a[np.arange(len(a)), idx]
    ok = np.isfinite(val)
    return np.where(ok, idx, -1), np.where(ok, val, np.nan)


def _name_concepts(ev: ModalityEvidence, by_auroc: np.ndarray, by_precision: np.ndarray,
                   tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(named concept index or -1, rule code: 1 precision, 2 AUROC, 0 none) per latent."""
    p_idx = most_specific(ev.precision, ev.names, by_precision)
    a_idx, _ = choose_concepts(ev.auroc, ev.names, tolerance, allowed=by_auroc)
    a_idx = np.where(by_auroc.any(axis=1), a_idx, -1)
    idx = np.where(p_idx >= 0, p_idx, a_idx)
    return idx, np.where(p_idx >= 0, 1, np.where(a_idx >= 0, 2, 0))


def _at(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """m[w, idx[w]] (NaN where idx is -1)."""
    if m.shape[1] == 0:
        return np.full(len(idx), np.nan)
    return np.where(idx >= 0, m[np.arange(len(idx)), np.maximum(idx, 0)], np.nan)


def _best(m: np.ndarray) -> np.ndarray:
    """Row maximum ignoring NaN (NaN when the row has no value)."""
    if m.shape[1] == 0:
        return np.full(len(m), np.nan)
    a = np.where(np.isnan(m), -np.inf, m).max(axis=1)
    return np.where(np.isfinite(a), a, np.nan)


def label_latents(visual: ModalityEvidence, textual: ModalityEvidence, fired: np.ndarray,
                  rule: GroundingRule = GroundingRule()) -> pl.DataFrame:
    """Ground-truth label of each latent from both modalities' evidence (module doc for the rule).

    ``fired`` bool [W]: the latent is active on at least one token. Returns :data:`GT_SCHEMA` rows,
    one per latent. A concept column is null unless that modality is grounded; then the AUROC /
    precision columns hold the named concept's values, otherwise the best values.
    """
    fired = np.asarray(fired, dtype=bool)
    W = len(fired)
    if len(visual.strong) != W or len(textual.strong) != W:
        raise ValueError(f"evidence for {len(visual.strong)} / {len(textual.strong)} latents, fired for {W}")
    va_g, vp_g = grounded(visual, rule)
    ta_g, tp_g = grounded(textual, rule)
    v_g, t_g = (va_g | vp_g) & fired[:, None], (ta_g | tp_g) & fired[:, None]
    v_idx, v_rule = _name_concepts(visual, va_g & fired[:, None], vp_g & fired[:, None], rule.tolerance)
    t_idx, t_rule = _name_concepts(textual, ta_g & fired[:, None], tp_g & fired[:, None], rule.tolerance)
    v_ok, t_ok = v_idx >= 0, t_idx >= 0

    modality = np.full(W, "none", dtype=object)
    modality[v_ok & ~t_ok] = "visual"
    modality[t_ok & ~v_ok] = "textual"
    both = v_ok & t_ok
    modality[both] = "mixed"
    # the same concept grounded in both: words that are also visual concept names
    shared = [(t, visual.names.index(name)) for t, name in enumerate(textual.names) if name in visual.names]
    t_of = np.array([t for t, _ in shared], dtype=np.int64)
    v_of = np.array([v for _, v in shared], dtype=np.int64)
    if len(shared):
        both_shared = v_g[:, v_of] & t_g[:, t_of]  # [W, S]
        for w in np.flatnonzero(both & both_shared.any(axis=1)):
            modality[w] = "multimodal"
            named_v = visual.names[v_idx[w]]
            cand = np.flatnonzero(both_shared[w])
            agrees_v = np.array([textual.names[t_of[s]] in named_v.split() for s in cand])
            is_t = t_of[cand] == t_idx[w]
            key = np.lexsort((np.arange(len(cand)), -np.nan_to_num(textual.auroc[w, t_of[cand]], nan=-1.0),
                              ~is_t, ~agrees_v))
            s = cand[key[0]]
            t_idx[w] = t_of[s]
            t_rule[w] = 1 if tp_g[w, t_of[s]] else 2
            if not agrees_v[key[0]]:
                v_idx[w] = v_of[s]
                v_rule[w] = 1 if vp_g[w, v_of[s]] else 2

    v2_idx, v2_val = _second(visual.auroc, v_idx)
    t2_idx, t2_val = _second(textual.auroc, t_idx)

    def name(names: Sequence[str], idx: np.ndarray) -> list[str | None]:
        return [names[i] if i >= 0 else None for i in idx]

    def value(m: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return np.where(idx >= 0, _at(m, idx), _best(m))

    rule_name = np.array([None, "precision", "auroc"], dtype=object)
    return pl.DataFrame({
        "latent": np.arange(W, dtype=np.int32), "gt_modality": modality.tolist(),
        "gt_visual_concept": name(visual.names, v_idx), "gt_visual_auroc": value(visual.auroc, v_idx),
        "gt_visual_precision": value(visual.precision, v_idx), "gt_visual_strong": visual.strong.astype(np.int64),
        "gt_visual_rule": rule_name[v_rule].tolist(),
        "gt_visual_second": name(visual.names, v2_idx), "gt_visual_second_auroc": v2_val,
        "gt_textual_concept": name(textual.names, t_idx), "gt_textual_auroc": value(textual.auroc, t_idx),
        "gt_textual_precision": value(textual.precision, t_idx),
        "gt_textual_strong": textual.strong.astype(np.int64), "gt_textual_rule": rule_name[t_rule].tolist(),
        "gt_textual_second": name(textual.names, t2_idx), "gt_textual_second_auroc": t2_val,
    }, schema=GT_SCHEMA)


# --- the census at several AUROC thresholds -------------------------------------------------------
def census_column(threshold: float) -> str:
    """Column of ground_truth.parquet holding the label at another AUROC threshold."""
    return f"gt_modality_auroc_{threshold:g}"


def census_by_auroc(visual: ModalityEvidence, textual: ModalityEvidence, fired: np.ndarray, rule: GroundingRule,
                    thresholds: Sequence[float]) -> dict[str, list[str]]:
    """Labels at each AUROC threshold (the rest of the rule unchanged): column name → labels."""
    return {census_column(t): label_latents(visual, textual, fired, replace(rule, auroc=t))["gt_modality"].to_list()
            for t in thresholds}


def gt_census(gt: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Counts per class at every AUROC threshold stored in ``gt`` (``census_column``s), plus
    ``"label"`` for ``gt_modality`` itself: {"0.8": {"visual": 3, …}, …, "label": {…}}."""
    prefix = census_column(0.0).rsplit("_", 1)[0] + "_"
    cols = {c[len(prefix):]: c for c in gt.columns if c.startswith(prefix)}
    cols = dict(sorted(cols.items(), key=lambda kv: float(kv[0])))
    out = {}
    for key, col in (*cols.items(), ("label", "gt_modality")):
        counts = Counter(gt[col].to_list())
        out[key] = {m: int(counts.get(m, 0)) for m in MODALITIES}
    return out


# --- from a store ---------------------------------------------------------------------------------
def _dense(values: torch.Tensor, indices: torch.Tensor, width: int) -> np.ndarray:
    """Sparse codes [n, k] → dense [n, width] (scatter-add: BatchTopK pads with zero values)."""
    dense = torch.zeros(values.shape[0], width, dtype=torch.float32)
    dense.scatter_add_(1, indices.long(), values.float())
    return dense.numpy()


def _encode_selected(sae: Any, array: Any, keep: np.ndarray, device: str, batch_rows: int,
                     max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense activations [keep.sum(), W] of the kept rows (in row order) and which were finite."""
    from msae.latents.stats import encode_rows

    rows = np.flatnonzero(keep)
    out = np.zeros((len(rows), sae.num_latents), dtype=np.float32)
    finite = np.ones(len(rows), dtype=bool)
    done = 0
    n = int(array.shape[0])
    for r0 in range(0, n, batch_rows):
        r1 = min(r0 + batch_rows, n)
        local = np.flatnonzero(keep[r0:r1])
        if not len(local):
            continue
        x = np.asarray(array[r0:r1], dtype=np.float32)[local]
        ok = np.isfinite(x).all(axis=1)
        x = np.where(ok[:, None], x, 0.0)
        values, indices = encode_rows(sae, x, device, max_rows)
        out[done: done + len(local)] = _dense(values.cpu(), indices.cpu(), sae.num_latents)
        finite[done: done + len(local)] = ok
        done += len(local)
    return out, finite


def modality_evidence(acts: np.ndarray, names: Sequence[str], positives: np.ndarray, min_positive: int,
                      strong_fraction: float) -> ModalityEvidence:
    """AUROC and strong-token precision of every latent (columns of ``acts``) for every concept."""
    auroc = mask_small_sets(auroc_matrix(acts, positives), positives, min_positive)
    precision, strong = precision_matrix(acts, positives, strong_fraction)
    precision = mask_small_sets(precision, positives, min_positive)
    base = positives.mean(axis=0) if len(positives) else np.full(len(names), np.nan)
    return ModalityEvidence(list(names), auroc, precision, strong, np.asarray(base, dtype=np.float64))


def ground_truth_labels(store: Any, layer: int, width: int | str, *, threshold: float = 0.9,
                        precision: float = 0.8, strong_fraction: float = 0.5, min_firing: int = 20,
                        min_lift: float = 2.0, census_aurocs: Sequence[float] = (0.8, 0.9, 0.95),
                        min_positive: int = 20, device: str = "cpu", tolerance: float = SIMPLER_WITHIN,
                        batch_rows: int = 16384, max_rows: int = 8192, exclude_partial: bool = True) -> pl.DataFrame:
    """Ground-truth label of every latent of the layer × width SAE (module doc), one row per latent:
    :data:`GT_SCHEMA`, ``gt_visual_fires`` / ``gt_textual_fires`` (patches / text tokens where the
    latent is active) and one :func:`census_column` per ``census_aurocs`` threshold.

    Memory: the activations are read in row batches, but the codes of all base-grid patches and all
    non-template text tokens are held dense ([patches, W] and [text tokens, W], float32), as
    AUROC ranks every token. That is fine because ground truth exists only for the small annotated
    world (38,400 patches × 512 latents ≈ 80 MB for the embedded default); it is not meant for a
    LLaVA-NeXT-Data run, which has no annotations anyway. Rows with NaN/inf activations are left
    out of both populations. ``exclude_partial=False`` keeps partial patches as background (the
    rule before they were left out; ``benchmarks/bench_gt_partial.py`` compares the two).
    """
    from msae.data.samples import sample_image_ids
    from msae.latents.render import display_tokens
    from msae.sae.formats import load_sae
    from msae.sae.stage import open_layer

    if not store.exists(*ANNOTATIONS):
        raise ValueError(f"ground truth needs patch annotations ({store.url(*ANNOTATIONS)}); "
                         "only the `shapes` dataset has them")
    grids = AnnotationGrids.from_table(store.read_parquet(*ANNOTATIONS))
    samples = store.read_parquet(store.SAMPLES)
    sample_image = sample_image_ids(samples)
    tokens = store.read_parquet(store.TOKENS).select(
        "sample_id", "position", "token", "modality", "view", "grid_row", "grid_col", "role")
    array = open_layer(store, layer)
    if tokens.height != array.shape[0]:
        raise ValueError(f"tokens.parquet has {tokens.height} rows but layer {layer}'s activations have "
                         f"{array.shape[0]}: they come from different runs")
    annotated_ids = [s for s, i in sample_image.items() if i in grids.index]
    annotated = tokens["sample_id"].cast(pl.Utf8).is_in(annotated_ids)
    is_base = ((tokens["modality"] == "image") & (tokens["view"] == "base")).fill_null(False) & annotated
    is_answer_pos = answer_position_rows(tokens)
    is_text = ((tokens["modality"] == "text") & (tokens["role"].fill_null("") != "template")).fill_null(False)
    is_base, is_text = is_base.to_numpy(), is_text.to_numpy() | is_answer_pos

    sae = load_sae(store.url(store.sae_name(layer, width)), device=device).float().eval()
    dense, finite = _encode_selected(sae, array, is_base | is_text, device, batch_rows, max_rows)
    kept = np.flatnonzero(is_base | is_text)
    sel_base, sel_text = is_base[kept] & finite, is_text[kept] & finite
    act_v, act_t = dense[sel_base], dense[sel_text]
    del dense

    base_rows = tokens.filter(pl.Series(is_base)).filter(pl.Series(finite[is_base[kept]]))
    fires_v = (act_v > 0).sum(axis=0)  # every patch: whether a latent fires at all
    whole = ~partial_patches(grids, sample_image, base_rows) if exclude_partial else np.ones(len(act_v), bool)
    act_v, base_rows = act_v[whole], base_rows.filter(pl.Series(whole))
    v_names, v_pos = visual_positives(grids, sample_image, base_rows)
    text_rows = tokens.filter(pl.Series(is_text))
    words_all = [d.strip().lower() for d in display_tokens(text_rows["token"].fill_null("").to_list())]
    words_all = [ANSWER_POSITION if a else w for w, a in zip(words_all, is_answer_pos[is_text])]
    words = [w for w, ok in zip(words_all, finite[is_text[kept]]) if ok]
    t_names = text_vocabulary(words, v_names, min_positive)
    t_pos = textual_positives(words, t_names)

    visual = modality_evidence(act_v, v_names, v_pos, min_positive, strong_fraction)
    textual = modality_evidence(act_t, t_names, t_pos, min_positive, strong_fraction)
    fires_t = (act_t > 0).sum(axis=0)
    fired = (fires_v + fires_t) > 0
    rule = GroundingRule(auroc=threshold, precision=precision, min_firing=min_firing, min_lift=min_lift,
                         tolerance=tolerance)
    frame = label_latents(visual, textual, fired, rule)
    extra = [pl.Series(c, v, dtype=pl.Utf8) for c, v in census_by_auroc(visual, textual, fired, rule,
                                                                       census_aurocs).items()]
    return frame.with_columns(pl.Series("gt_visual_fires", fires_v.astype(np.int64)),
                              pl.Series("gt_textual_fires", fires_t.astype(np.int64)), *extra)


def ground_truth_from_config(store: Any, layer: int, width: int | str, scores: Any,
                             device: str = "cpu", exclude_partial: bool = True) -> pl.DataFrame:
    """:func:`ground_truth_labels` with every threshold from a :class:`msae.config.ScoresConfig`."""
    return ground_truth_labels(store, layer, width, threshold=scores.gt_auroc, precision=scores.gt_precision,
                               strong_fraction=scores.gt_strong_fraction, min_firing=scores.gt_min_firing,
                               min_lift=scores.gt_min_lift, census_aurocs=tuple(scores.gt_census_aurocs),
                               min_positive=scores.gt_min_positive, device=device, exclude_partial=exclude_partial)


__all__ = ["ANSWER_POSITION", "GT_SCHEMA", "MODALITIES", "SIMPLER_WITHIN", "GroundingRule", "ModalityEvidence",
           "answer_position_rows", "auroc_matrix", "average_ranks", "census_by_auroc", "census_column",
           "choose_concepts", "concept_words", "grounded", "ground_truth_from_config", "ground_truth_labels",
           "gt_census", "label_latents", "mask_small_sets", "modality_evidence", "most_specific",
           "partial_patches", "precision_matrix", "strong_mask", "text_vocabulary", "textual_positives",
           "visual_concept_names", "visual_positives"]
