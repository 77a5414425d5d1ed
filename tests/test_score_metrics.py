"""Classification metrics against sklearn, bootstrap intervals, and the activation-only baselines."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from msae.score.baselines import modality_score_labels, selectivity_labels
from msae.score.metrics import (accuracy, bootstrap_ci, confusion, macro_f1, paired_relative_gain,
                                per_class_f1)

LABELS = ["visual", "textual", "multimodal", "mixed", "none"]


def _random_labels(seed: int, n: int, pool: list[str]) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    return rng.choice(pool, n).tolist(), rng.choice(pool, n).tolist()


def test_confusion_and_accuracy():
    t = ["visual", "visual", "textual", "none", "mixed"]
    p = ["visual", "textual", "textual", "visual", "mixed"]
    m = confusion(t, p, LABELS)
    assert m.columns == ["true", *LABELS]
    assert m["true"].to_list() == LABELS
    assert m.filter(pl.col("true") == "visual").row(0)[1:] == (1, 1, 0, 0, 0)
    assert m.filter(pl.col("true") == "none")["visual"].item() == 1
    assert int(m.select(LABELS).sum_horizontal().sum()) == len(t)
    assert accuracy(t, p) == pytest.approx(3 / 5)
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="not in"):
        confusion(["visual"], ["other"], LABELS)
    with pytest.raises(ValueError, match="nulls"):
        confusion(pl.Series(["visual", None]), ["visual", "none"], LABELS)
    with pytest.raises(ValueError, match="labels but"):
        accuracy(["visual"], ["visual", "none"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    # "mixed" absent from both sides, "multimodal" only predicted sometimes: exercised exclusions
    t, p = _random_labels(seed, 60, ["visual", "textual", "none"])
    p[:7] = ["multimodal"] * 7
    assert macro_f1(t, p, LABELS) == pytest.approx(metrics.f1_score(t, p, average="macro", zero_division=0))
    per = per_class_f1(t, p, LABELS)
    assert math.isnan(per.filter(pl.col("label") == "mixed")["f1"].item())
    assert per.filter(pl.col("label") == "multimodal")["f1"].item() == 0.0
    ref = metrics.f1_score(t, p, labels=["visual", "textual", "none"], average=None, zero_division=0)
    got = per.filter(pl.col("label").is_in(["visual", "textual", "none"]))
    np.testing.assert_allclose(got["f1"].to_numpy(), ref)
    assert accuracy(np.array(t), pl.Series(p)) == pytest.approx(metrics.accuracy_score(t, p))


def test_macro_f1_edge_cases():
    assert macro_f1(["visual"], ["visual"], LABELS) == 1.0
    assert math.isnan(macro_f1([], [], LABELS))


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 200)
    point, lo, hi = bootstrap_ci(x, n=500, seed=3)
    assert point == pytest.approx(x.mean())
    assert lo < point < hi
    assert 0.15 < hi - lo < 0.4  # ≈ 2·1.96·σ/√n = 0.28
    assert bootstrap_ci(x, n=500, seed=3) == (point, lo, hi)
    assert bootstrap_ci(x, n=500, seed=4) != (point, lo, hi)
    # a stat without `axis`, NaNs dropped
    med = bootstrap_ci(np.append(x, np.nan), stat=lambda v: float(np.median(v)), n=200, seed=0)
    assert med[0] == pytest.approx(np.median(x)) and med[1] <= med[0] <= med[2]
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan]))
    narrow = bootstrap_ci(x, n=500, seed=3, level=0.5)
    assert lo < narrow[1] < narrow[2] < hi


def test_paired_relative_gain():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.2, 0.6, 300)
    a = 1.45 * b  # masked beats whole by 45 % on every latent
    gain, lo, hi = paired_relative_gain(a, b, n=500, seed=0)
    assert gain == pytest.approx(45.0)
    assert lo == pytest.approx(45.0) and hi == pytest.approx(45.0)  # pairing: no between-latent noise
    noisy = a + rng.normal(0, 0.05, 300)
    g, lo, hi = paired_relative_gain(noisy, b, n=500, seed=0)
    assert lo < g < hi and lo > 30
    assert paired_relative_gain(noisy, b, n=500, seed=0) == (g, lo, hi)
    g2 = paired_relative_gain(b, a, n=200, seed=0)
    assert g2[0] == pytest.approx((1 / 1.45 - 1) * 100) and g2[2] < 0
    # NaN pairs dropped whole
    a_nan, b_nan = np.append(a, [np.nan, 5.0]), np.append(b, [1.0, np.nan])
    assert paired_relative_gain(a_nan, b_nan, n=50)[0] == pytest.approx(45.0)
    assert all(math.isnan(v) for v in paired_relative_gain([1.0], [0.0]))
    with pytest.raises(ValueError):
        paired_relative_gain([1.0, 2.0], [1.0])


def test_baselines():
    stats = pl.DataFrame({
        "latent": [0, 1, 2, 3, 4, 5],
        "dead": [False, False, False, True, False, False],
        "modality_score": [0.9, 0.1, 0.5, float("nan"), float("nan"), 0.75],
        "selectivity": [0.8, -0.9, 0.0, None, float("nan"), -0.5],
    })
    assert modality_score_labels(stats).to_list() == ["visual", "textual", "multimodal", "none", "none", "visual"]
    assert selectivity_labels(stats).to_list() == ["visual", "textual", "multimodal", "none", "none", "textual"]
    assert selectivity_labels(stats, cut=0.85).to_list() == ["multimodal", "textual", "multimodal", "none",
                                                             "none", "multimodal"]
    assert modality_score_labels(stats, high=0.95, low=0.05)[0] == "multimodal"
    with pytest.raises(ValueError):
        modality_score_labels(stats, high=0.2, low=0.8)
    with pytest.raises(ValueError):
        selectivity_labels(stats, cut=1.5)
