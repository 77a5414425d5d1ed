"""Activation-only modality baselines, labelled on the same scale as the ground truth.

Both read ``stats.parquet`` of the ``latent_stats`` stage (``docs/formats.md``) and never look at
concepts, so they show what the concept-based labels add: neither can say ``mixed`` (a latent
answering to two different things), and neither can tell a latent firing on image *and* text
tokens for the same concept (``multimodal``) from one firing on both for unrelated reasons.

* Modality Score (Papadimitriou et al. 2025): ``mean_image / (mean_image + mean_text)``, mean
  activation over all tokens of each modality; ≥ ``high`` visual, ≤ ``low`` textual, in between
  multimodal.
* Selectivity: ``(freq_image − freq_text) / (freq_image + freq_text)`` ∈ [−1, 1], on firing
  frequencies instead of magnitudes; ≥ ``cut`` visual, ≤ −``cut`` textual, in between multimodal.

Dead latents, and rows whose score is NaN or null (nothing fired), are ``none``.
"""

from __future__ import annotations

import polars as pl


def _three_way(stats: pl.DataFrame, column: str, high: float, low: float, name: str) -> pl.Series:
    score = pl.col(column).cast(pl.Float64)
    dead = pl.col("dead").fill_null(False) if "dead" in stats.columns else pl.lit(False)
    missing = score.is_null() | score.is_nan()
    expr = (pl.when(dead | missing).then(pl.lit("none"))
            .when(score >= high).then(pl.lit("visual"))
            .when(score <= low).then(pl.lit("textual"))
            .otherwise(pl.lit("multimodal")))
    return stats.select(expr.alias(name)).to_series()


def modality_score_labels(stats: pl.DataFrame, high: float = 0.75, low: float = 0.25) -> pl.Series:
    """Modality Score baseline label per row of ``stats`` (module doc); aligned with its rows."""
    if not low <= high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    return _three_way(stats, "modality_score", high, low, "modality_score_label")


def selectivity_labels(stats: pl.DataFrame, cut: float = 0.5) -> pl.Series:
    """Frequency-selectivity baseline label per row of ``stats`` (module doc); aligned with its rows."""
    if not 0.0 <= cut <= 1.0:
        raise ValueError(f"cut must be in [0, 1], got {cut}")
    return _three_way(stats, "selectivity", cut, -cut, "selectivity_label")


__all__ = ["modality_score_labels", "selectivity_labels"]
