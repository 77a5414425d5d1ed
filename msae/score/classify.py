"""Modality labels from alignment scores: visual, textual, multimodal, mixed or none.

Rule (thresholds from ``scores``): a latent's visual concept is *aligned* when its visual score
≥ ``visual_threshold``, its textual concept when its textual score ≥ ``textual_threshold``. Both
scores are AUROCs against random controls (``msae.score.quality``): 0.5 is chance, so a threshold
says how much better than random examples the concept must describe the latent's own.

* both aligned and the concepts agree (``quality.concepts_agree``) → ``multimodal``
* both aligned but they name different things → ``mixed`` (the latent answers to two concepts)
* only the visual → ``visual``; only the textual → ``textual``; neither (or no concept) → ``none``
"""

from __future__ import annotations

import polars as pl

LABELS = ("visual", "textual", "multimodal", "mixed", "none")


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
