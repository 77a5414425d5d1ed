"""Label metrics with bootstrap intervals, concept matching and paired differences for the report.

Every interval is a seeded percentile bootstrap over latents (``n`` resamples, 95 %): latents are
what the labels describe, so they are the unit resampled. The resampling is vectorised through
confusion counts (one ``bincount`` for all resamples), and every method of a partition is scored
on the *same* resampled latent sets (same seed), so their intervals are comparable. Macro-F1
follows :mod:`msae.score.metrics` (mean F1 over the classes present in the truth or the
predictions of that resample; sklearn's ``f1_score(average="macro")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from msae.score.metrics import bootstrap_ci


def _codes(values: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({str(v) for v in values} - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not in {list(labels)}")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def label_scores(truth: np.ndarray, pred: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy [B], macro-F1 [B]) of label codes ``truth`` / ``pred`` [B, N] (one row per resample)."""
    t, p = np.atleast_2d(truth), np.atleast_2d(pred)
    b, n = t.shape
    L = n_labels
    flat = (np.arange(b)[:, None] * L * L + t * L + p).ravel()
    cm = np.bincount(flat, minlength=b * L * L).reshape(b, L, L).astype(np.float64)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denom = cm.sum(axis=2) + cm.sum(axis=1)  # support + predicted = 2TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
        present = ~np.isnan(f1)
        macro = np.where(present.any(axis=1), np.where(present, f1, 0.0).sum(axis=1) / present.sum(axis=1), np.nan)
        acc = tp.sum(axis=1) / n if n else np.full(b, np.nan)
    return acc, macro


def label_metrics(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str], n: int = 1000, seed: int = 0,
                  level: float = 0.95, ci: bool = True) -> dict[str, Any]:
    """Accuracy and macro-F1 of ``pred`` against ``truth`` with percentile-bootstrap intervals:
    ``{"n", "accuracy", "accuracy_ci": [lo, hi], "macro_f1", "macro_f1_ci": [lo, hi]}`` (NaN for no
    latents; no ``*_ci`` keys when ``ci`` is off)."""
    t, p = _codes(truth, labels), _codes(pred, labels)
    if len(t) != len(p):
        raise ValueError(f"truth has {len(t)} labels but pred has {len(p)}")
    out: dict[str, Any] = {"n": len(t)}
    if not len(t):
        out |= {"accuracy": float("nan"), "macro_f1": float("nan")}
        return out | ({"accuracy_ci": [float("nan")] * 2, "macro_f1_ci": [float("nan")] * 2} if ci else {})
    acc, f1 = label_scores(t, p, len(labels))
    out |= {"accuracy": float(acc[0]), "macro_f1": float(f1[0])}
    if ci:
        idx = np.random.default_rng(seed).integers(0, len(t), size=(n, len(t)))
        b_acc, b_f1 = label_scores(t[idx], p[idx], len(labels))
        q = [(1 - level) / 2, 1 - (1 - level) / 2]
        out["accuracy_ci"] = [float(x) for x in np.nanquantile(b_acc, q)]
        out["macro_f1_ci"] = [float(x) for x in np.nanquantile(b_f1, q)]
    return out


# --- concepts ------------------------------------------------------------------------------------
def _words(text: str) -> set[str]:
    from msae.score.quality import normalise_concept

    return set(normalise_concept(text).split())


def concept_exact(proposed: str | None, truth: str | None) -> bool:
    """The proposal is the ground-truth concept after normalisation (case, spaces, trailing
    punctuation: :func:`msae.score.quality.normalise_concept`)."""
    from msae.score.quality import normalise_concept

    return bool(proposed and truth) and normalise_concept(proposed) == normalise_concept(truth)


def concept_partial(proposed: str | None, truth: str | None) -> bool:
    """The proposal shares a word with the ground-truth concept ("red" for "red circle")."""
    return bool(proposed and truth) and bool(_words(proposed) & _words(truth))


def concept_match(pairs: Sequence[tuple[str | None, str | None]], n: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Exact and partial match rates over (proposed, ground-truth) pairs, each [rate, lo, hi]."""
    exact = [float(concept_exact(p, t)) for p, t in pairs]
    partial = [float(concept_partial(p, t)) for p, t in pairs]
    return {"n": len(pairs), "exact": list(bootstrap_ci(exact, n=n, seed=seed)),
            "partial": list(bootstrap_ci(partial, n=n, seed=seed))}


# --- paired scores -------------------------------------------------------------------------------
def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n: int = 1000,
                      seed: int = 0) -> list[float]:
    """[mean(a − b), lo, hi] over pairs without NaN; the bootstrap draws pairs (latents)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    return list(bootstrap_ci(x - y, n=n, seed=seed))


def mean_ci(values: Sequence[float] | np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """[mean, lo, hi] (NaN dropped)."""
    return list(bootstrap_ci(np.asarray(values, dtype=np.float64), n=n, seed=seed))


__all__ = ["concept_exact", "concept_match", "concept_partial", "label_metrics", "label_scores", "mean_ci",
           "paired_difference"]
