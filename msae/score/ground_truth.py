"""Ground-truth modality labels on an annotated world, from annotations and activations only.

The paper has no ground truth for its visual / textual / multimodal labels; the synthetic shapes
world does. Nothing here looks at an explainer's answer or an embedder: a latent's label follows
from how well its activation *separates* annotated sets of tokens, measured by AUROC (ties —
the many tokens where a TopK latent is 0 — count half, i.e. average ranks).

* Visual grounding: over every base-grid patch of every annotated sample, the latent's activation
  against each visual concept's patch set. Concepts are those of the dissection explainer
  (:class:`msae.explain.dissection.AnnotationGrids`): each colour, shape and size value, each
  "colour shape" pair present in the world, and "background".
* Textual grounding: over every non-template text token, the activation against "the token is the
  word *w*". Words (the display form, stripped and lower-cased, as the dissection explainer sees a
  peak token): the concept vocabulary (every word of a visual concept name) plus every other word
  with a letter or digit that occurs at least ``min_positive`` times. Function words such as "the"
  are kept on purpose: a latent that fires exactly on "the" is a textual latent, and the pipeline's
  textual explainer can name it, so the ground truth must be able to say so too. Punctuation-only
  tokens are never a concept (they stay in the population as negatives).
* A concept (visual or textual) is measured only when it has at least ``min_positive`` positive
  and ``min_positive`` negative tokens; otherwise its AUROC is NaN and it cannot be chosen.

Label rule (:func:`label_from_aurocs`), with ``threshold`` (default 0.9):

* best concept per modality: the highest AUROC; among concepts within ``SIMPLER_WITHIN`` (0.01) of
  it the simplest wins (fewest words: "red" over "red circle"), then the higher AUROC, then the
  first in name order;
* visually / textually grounded: that best AUROC ≥ ``threshold``;
* both grounded → ``multimodal`` when some grounded visual concept and some grounded word agree
  (the word is one of the concept's words: "red" with "red" or "red circle"), else ``mixed``;
  only one → ``visual`` / ``textual``; neither, or a latent that never fires → ``none``.
  The visual side of that pair must be one of the near-tied candidates (within ``SIMPLER_WITHIN``
  of the best visual AUROC), and when the reported best pair disagrees but such a pair agrees, the
  agreeing pair is reported: a latent answering to "red" in both modalities is not called mixed
  because "large" edges out "red" by 0.005. The restriction matters: a "colour shape" pair's patches
  are a subset of its colour's, so a pure "blue" latent also reaches a high AUROC on "blue circle";
  letting any grounded visual concept agree would make a blue-patch + "circle"-word latent
  multimodal instead of mixed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.explain.dissection import ATTRIBUTES, BACKGROUND, AnnotationGrids

MODALITIES = ("visual", "textual", "multimodal", "mixed", "none")
SIMPLER_WITHIN = 0.01
"""Concepts this close to the best AUROC count as tied; the simplest of them is reported."""
ANNOTATIONS = ("world", "annotations.parquet")

GT_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32, "gt_modality": pl.Utf8,
    "gt_visual_concept": pl.Utf8, "gt_visual_auroc": pl.Float64,
    "gt_visual_second": pl.Utf8, "gt_visual_second_auroc": pl.Float64,
    "gt_textual_concept": pl.Utf8, "gt_textual_auroc": pl.Float64,
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


def auroc_matrix(scores: np.ndarray, positives: np.ndarray, *, max_cells: int = 1 << 23) -> np.ndarray:
    """AUROC of every score column separating every positive set: [N, W] × bool [N, V] → [W, V].

    Mann–Whitney form, (Σ ranks of positives − n₁(n₁+1)/2) / (n₁ n₀), with average ranks so ties
    (a TopK latent is 0 on most tokens) count half — the same number as sklearn's roc_auc_score.
    NaN where a positive set is empty or holds every row. Columns are ranked ``max_cells // N`` at
    a time so memory stays bounded whatever the width.
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
    step = max(1, max_cells // n)
    for j in range(0, w, step):
        ranks = average_ranks(s[:, j: j + step])
        out[j: j + step, valid] = (ranks.T @ p - n1[valid] * (n1[valid] + 1) / 2) / (n1[valid] * n0[valid])
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


def visual_positives(grids: AnnotationGrids, sample_image: Mapping[str, str],
                     rows: pl.DataFrame) -> tuple[list[str], np.ndarray]:
    """(concept names, bool [P, V]): which concepts each base-grid patch row shows.

    ``rows``: the base-view image rows of tokens.parquet (columns ``sample_id``, ``grid_row``,
    ``grid_col``); ``sample_image``: sample id → image id. Every row's sample must have an
    annotated image and its cell must lie on the annotation grid (filter first): a silently
    unannotated patch would count as a negative of every concept, including background.
    """
    names = visual_concept_names(grids)
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


# --- the label rule -------------------------------------------------------------------------------
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
    complexity = np.array([len(n.split()) for n in names], dtype=np.float64)
    # complexity dominates (AUROC ∈ [0, 1]); argmin takes the first index among exact ties
    key = np.where(a >= best[:, None] - tolerance, 4.0 * complexity[None, :] - a, np.inf)
    idx = key.argmin(axis=1)
    ok = np.isfinite(best)
    idx = np.where(ok, idx, -1)
    value = np.where(ok, auroc[np.arange(w), np.maximum(idx, 0)], np.nan)
    return idx, value


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


def label_from_aurocs(visual_auroc: np.ndarray, visual_names: Sequence[str], textual_auroc: np.ndarray,
                      textual_names: Sequence[str], fired: np.ndarray, threshold: float = 0.9,
                      tolerance: float = SIMPLER_WITHIN) -> pl.DataFrame:
    """Ground-truth label of each latent from its AUROC matrices (module doc for the rule).

    ``visual_auroc`` [W, V], ``textual_auroc`` [W, V'] (NaN = not measurable), ``fired`` bool [W]
    (the latent is active on at least one token). Returns :data:`GT_SCHEMA` rows, one per latent;
    a concept column is null unless that modality is grounded (its AUROC column always holds the
    best value, so near misses stay visible).
    """
    va = np.asarray(visual_auroc, dtype=np.float64)
    ta = np.asarray(textual_auroc, dtype=np.float64)
    fired = np.asarray(fired, dtype=bool)
    W = len(fired)
    if va.shape != (W, len(visual_names)) or ta.shape != (W, len(textual_names)):
        raise ValueError(f"AUROC shapes {va.shape}, {ta.shape} do not match {W} latents × "
                         f"{len(visual_names)} / {len(textual_names)} concepts")
    v_idx, v_val = choose_concepts(va, visual_names, tolerance)
    t_idx, t_val = choose_concepts(ta, textual_names, tolerance)
    v_ok = fired & (np.nan_to_num(v_val, nan=-np.inf) >= threshold)
    t_ok = fired & (np.nan_to_num(t_val, nan=-np.inf) >= threshold)
    # agree[i, j]: word j is one of visual concept i's words
    agree = np.array([[t in concept_words(v) for t in textual_names] for v in visual_names],
                     dtype=bool).reshape(len(visual_names), len(textual_names))
    v_ground = np.nan_to_num(va, nan=-np.inf) >= threshold
    t_ground = np.nan_to_num(ta, nan=-np.inf) >= threshold
    modality = np.full(W, "none", dtype=object)
    modality[v_ok & ~t_ok] = "visual"
    modality[t_ok & ~v_ok] = "textual"
    va_inf = np.nan_to_num(va, nan=-np.inf)
    near_best = va_inf >= (va_inf.max(axis=1, initial=-np.inf) - tolerance)[:, None]
    for w in np.flatnonzero(v_ok & t_ok):
        pairs = (v_ground[w] & near_best[w])[:, None] & t_ground[w][None, :] & agree
        if not pairs.any():
            modality[w] = "mixed"
            continue
        modality[w] = "multimodal"
        if agree[v_idx[w], t_idx[w]]:
            continue
        words_ok = pairs.any(axis=0)
        t_idx[w] = int(np.argmax(np.where(words_ok, ta[w], -np.inf)))
        t_val[w] = ta[w, t_idx[w]]
        i, val = choose_concepts(va[w: w + 1], visual_names, tolerance, allowed=pairs[:, t_idx[w]][None, :])
        v_idx[w], v_val[w] = int(i[0]), float(val[0])
    v2_idx, v2_val = _second(va, v_idx)
    t2_idx, t2_val = _second(ta, t_idx)

    def name(names: Sequence[str], idx: np.ndarray, keep: np.ndarray | None = None) -> list[str | None]:
        return [names[i] if i >= 0 and (keep is None or keep[n]) else None for n, i in enumerate(idx)]

    return pl.DataFrame({
        "latent": np.arange(W, dtype=np.int32), "gt_modality": modality.tolist(),
        "gt_visual_concept": name(visual_names, v_idx, v_ok), "gt_visual_auroc": v_val,
        "gt_visual_second": name(visual_names, v2_idx), "gt_visual_second_auroc": v2_val,
        "gt_textual_concept": name(textual_names, t_idx, t_ok), "gt_textual_auroc": t_val,
        "gt_textual_second": name(textual_names, t2_idx), "gt_textual_second_auroc": t2_val,
    }, schema=GT_SCHEMA)


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


def ground_truth_labels(store: Any, layer: int, width: int, *, threshold: float = 0.9, min_positive: int = 20,
                        device: str = "cpu", tolerance: float = SIMPLER_WITHIN, batch_rows: int = 16384,
                        max_rows: int = 8192) -> pl.DataFrame:
    """Ground-truth label of every latent of the layer × width SAE (module doc), one row per latent:
    :data:`GT_SCHEMA` plus ``gt_visual_fires`` / ``gt_textual_fires`` (patches / text tokens where
    the latent is active).

    Memory: the activations are read in row batches, but the codes of all base-grid patches and all
    non-template text tokens are held dense ([patches, W] and [text tokens, W], float32), as
    AUROC ranks every token. That is fine because ground truth exists only for the small annotated
    world (38,400 patches × 512 latents ≈ 80 MB for the embedded default); it is not meant for a
    LLaVA-NeXT-Data run, which has no annotations anyway. Rows with NaN/inf activations are left
    out of both populations.
    """
    from pathlib import PurePath

    from msae.latents.render import display_tokens
    from msae.sae.formats import load_sae
    from msae.sae.stage import open_layer

    if not store.exists(*ANNOTATIONS):
        raise ValueError(f"ground truth needs patch annotations ({store.url(*ANNOTATIONS)}); "
                         "only the `shapes` dataset has them")
    grids = AnnotationGrids.from_table(store.read_parquet(*ANNOTATIONS))
    samples = store.read_parquet(store.SAMPLES)
    sample_image = {str(s): PurePath(i).stem for s, i in zip(samples["sample_id"], samples["image"]) if i}
    tokens = store.read_parquet(store.TOKENS).select(
        "sample_id", "token", "modality", "view", "grid_row", "grid_col", "role")
    array = open_layer(store, layer)
    if tokens.height != array.shape[0]:
        raise ValueError(f"tokens.parquet has {tokens.height} rows but layer {layer}'s activations have "
                         f"{array.shape[0]}: they come from different runs")
    annotated_ids = [s for s, i in sample_image.items() if i in grids.index]
    annotated = tokens["sample_id"].cast(pl.Utf8).is_in(annotated_ids)
    is_base = ((tokens["modality"] == "image") & (tokens["view"] == "base")).fill_null(False) & annotated
    is_text = ((tokens["modality"] == "text") & (tokens["role"].fill_null("") != "template")).fill_null(False)
    is_base, is_text = is_base.to_numpy(), is_text.to_numpy()

    sae = load_sae(store.url(store.sae_name(layer, width)), device=device).float().eval()
    dense, finite = _encode_selected(sae, array, is_base | is_text, device, batch_rows, max_rows)
    kept = np.flatnonzero(is_base | is_text)
    sel_base, sel_text = is_base[kept] & finite, is_text[kept] & finite
    act_v, act_t = dense[sel_base], dense[sel_text]
    del dense

    base_rows = tokens.filter(pl.Series(is_base)).filter(pl.Series(finite[is_base[kept]]))
    v_names, v_pos = visual_positives(grids, sample_image, base_rows)
    text_pieces = tokens.filter(pl.Series(is_text))["token"].fill_null("").to_list()
    words_all = [d.strip().lower() for d in display_tokens(text_pieces)]
    words = [w for w, ok in zip(words_all, finite[is_text[kept]]) if ok]
    t_names = text_vocabulary(words, v_names, min_positive)
    t_pos = textual_positives(words, t_names)

    va = mask_small_sets(auroc_matrix(act_v, v_pos), v_pos, min_positive)
    ta = mask_small_sets(auroc_matrix(act_t, t_pos), t_pos, min_positive)
    fires_v, fires_t = (act_v > 0).sum(axis=0), (act_t > 0).sum(axis=0)
    frame = label_from_aurocs(va, v_names, ta, t_names, (fires_v + fires_t) > 0, threshold, tolerance)
    return frame.with_columns(pl.Series("gt_visual_fires", fires_v.astype(np.int64)),
                              pl.Series("gt_textual_fires", fires_t.astype(np.int64)))


__all__ = ["GT_SCHEMA", "MODALITIES", "SIMPLER_WITHIN", "auroc_matrix", "average_ranks", "choose_concepts",
           "concept_words", "ground_truth_labels", "label_from_aurocs", "mask_small_sets", "text_vocabulary",
           "textual_positives", "visual_concept_names", "visual_positives"]
