"""Modality labels from alignment scores: visual, textual, multimodal, mixed or none.

Rule (thresholds from ``scores``): a latent's visual concept is *aligned* when its visual score
≥ ``visual_threshold``, its textual concept when its textual score ≥ ``textual_threshold``. Both
scores are AUROCs against random controls (``msae.score.quality``): 0.5 is chance, so a threshold
says how much better than random examples the concept must describe the latent's own.

* both aligned and the concepts agree (``quality.concepts_agree``) → ``multimodal``
* both aligned but they name different things → ``mixed`` (the latent answers to two concepts)
* only the visual → ``visual``; only the textual → ``textual``; neither (or no concept) → ``none``

Labelling is the cheap step after alignment scoring (:func:`label_frame`): it reads only the score
frame and :data:`LABEL_FIELDS`, so a threshold edit relabels stored scores instead of embedding
every top image again (``msae.score.stage``).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from msae.score.quality import concepts_agree, normalise_concept

LABELS = ("visual", "textual", "multimodal", "mixed", "none")
LABEL_FIELDS = frozenset({"visual_threshold", "textual_threshold", "agreement"})
"""The ``scores`` fields that decide labels (``concepts_agree``, ``modality``) and nothing else."""
LABEL_COLUMNS = ("concepts_agree", "modality")
"""Columns :func:`label_frame` adds to a score frame."""


def classify(visual_score: float | None, textual_score: float | None, agree: bool, visual_threshold: float,
             textual_threshold: float) -> str:
    v = visual_score is not None and visual_score >= visual_threshold
    t = textual_score is not None and textual_score >= textual_threshold
    if v and t:
        return "multimodal" if agree else "mixed"
    return "visual" if v else "textual" if t else "none"


def classify_frame(frame: pl.DataFrame, visual_threshold: float, textual_threshold: float) -> pl.Series:
    """Label every row of a frame with columns visual_score, textual_score, concepts_agree."""
    v = pl.col("visual_score").fill_null(float("-inf")) >= visual_threshold
    t = pl.col("textual_score").fill_null(float("-inf")) >= textual_threshold
    agree = pl.col("concepts_agree").fill_null(False)
    expr = (pl.when(v & t & agree).then(pl.lit("multimodal")).when(v & t).then(pl.lit("mixed"))
            .when(v).then(pl.lit("visual")).when(t).then(pl.lit("textual")).otherwise(pl.lit("none")))
    return frame.select(expr.alias("modality")).to_series()


def agreement_column(frame: pl.DataFrame, agreement: float) -> pl.Series:
    """``concepts_agree`` of every row, from its concepts and their text-embedding cosine."""
    def norm(c: str | None) -> str | None:
        return normalise_concept(c) if c else None

    values = [concepts_agree(norm(v), norm(t), cos, agreement) for v, t, cos in
              zip(frame["visual_concept"].to_list(), frame["textual_concept"].to_list(),
                  frame["concept_cosine"].to_list())]
    return pl.Series("concepts_agree", values, dtype=pl.Boolean)


def label_frame(frame: pl.DataFrame, scores: Any) -> pl.DataFrame:
    """A score frame (no :data:`LABEL_COLUMNS`) with its labels: ``concepts_agree`` right after
    ``concept_cosine`` and ``modality`` last, the column order ``concepts.parquet`` has always had.

    ``scores``: a :class:`msae.config.ScoresConfig` (only :data:`LABEL_FIELDS` are read)."""
    cols = frame.columns
    at = cols.index("concept_cosine") + 1
    labelled = frame.with_columns(agreement_column(frame, scores.agreement)).select(
        [*cols[:at], "concepts_agree", *cols[at:]])
    return labelled.with_columns(classify_frame(labelled, scores.visual_threshold,
                                                scores.textual_threshold).alias("modality"))
