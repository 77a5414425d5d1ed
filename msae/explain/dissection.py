"""The `dissection` explainer: concepts read off ground-truth annotations, for worlds that have them.

Offline and deterministic, it plays the role of the large VLM on the synthetic world:

* visual, masked (the method): the attribute value whose patch masks best overlap the latent's
  active patches over its top images — IoU = Σ|A∩M| / Σ|A∪M| over the images, as in Network
  Dissection (Bau et al. 2017). Candidates: each colour, shape and size, each "colour shape" pair
  and "background". Below ``explainer.min_iou``: "No visual concept". Ties go to the simpler
  (single-attribute) concept.
* visual, whole (the baseline of prior SAE methods, emulated): an explainer that sees whole images
  cannot know where the latent fires; it names what the top images have in common. So: the colour,
  shape or "colour shape" present in most top images (ties: larger total area, then the simpler
  concept); no concept when it is in fewer than 60 % of them. Sizes alone are not offered: a
  describer of whole scenes names objects and colours, not "large".
* textual: the word most often at the peak of the top texts; kept when it is the peak in at least
  half of them and its share there is ``explainer.min_enrichment`` × its share of all text tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from msae.config import ExplainerConfig
from msae.explain.base import ConceptKind, ExplainAnswer, ExplainExample, ExplainRequest, Prompting

RULE_VERSION = "dissection-v1"
ATTRIBUTES = ("color", "shape", "size")
BACKGROUND = "background"
MIN_COVERAGE = 0.25
"""A patch belongs to an object's mask when the object covers at least this share of it."""
WHOLE_MIN_SHARE = 0.6


@dataclass(frozen=True)
class AnnotationGrids:
    """Per image, the attribute value on each base-grid patch ('' = background)."""

    index: dict[str, int]           # image_id -> row
    values: dict[str, np.ndarray]   # attribute -> [n_images, R, C] object strings
    partial: np.ndarray | None = None
    """bool [n_images, R, C]: an object covers part of the patch, but less than ``MIN_COVERAGE``
    (shown as background in ``values``; the ground truth leaves such patches out: see there)."""

    @classmethod
    def from_table(cls, annotations: pl.DataFrame) -> "AnnotationGrids":
        ann = annotations.with_columns(
            pl.when(pl.col("object").is_null() | (pl.col("coverage") < MIN_COVERAGE)).then(pl.lit(""))
            .otherwise(pl.col(a)).alias(a) for a in ATTRIBUTES)
        ids = sorted(ann["image_id"].unique().to_list())
        index = {i: n for n, i in enumerate(ids)}
        rows, cols = int(ann["grid_row"].max()) + 1, int(ann["grid_col"].max()) + 1
        img = np.array([index[i] for i in ann["image_id"].to_list()])
        r, c = ann["grid_row"].to_numpy(), ann["grid_col"].to_numpy()
        values = {}
        for a in ATTRIBUTES:
            grid = np.full((len(ids), rows, cols), "", dtype=object)
            grid[img, r, c] = np.array(ann[a].to_list(), dtype=object)
            values[a] = grid
        partial = np.zeros((len(ids), rows, cols), dtype=bool)
        partial[img, r, c] = (annotations["object"].is_not_null()
                              & (annotations["coverage"].fill_null(1.0) < MIN_COVERAGE)).to_numpy()
        return cls(index, values, partial)

    def masks(self, image_id: str) -> dict[str, np.ndarray]:
        """Concept → boolean patch mask for one image (only concepts present in it)."""
        i = self.index[image_id]
        out: dict[str, np.ndarray] = {BACKGROUND: self.values["color"][i] == ""}
        for a in ATTRIBUTES:
            g = self.values[a][i]
            for v in set(g.ravel()) - {""}:
                out[v] = g == v
        color, shape = self.values["color"][i], self.values["shape"][i]
        for v in {f"{c} {s}" for c, s in zip(color.ravel(), shape.ravel()) if c}:
            c, s = v.split(" ")
            out[v] = (color == c) & (shape == s)
        return out


class DissectionExplainer:
    """Implements :class:`msae.explain.base.Explainer` from annotations and token statistics."""

    name = "dissection:annotations"

    def __init__(self, cfg: ExplainerConfig, grids: AnnotationGrids, sample_image: dict[str, str],
                 word_share: dict[str, float]) -> None:
        self.cfg, self.grids, self.sample_image, self.word_share = cfg, grids, sample_image, word_share
        self.sizes = {v for v in np.unique(grids.values["size"]) if v}

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        c = self.cfg
        return f"{RULE_VERSION}:{kind}:{prompting}:iou{c.min_iou}:enr{c.min_enrichment}:cov{MIN_COVERAGE}"

    def explain(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        return [self._one(r) for r in requests]

    def _answer(self, r: ExplainRequest, concept: str | None, raw: str) -> ExplainAnswer:
        if concept is not None and len(concept) > self.cfg.max_concept_chars:
            return ExplainAnswer(r.latent, r.kind, r.prompting, None, raw, "too_long", self.name,
                                 self.version(r.kind, r.prompting))
        return ExplainAnswer(r.latent, r.kind, r.prompting, concept, raw, "ok" if concept else "no_concept",
                             self.name, self.version(r.kind, r.prompting))

    def _one(self, r: ExplainRequest) -> ExplainAnswer:
        if r.kind == "textual":
            return self._answer(r, *self.textual(r.examples))
        if r.prompting == "whole":
            return self._answer(r, *self.visual_whole(r.examples))
        return self._answer(r, *self.visual_masked(r.examples))

    def _image_masks(self, ex: ExplainExample) -> dict[str, np.ndarray] | None:
        image_id = self.sample_image.get(ex.sample_id)
        if image_id is None or image_id not in self.grids.index:
            return None
        return self.grids.masks(image_id)

    def visual_masked(self, examples: Sequence[ExplainExample]) -> tuple[str | None, str]:
        iou = self.overlaps(examples)
        if not iou:
            return None, "no annotated image with active patches"
        ranked = sorted(iou.items(), key=lambda kv: (-round(kv[1], 6), " " in kv[0], kv[0]))
        raw = "IoU " + ", ".join(f"{c}={v:.3f}" for c, v in ranked[:5])
        best, score = ranked[0]
        return (best if score >= self.cfg.min_iou else None), raw

    def overlaps(self, examples: Sequence[ExplainExample]) -> dict[str, float]:
        """IoU of every concept's patch masks with the active patches, pooled over the images."""
        inter: Counter[str] = Counter()
        extra: Counter[str] = Counter()  # |A ∪ M| − |A| per image; an image without the concept adds only |A|
        active_total = 0
        for ex in examples:
            masks = self._image_masks(ex)
            if masks is None or ex.patch_activations is None:
                continue
            active = np.asarray(ex.patch_activations) > 0
            active_total += int(active.sum())
            for concept, m in masks.items():
                inter[concept] += int((active & m).sum())
                extra[concept] += int((m & ~active).sum())
        if active_total == 0:
            return {}
        union = {c: active_total + extra[c] for c in set(inter) | set(extra)}
        return {c: inter[c] / union[c] for c in union if union[c]}

    def visual_whole(self, examples: Sequence[ExplainExample]) -> tuple[str | None, str]:
        present: Counter[str] = Counter()
        area: Counter[str] = Counter()
        n = 0
        for ex in examples:
            masks = self._image_masks(ex)
            if masks is None:
                continue
            n += 1
            for concept, m in masks.items():
                if concept not in self.sizes and concept != BACKGROUND and m.any():
                    present[concept] += 1
                    area[concept] += int(m.sum())
        if not present:
            return None, "no annotated object in the top images"
        ranked = sorted(present, key=lambda c: (-present[c], -area[c], " " in c, c))
        raw = "present in " + ", ".join(f"{c}={present[c]}/{n}" for c in ranked[:5])
        best = ranked[0]
        return (best if present[best] >= WHOLE_MIN_SHARE * n else None), raw

    def textual(self, examples: Sequence[ExplainExample]) -> tuple[str | None, str]:
        peaks = [ex.peak_token.strip().lower() for ex in examples if ex.peak_token and ex.peak_token.strip()]
        if not peaks:
            return None, "no peak tokens"
        counts = Counter(peaks)
        word, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        share = n / len(peaks)
        base = self.word_share.get(word, 0.0)
        enrichment = share / base if base > 0 else float("inf")
        raw = f"peak words {dict(counts.most_common(5))}; {word!r} share {share:.2f}, enrichment {enrichment:.1f}"
        ok = share >= 0.5 and enrichment >= self.cfg.min_enrichment
        return (word if ok else None), raw


def word_shares(tokens: pl.DataFrame, display: list[str] | None = None) -> dict[str, float]:
    """Share of each (lower-cased, stripped) word among non-template text tokens."""
    text = tokens.filter((pl.col("modality") == "text") & (pl.col("role").fill_null("") != "template"))
    words = display if display is not None else text["token"].to_list()
    counts = Counter(w.strip().lower() for w in words if w and w.strip())
    total = sum(counts.values())
    return {w: c / total for w, c in counts.items()} if total else {}
