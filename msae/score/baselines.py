"""Activation-only modality baselines, labelled on the same scale as the ground truth.

They read ``stats.parquet`` of the ``latent_stats`` stage (``docs/formats.md``) and never look at
concepts, so they show what the concept-based labels add: none can say ``mixed`` (a latent
answering to two different things), and none can tell a latent firing on image *and* text tokens
for the same concept (``multimodal``) from one firing on both for unrelated reasons.

* Modality Score (Papadimitriou et al. 2025): ``mean_image / (mean_image + mean_text)``, mean
  activation over all tokens of each modality; ≥ ``high`` visual, ≤ ``low`` textual, in between
  multimodal.
* Selectivity: ``(freq_image − freq_text) / (freq_image + freq_text)`` ∈ [−1, 1], on firing
  frequencies instead of magnitudes; ≥ ``cut`` visual, ≤ −``cut`` textual, in between multimodal.
* Firing-ratio census (the density-normalised census published for the 131k-latent LLaVA-NeXT
  SAE): ``r = freq_image / (freq_image + freq_text)``, the share of the latent's firing mass on
  image tokens once each modality's firings are divided by its token count (an image-heavy
  sequence does not make every latent look visual). Image-specific when ``r > 0.8``,
  text-specific when ``r < 0.2``, shared in between. Mapped onto our labels as image-specific →
  ``visual``, text-specific → ``textual``, shared → ``multimodal`` (the census's "shared" is our
  closest class; it cannot say ``mixed``). It is selectivity with ``cut = 0.6`` (``r = (s + 1) / 2``)
  but with strict inequalities, as published.
* Majority labeller: every latent gets the ground truth's most frequent class (ties: the first in
  :data:`msae.score.classify.LABELS` order). It reads the ground truth it is scored against, so it
  is the trivial bar — a labeller that cannot beat it has learnt nothing about any latent.

Dead latents, and rows whose score is NaN or null (nothing fired), are ``none``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import polars as pl

from msae.score.classify import LABELS

FIRING_RATIO_IMAGE = 0.8
"""Firing-ratio census: image-specific above this share of (density-normalised) firing mass."""
FIRING_RATIO_TEXT = 0.2
"""Firing-ratio census: text-specific below it."""
FIRING_RATIO_MAP = {"image-specific": "visual", "text-specific": "textual", "shared": "multimodal"}
"""Firing-ratio census classes → our labels (module doc)."""


def _dead(stats: pl.DataFrame) -> pl.Expr:
    return pl.col("dead").fill_null(False) if "dead" in stats.columns else pl.lit(False)


def _three_way(stats: pl.DataFrame, column: str, high: float, low: float, name: str) -> pl.Series:
    score = pl.col(column).cast(pl.Float64)
    missing = score.is_null() | score.is_nan()
    expr = (pl.when(_dead(stats) | missing).then(pl.lit("none"))
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


def firing_ratio(stats: pl.DataFrame) -> pl.Series:
    """Density-normalised image share of firing, ``freq_image / (freq_image + freq_text)`` (NaN when
    the latent never fired)."""
    fi, ft = pl.col("freq_image").cast(pl.Float64), pl.col("freq_text").cast(pl.Float64)
    total = fi + ft
    return stats.select(pl.when(total > 0).then(fi / total).otherwise(float("nan")).alias("firing_ratio")).to_series()


def firing_ratio_census(stats: pl.DataFrame, image: float = FIRING_RATIO_IMAGE,
                        text: float = FIRING_RATIO_TEXT) -> pl.Series:
    """The published census class per row: ``image-specific``, ``text-specific``, ``shared``, or
    ``dead`` (dead or never fired)."""
    if not 0.0 <= text <= image <= 1.0:
        raise ValueError(f"need 0 <= text ({text}) <= image ({image}) <= 1")
    r = pl.col("firing_ratio")
    frame = stats.with_columns(firing_ratio(stats))
    expr = (pl.when(_dead(stats) | r.is_nan() | r.is_null()).then(pl.lit("dead"))
            .when(r > image).then(pl.lit("image-specific"))
            .when(r < text).then(pl.lit("text-specific"))
            .otherwise(pl.lit("shared")))
    return frame.select(expr.alias("firing_ratio_census")).to_series()


def firing_ratio_labels(stats: pl.DataFrame, image: float = FIRING_RATIO_IMAGE,
                        text: float = FIRING_RATIO_TEXT) -> pl.Series:
    """The firing-ratio census mapped onto our labels (:data:`FIRING_RATIO_MAP`; dead → none)."""
    census = firing_ratio_census(stats, image, text)
    return census.replace_strict({**FIRING_RATIO_MAP, "dead": "none"}, return_dtype=pl.Utf8).alias(
        "firing_ratio_label")


def majority_label(truth: Sequence[str] | pl.Series) -> str:
    """The most frequent ground-truth class (ties: first in LABELS order; no latents: ``none``)."""
    counts = Counter(truth.to_list() if isinstance(truth, pl.Series) else list(truth))
    if not counts:
        return "none"
    top = max(counts.values())
    return next(lab for lab in (*LABELS, *sorted(counts)) if counts.get(lab, 0) == top)


def majority_labels(truth: Sequence[str] | pl.Series) -> pl.Series:
    """Every latent labelled with :func:`majority_label` of ``truth`` (aligned with it)."""
    n = len(truth)
    return pl.Series("majority_label", [majority_label(truth)] * n, dtype=pl.Utf8)


__all__ = ["FIRING_RATIO_IMAGE", "FIRING_RATIO_MAP", "FIRING_RATIO_TEXT", "firing_ratio", "firing_ratio_census",
           "firing_ratio_labels", "majority_label", "majority_labels", "modality_score_labels", "selectivity_labels"]
