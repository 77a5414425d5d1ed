"""The report's evaluation: label metrics and their bootstrap intervals (against sklearn), the
firing-ratio census and the majority labeller, concept matching, and the whole report built on a
hand-made store with and without a random-SAE control partition."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from msae.config import parse_config
from msae.report.build import build_report, method_rows
from msae.report.evaluation import (concept_exact, concept_match, concept_partial, label_metrics, label_scores,
                                    paired_difference)
from msae.score.baselines import (firing_ratio, firing_ratio_census, firing_ratio_labels, majority_label,
                                  majority_labels, selectivity_labels)
from msae.score.classify import LABELS
from msae.score.metrics import macro_f1


# --- label metrics --------------------------------------------------------------------------------
def _labels(seed: int, n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    truth = rng.choice(["visual", "textual", "multimodal", "none"], size=n, p=[0.2, 0.1, 0.1, 0.6]).tolist()
    pred = [t if rng.random() < 0.6 else str(rng.choice(LABELS)) for t in truth]
    return truth, pred


def test_label_metrics_match_sklearn_and_a_plain_bootstrap():
    metrics = pytest.importorskip("sklearn.metrics")
    truth, pred = _labels(0, 150)
    m = label_metrics(truth, pred, LABELS, n=300, seed=3)
    assert m["n"] == 150
    assert m["macro_f1"] == pytest.approx(metrics.f1_score(truth, pred, average="macro"), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(macro_f1(truth, pred, LABELS), abs=1e-12)
    assert m["accuracy"] == pytest.approx(metrics.accuracy_score(truth, pred), abs=1e-12)
    # the vectorised bootstrap = sklearn on each resample drawn with the same seed, then percentiles
    idx = np.random.default_rng(3).integers(0, 150, size=(300, 150))
    t, p = np.array(truth), np.array(pred)
    f1 = [metrics.f1_score(t[i], p[i], average="macro") for i in idx]
    acc = [metrics.accuracy_score(t[i], p[i]) for i in idx]
    np.testing.assert_allclose(m["macro_f1_ci"], np.quantile(f1, [0.025, 0.975]), atol=1e-12)
    np.testing.assert_allclose(m["accuracy_ci"], np.quantile(acc, [0.025, 0.975]), atol=1e-12)
    assert m["macro_f1_ci"][0] < m["macro_f1"] < m["macro_f1_ci"][1]
    assert label_metrics(truth, pred, LABELS, n=300, seed=3) == m  # seeded: reproducible
    assert "macro_f1_ci" not in label_metrics(truth, pred, LABELS, ci=False)


def test_label_scores_skip_classes_absent_from_both_sides():
    codes = {lab: i for i, lab in enumerate(LABELS)}
    t = np.array([[codes["visual"], codes["none"], codes["none"], codes["visual"]]])
    p = np.array([[codes["visual"], codes["none"], codes["visual"], codes["textual"]]])
    acc, f1 = label_scores(t, p, len(LABELS))
    # visual: 2TP+FP+FN = 2+1+1 → 0.5; none: 2/3; textual: predicted, never true → 0; the others absent
    assert acc.tolist() == [0.5] and f1[0] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    empty = label_metrics([], [], LABELS)
    assert empty["n"] == 0 and np.isnan(empty["macro_f1"]) and np.isnan(empty["macro_f1_ci"]).all()
    with pytest.raises(ValueError, match="not in"):
        label_metrics(["visual"], ["purple"], LABELS)


# --- baselines ------------------------------------------------------------------------------------
def test_firing_ratio_census_on_a_synthetic_stats_table():
    stats = pl.DataFrame({
        "latent": [0, 1, 2, 3, 4, 5, 6],
        # image tokens are 9× the text tokens: raw counts would call latent 2 visual, densities do not
        "freq_image": [0.09, 0.01, 0.02, 0.0, 0.0, 0.04, 0.05],
        "freq_text": [0.01, 0.09, 0.02, 0.03, 0.0, 0.01, 0.05],
        "dead": [False, False, False, False, True, False, True],
    })
    r = firing_ratio(stats).to_numpy()
    np.testing.assert_allclose(r[[0, 1, 2, 3, 5]], [0.9, 0.1, 0.5, 0.0, 0.8])
    assert np.isnan(r[4])
    assert firing_ratio_census(stats).to_list() == ["image-specific", "text-specific", "shared", "text-specific",
                                                     "dead", "shared", "dead"]  # 0.8 is not > 0.8
    assert firing_ratio_labels(stats).to_list() == ["visual", "textual", "multimodal", "textual", "none",
                                                     "multimodal", "none"]
    # selectivity = 2r − 1: the census is selectivity with cut 0.6 away from the boundary
    sel = stats.with_columns(selectivity=2 * pl.col("freq_image") / (pl.col("freq_image") + pl.col("freq_text")) - 1)
    keep = [0, 1, 2, 3]
    assert [selectivity_labels(sel, cut=0.6)[i] for i in keep] == [firing_ratio_labels(stats)[i] for i in keep]
    with pytest.raises(ValueError):
        firing_ratio_census(stats, image=0.2, text=0.8)


def test_majority_labeller():
    assert majority_label(["none", "visual", "none", "textual"]) == "none"
    assert majority_label(["visual", "none", "none", "visual"]) == "visual"  # tie: LABELS order
    assert majority_label([]) == "none"
    assert majority_labels(pl.Series(["textual", "textual", "none"])).to_list() == ["textual"] * 3


def test_concept_match_exact_and_partial():
    assert concept_exact("Red Circle.", "red  circle") and not concept_exact("red", "red circle")
    assert concept_partial("red", "red circle") and not concept_partial("blue square", "red circle")
    assert not concept_exact(None, "red") and not concept_partial("red", None)
    m = concept_match([("red", "red"), ("red", "red circle"), ("blue", "red"), (None, "red")], n=100)
    assert m["n"] == 4 and m["exact"][0] == 0.25 and m["partial"][0] == 0.5
    assert paired_difference([1.0, 2.0, np.nan], [0.5, 1.0, 1.0], n=100)[0] == pytest.approx(0.75)


# --- the whole report on a hand-made store --------------------------------------------------------
W = 40
GT = ["visual"] * 10 + ["textual"] * 6 + ["multimodal"] * 4 + ["none"] * 20


def _pipeline_labels() -> list[str]:
    out = list(GT)
    for i in (0, 11, 25, 30):   # four mistakes
        out[i] = "none" if GT[i] != "none" else "visual"
    return out


def _concepts(labels: list[str], rng: np.random.Generator, random_scores: bool) -> pl.DataFrame:
    rows = []
    score = {"visual": (0.9, 0.1), "textual": (0.1, 0.9), "multimodal": (0.9, 0.9), "mixed": (0.9, 0.9),
             "none": (0.1, 0.1)}
    for mode, shift in (("masked", 0.0), ("whole", -0.05)):
        for lat, lab in enumerate(labels):
            v, t = score[lab]
            row = {"latent": lat, "prompting": mode, "modality": lab, "visual_concept": "red",
                   "textual_concept": "red" if lab == "multimodal" else "the",
                   "visual_score": v + shift + 0.01 * rng.random(), "textual_score": t,
                   "concepts_agree": lab == "multimodal"}
            if random_scores:
                row |= {"visual_score_random": 0.2 + 0.01 * rng.random(), "textual_score_random": 0.3}
            rows.append(row)
    return pl.DataFrame(rows)


def _ground_truth(labels: list[str]) -> pl.DataFrame:
    concept = {"visual": ("red", None), "textual": (None, "the"), "multimodal": ("red", "red"),
               "none": (None, None)}
    return pl.DataFrame({
        "latent": np.arange(len(labels), dtype=np.int32), "gt_modality": labels,
        "gt_visual_concept": [concept[x][0] for x in labels], "gt_textual_concept": [concept[x][1] for x in labels],
        "gt_modality_auroc_0.8": [("visual" if x == "none" and i % 2 else x) for i, x in enumerate(labels)],
        "gt_modality_auroc_0.9": labels,
        "gt_modality_auroc_0.95": ["none" if x == "textual" else x for x in labels],
    })


def _stats(labels: list[str]) -> pl.DataFrame:
    fi = {"visual": 0.09, "textual": 0.001, "multimodal": 0.05, "none": 0.05}
    ft = {"visual": 0.001, "textual": 0.09, "multimodal": 0.05, "none": 0.05}
    return pl.DataFrame({
        "latent": np.arange(len(labels), dtype=np.int32), "explained": [True] * len(labels),
        "dead": [False] * len(labels),
        "freq_image": [fi[x] for x in labels], "freq_text": [ft[x] for x in labels],
        "modality_score": [0.9 if x == "visual" else 0.1 if x == "textual" else 0.5 if x == "multimodal"
                           else float("nan") for x in labels],
        "selectivity": [0.9 if x == "visual" else -0.9 if x == "textual" else 0.0 for x in labels],
    })


def _store(tmp_path, control: str | None):
    from msae.store import Store

    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    store.write_parquet(_stats(GT), "latents/layer=1/width=40", "stats.parquet")
    store.write_parquet(_concepts(_pipeline_labels(), rng, random_scores=True), "concepts/layer=1/width=40",
                        "concepts.parquet")
    store.write_parquet(_ground_truth(GT), "concepts/layer=1/width=40", "ground_truth.parquet")
    if control:
        # a random SAE: ground truth mostly none, and labels that collapsed to it
        folder = "controls/random_sae/concepts/layer=1/width=40"
        ctrl_gt = ["none"] * 36 + ["visual"] * 4
        store.write_parquet(_concepts(["none"] * 38 + ["visual"] * 2, rng, random_scores=False), folder,
                            "concepts.parquet")
        store.write_parquet(_ground_truth(ctrl_gt), folder, "ground_truth.parquet")
    cfg = parse_config({"store": store.root, "dataset": {"kind": "shapes"}, "model": {"name_or_path": "none"},
                        "layers": [1], "widths": [40], "scores": {"bootstrap": 200}})
    return cfg, store


@pytest.mark.parametrize("control", [None, "root"])
def test_report_builds_with_and_without_a_control(tmp_path, control):
    cfg, store = _store(tmp_path, control)
    summary = build_report(cfg, store)
    report = json.loads(store.read_bytes("report", "report.json").decode(), parse_constant=pytest.fail)
    for name in ("index.html", "quality.png", "ablation.png", "masked_vs_whole.png",
                 "confusion_layer1_width40.png"):
        assert store.exists("report", name), name
    assert {"partitions", "pooled_masked_vs_whole", "settings"} <= set(report)
    p = report["partitions"][0]
    assert {"census", "ablation", "ground_truth", "masked_vs_whole", "quality", "fvu", "controls"} <= set(p)
    g = p["ground_truth"]
    assert g["n"] == W and g["methods"] == ["pipeline", "majority", "modality_score", "firing_ratio", "selectivity"]
    assert g["pipeline"]["macro_f1"] == pytest.approx(macro_f1(GT, _pipeline_labels(), LABELS))
    assert g["pipeline"]["accuracy"] == pytest.approx(36 / 40)
    lo, hi = g["pipeline"]["macro_f1_ci"]
    assert lo <= g["pipeline"]["macro_f1"] <= hi
    assert g["majority_label"] == "none" and g["majority"]["accuracy"] == pytest.approx(0.5)
    assert g["modality_score"]["accuracy"] == pytest.approx(1.0)  # planted to follow the truth (NaN → none)
    # firing ratio: visual 0.99 → visual, textual 0.01 → textual, both 0.5 → multimodal (none latents too)
    assert g["firing_ratio"]["accuracy"] == pytest.approx(20 / 40)
    assert g["gt_census"]["0.9"] == g["gt_census"]["label"] == {"visual": 10, "textual": 6, "multimodal": 4,
                                                                   "mixed": 0, "none": 20}
    assert g["gt_census"]["0.8"]["visual"] == 20 and g["gt_census"]["0.95"]["textual"] == 0
    assert g["label_census"] == {"visual": 11, "textual": 5, "multimodal": 4, "mixed": 0, "none": 20}
    assert g["confusion"][0]["true"] == "visual" and g["confusion"][0]["none"] == 1
    # concept match: the pipeline always says "red" visually, "the"/"red" textually
    assert g["concept_match"]["visual"]["n"] == 14 and g["visual_concept_accuracy"] == pytest.approx(1.0)
    assert g["concept_match"]["textual"]["exact"][0] == pytest.approx(1.0)
    mvw = p["masked_vs_whole"]
    assert mvw["difference"][0] == pytest.approx(0.05, abs=0.01) and mvw["difference"][1] > 0
    ri = p["controls"]["random_image"]
    assert ri["visual"]["n"] == W and ri["visual"]["random"][0] == pytest.approx(0.205, abs=0.006)
    assert ri["textual"]["difference"][0] == pytest.approx(np.mean([0.9 if x in ("textual", "multimodal") else 0.1
                                                                    for x in _pipeline_labels()]) - 0.3)
    rows = method_rows(summary["partitions"][0])
    html = store.read_bytes("report", "index.html").decode()
    assert html.index("Labels against ground truth") < html.index("Modality census")  # the first thing seen
    ctrl = p["controls"]["random_sae"]
    if control is None:
        assert ctrl is None and len(rows) == 5
        assert "random-SAE control: pipeline" not in html
    else:
        assert ctrl["n"] == W and ctrl["majority_label"] == "none"
        assert ctrl["label_census"]["none"] == 38 and ctrl["gt_census"]["label"]["none"] == 36
        assert ctrl["pipeline"]["accuracy"] == pytest.approx(38 / 40)
        assert ctrl["majority"]["macro_f1"] == pytest.approx(macro_f1(["none"] * 36 + ["visual"] * 4, ["none"] * 40,
                                                                      LABELS))
        assert len(rows) == 7 and "random-SAE control: pipeline" in html


def test_report_without_ground_truth_or_random_scores(tmp_path):
    cfg, store = _store(tmp_path, None)
    store.rm("concepts/layer=1/width=40/ground_truth.parquet")
    c = store.read_parquet("concepts/layer=1/width=40", "concepts.parquet")
    store.write_parquet(c.drop("visual_score_random", "textual_score_random"), "concepts/layer=1/width=40",
                        "concepts.parquet")
    summary = build_report(cfg, store)
    p = summary["partitions"][0]
    assert p["ground_truth"] is None and p["controls"] == {"random_sae": None, "random_image": None,
                                                           "dissection_oracle": None}
    assert "macro_f1" not in p["ablation"][0]
    assert not store.exists("report", "confusion_layer1_width40.png")
    assert "Labels against ground truth" not in store.read_bytes("report", "index.html").decode()
