"""Modality labels from alignment scores: visual, textual, multimodal, mixed or none.

Rule (thresholds from ``scores``): a latent's visual concept is *aligned* when its visual score
≥ ``visual_threshold``, its textual concept when its textual score ≥ ``textual_threshold``. Both
scores are AUROCs against random controls (``msae.score.quality``): 0.5 is chance, so a threshold
says how much better than random examples the concept must describe the latent's own.

A *population gate* (:class:`PopulationGate`, from ``scores.visual_population_threshold``,
``scores.textual_population_threshold``, ``scores.textual_coverage_threshold``,
``scores.textual_precision_threshold`` and ``scores.population_min_positives``) can further require
the concept to *detect* where the latent fires across the dataset (``msae.score.population``): its
population AUROC at least the threshold, over at least the minimum number of firing items — or, for
text, its coverage AUROC at least its threshold over at least that many tokens showing the concept,
or the share of its strong tokens that show the concept (precision) at least its threshold over at
least that many strong tokens. A threshold of 0 turns that route off; a modality with every route
off is not gated. The contrast alone asks whether the concept describes the latent's top examples;
the gate asks whether the latent is selective for it.

Coverage alone (``scores.textual_coverage_alone_threshold``) is a second way for the textual concept
to be aligned, without the contrast: its coverage AUROC over the population at least the threshold
over at least ``population_min_positives`` tokens showing it. A latent that fires on nearly every
"and", weakly, and hardest on other tokens has top texts that peak elsewhere; the contrast on them
cannot see "and", the coverage over every token can.

* both aligned and the concepts agree (``quality.concepts_agree``) → ``multimodal``
* both aligned but they name different things → ``mixed`` (the latent answers to two concepts)
* only the visual → ``visual``; only the textual → ``textual``; neither (or no concept) → ``none``

Labelling is the cheap step after alignment scoring (:func:`label_frame`): it reads only the score
frame and :data:`LABEL_FIELDS`, so a threshold edit relabels stored scores instead of embedding
every top image again (``msae.score.stage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import polars as pl

from msae.score.quality import concepts_agree, normalise_concept

LABELS = ("visual", "textual", "multimodal", "mixed", "none")
LABEL_FIELDS = frozenset({"visual_threshold", "textual_threshold", "agreement", "visual_population_threshold",
                          "textual_population_threshold", "textual_coverage_threshold", "textual_precision_threshold",
                          "textual_coverage_alone_threshold", "population_min_positives"})
"""The ``scores`` fields that decide labels (``concepts_agree``, ``modality``) and nothing else."""
LABEL_COLUMNS = ("concepts_agree", "modality")
"""Columns :func:`label_frame` adds to a score frame."""


def classify(visual_score: float | None, textual_score: float | None, agree: bool, visual_threshold: float,
             textual_threshold: float) -> str:
    """One latent's label by the contrast thresholds alone (no population gate: :func:`classify_frame`)."""
    v = visual_score is not None and visual_score >= visual_threshold
    t = textual_score is not None and textual_score >= textual_threshold
    if v and t:
        return "multimodal" if agree else "mixed"
    return "visual" if v else "textual" if t else "none"


@dataclass(frozen=True)
class PopulationGate:
    """Population-detection requirements of the label rule (module doc); 0 turns a modality's off."""

    visual: float = 0.0
    textual: float = 0.0
    min_positives: int = 1
    textual_coverage: float = 0.0
    textual_precision: float = 0.0
    textual_coverage_alone: float = 0.0
    """Not a gate but a route around the contrast: coverage at least this aligns the textual concept
    by itself (0: off)."""

    @classmethod
    def from_scores(cls, scores: Any) -> PopulationGate:
        return cls(scores.visual_population_threshold, scores.textual_population_threshold,
                   scores.population_min_positives, scores.textual_coverage_threshold,
                   scores.textual_precision_threshold, scores.textual_coverage_alone_threshold)

    def coverage_alone(self) -> pl.Expr:
        """Row-wise: the textual concept is aligned by its coverage alone (module doc)."""
        if self.textual_coverage_alone <= 0:
            return pl.lit(False)
        return ((pl.col("textual_population_coverage").fill_null(float("-inf")) >= self.textual_coverage_alone)
                & (pl.col("textual_population_matches").fill_null(0) >= self.min_positives)
                & pl.col("textual_concept").is_not_null())

    def passes(self, kind: str) -> pl.Expr:
        """Row-wise: the ``kind`` (visual / textual) concept passes the gate."""
        threshold = self.visual if kind == "visual" else self.textual
        cover = self.textual_coverage if kind == "textual" else 0.0
        precision = self.textual_precision if kind == "textual" else 0.0
        if threshold <= 0 and cover <= 0 and precision <= 0:
            return pl.lit(True)
        ok = pl.lit(False)
        if threshold > 0:
            ok = ok | ((pl.col(f"{kind}_population_auroc").fill_null(float("-inf")) >= threshold)
                       & (pl.col(f"{kind}_population_positives").fill_null(0) >= self.min_positives))
        if cover > 0:
            ok = ok | ((pl.col("textual_population_coverage").fill_null(float("-inf")) >= cover)
                       & (pl.col("textual_population_matches").fill_null(0) >= self.min_positives))
        if precision > 0:
            ok = ok | ((pl.col("textual_population_precision").fill_null(float("-inf")) >= precision)
                       & (pl.col("textual_population_positives").fill_null(0) >= self.min_positives))
        return ok


def classify_frame(frame: pl.DataFrame, visual_threshold: float, textual_threshold: float,
                   gate: PopulationGate | None = None) -> pl.Series:
    """Label every row of a frame with columns visual_score, textual_score, concepts_agree (and,
    with a gate, the ``*_population_auroc`` / ``*_population_positives`` columns)."""
    gate = gate or PopulationGate()
    v = (pl.col("visual_score").fill_null(float("-inf")) >= visual_threshold) & gate.passes("visual")
    t = ((pl.col("textual_score").fill_null(float("-inf")) >= textual_threshold) & gate.passes("textual")) \
        | gate.coverage_alone()
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
    return labelled.with_columns(classify_frame(labelled, scores.visual_threshold, scores.textual_threshold,
                                                PopulationGate.from_scores(scores)).alias("modality"))
