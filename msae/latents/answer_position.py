"""Each sample's *answer position*: the one template token that is text evidence in its own right.

The token right before the answer (the ":" of "assistant :", or the generation prompt's last
token when there is no answer) is where a VLM computes its answer, so SAE latents specialise on it.
It is a template token, so the evidence would otherwise never show it, and its own piece (":")
reads as punctuation. msae therefore treats it as eligible text everywhere — latent statistics,
explainer evidence, population detection, ground truth — under one display name,
:data:`ANSWER_POSITION`, so that a latent firing there can be named, scored and checked like any
word. This module is the single owner of which row that is (from token roles only).
"""

from __future__ import annotations

import numpy as np
import polars as pl

ANSWER_POSITION = "<answer position>"
"""The display name (word, concept) of every answer-position token."""


def answer_position_rows(tokens: pl.DataFrame) -> np.ndarray:
    """bool [rows]: each sample's answer position — its last non-image token before the first
    ``answer``-role token, or its last non-image token when it has no answer tokens (the
    generation prompt's end). ``tokens``: columns ``sample_id``, ``position``, ``modality``, ``role``
    (tokens.parquet or any slice of whole samples)."""
    t = tokens.select("sample_id", "position", "modality", "role").with_row_index("_row").with_columns(
        pl.col("position").filter(pl.col("role") == "answer").min().over("sample_id").alias("_answer"))
    cand = t.filter((pl.col("modality").fill_null("") != "image")
                    & (pl.col("_answer").is_null() | (pl.col("position") < pl.col("_answer"))))
    rows = cand.group_by("sample_id").agg(pl.col("_row").sort_by("position").last())["_row"].to_numpy()
    out = np.zeros(tokens.height, dtype=bool)
    out[rows.astype(np.int64)] = True
    return out


def display_words(display: list[str], is_answer_position: np.ndarray) -> list[str]:
    """Display strings with every answer position shown as :data:`ANSWER_POSITION` (its leading
    whitespace kept, so joined text still reads)."""
    return [(d[: len(d) - len(d.lstrip())] + ANSWER_POSITION) if a else d
            for d, a in zip(display, is_answer_position, strict=True)]


__all__ = ["ANSWER_POSITION", "answer_position_rows", "display_words"]
