"""Classification metrics and bootstrap intervals for the report (pure functions, numpy + polars).

Classification: labels are strings (``visual``, ``textual``, …). F1 of a class is
``2·TP / (2·TP + FP + FN)``: defined whenever the class occurs in the truth *or* the predictions
(a class predicted but never true, or true but never predicted, scores 0 — sklearn's
``zero_division=0``). A class absent from both has no F1 and is left out of the macro average
instead of counting as 0 or 1: whether the ground truth happens to contain, say, no ``mixed``
latent at this threshold should not move the score. This is what sklearn's
``f1_score(average="macro")`` does without an explicit ``labels`` list.

Intervals: percentile bootstrap over latents (seeded, so a report is reproducible). The
masked-vs-whole gain resamples *paired* indices: both modes are scored on the same latents, and
pairing removes the between-latent variance from the comparison. NaNs (a latent without a score)
are dropped — in the paired case, the whole pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import polars as pl

Labels = Sequence[str] | pl.Series | np.ndarray


def _as_list(y: Labels, what: str) -> list[str]:
    values = y.to_list() if isinstance(y, pl.Series) else list(np.asarray(y, dtype=object).ravel())
    if any(v is None for v in values):
        raise ValueError(f"{what} holds nulls: label every latent (e.g. 'none') before scoring")
    return [str(v) for v in values]


def _pair(y_true: Labels, y_pred: Labels) -> tuple[list[str], list[str]]:
    t, p = _as_list(y_true, "y_true"), _as_list(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} labels but y_pred has {len(p)}")
    return t, p


def _counts(t: list[str], p: list[str], labels: Sequence[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted((set(t) | set(p)) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in {list(labels)}")
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    if t:
        np.add.at(m, (np.array([index[v] for v in t]), np.array([index[v] for v in p])), 1)
    return m


def confusion(y_true: Labels, y_pred: Labels, labels: Sequence[str]) -> pl.DataFrame:
    """Counts with one row per true label (column ``true``) and one column per predicted label."""
    t, p = _pair(y_true, y_pred)
    m = _counts(t, p, labels)
    return pl.DataFrame({"true": list(labels), **{lab: m[:, j] for j, lab in enumerate(labels)}})


def accuracy(y_true: Labels, y_pred: Labels) -> float:
    """Share of equal labels (NaN for no labels)."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean([a == b for a, b in zip(t, p)])) if t else float("nan")


def per_class_f1(y_true: Labels, y_pred: Labels, labels: Sequence[str]) -> pl.DataFrame:
    """Per label: support (true count), predicted count, precision, recall, F1.

    Precision / recall are NaN where undefined (never predicted / never true); F1 follows the module
    doc (0 when the class occurs on one side only, NaN when on neither).
    """
    t, p = _pair(y_true, y_pred)
    m = _counts(t, p, labels).astype(np.float64)
    tp = np.diag(m)
    support, predicted = m.sum(axis=1), m.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        denom = support + predicted  # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    return pl.DataFrame({"label": list(labels), "support": support.astype(np.int64),
                         "predicted": predicted.astype(np.int64), "precision": precision, "recall": recall,
                         "f1": f1})


def macro_f1(y_true: Labels, y_pred: Labels, labels: Sequence[str]) -> float:
    """Mean F1 over the labels that occur in the truth or the predictions (module doc)."""
    f1 = per_class_f1(y_true, y_pred, labels)["f1"].to_numpy()
    f1 = f1[~np.isnan(f1)]
    return float(f1.mean()) if len(f1) else float("nan")


# --- bootstrap ------------------------------------------------------------------------------------
def _resampled_stat(x: np.ndarray, idx: np.ndarray, stat: Callable[..., Any]) -> np.ndarray:
    """``stat`` of each resample (rows of ``idx``); vectorised when ``stat`` takes ``axis``."""
    samples = x[idx]
    try:
        out = np.asarray(stat(samples, axis=1), dtype=np.float64)
        if out.shape == (len(idx),):
            return out
    except TypeError:
        pass
    return np.array([stat(s) for s in samples], dtype=np.float64)


def bootstrap_ci(values: Sequence[float] | np.ndarray, stat: Callable[..., Any] = np.mean, n: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(stat of the values, lower, upper) — percentile bootstrap with ``n`` seeded resamples.

    NaNs are dropped first; no values → three NaNs.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if not len(x):
        return float("nan"), float("nan"), float("nan")
    point = float(stat(x))
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n, len(x)))
    boot = _resampled_stat(x, idx, stat)
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(boot, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)


def paired_relative_gain(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n: int = 1000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(gain %, lower, upper) with gain = (mean(a) − mean(b)) / mean(b) · 100 over paired values.

    ``a[i]`` and ``b[i]`` belong to the same latent (e.g. masked vs whole prompting); the bootstrap
    draws latents, keeping each pair together. Pairs with a NaN are dropped; resamples with
    mean(b) = 0 are ignored; no pairs or mean(b) = 0 → NaN.
    """
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if not len(x) or y.mean() == 0:
        return float("nan"), float("nan"), float("nan")
    point = float((x.mean() - y.mean()) / y.mean() * 100)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n, len(x)))
    mx, my = x[idx].mean(axis=1), y[idx].mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = np.where(my != 0, (mx - my) / my * 100, np.nan)
    if np.isnan(gain).all():
        return point, float("nan"), float("nan")
    alpha = (1.0 - level) / 2
    lo, hi = np.nanquantile(gain, [alpha, 1.0 - alpha])
    return point, float(lo), float(hi)


__all__ = ["accuracy", "bootstrap_ci", "confusion", "macro_f1", "paired_relative_gain", "per_class_f1"]
