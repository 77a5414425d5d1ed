"""Calibration: the threshold sweep, the evidence measures, and the profile carrying its choice."""

from __future__ import annotations

import json

import polars as pl
import pytest
import yaml

from msae.calibrate import (CALIBRATION_FILE, COVERAGE_ALONE_GRID, MIN_CLASS_SUPPORT, THRESHOLD_GRID,
                            calibration_config_data, choose_thresholds, coverage_alone_gates, threshold_sweep)
from msae.config import profile_text
from msae.score.evidence_quality import evidence_quality, image_concepts, patch_concepts


def _frames():
    # 6 latents: visual scores separate the truly visual ones at 0.8, textual ones at 0.6
    truth = ["visual", "visual", "textual", "none", "none", "multimodal"]
    concepts = pl.DataFrame({
        "latent": list(range(6)), "prompting": ["masked"] * 6,
        "visual_concept": ["red", "circle", None, "red", None, "blue"],
        "textual_concept": [None, None, "the", None, "is", "blue"],
        "visual_score": [0.9, 0.85, None, 0.7, None, 0.95],
        "textual_score": [None, None, 0.65, None, 0.55, 0.9],
        "concepts_agree": [False, False, False, False, False, True],
    })
    gt = pl.DataFrame({"latent": list(range(6)), "gt_modality": truth})
    return [(concepts, gt)]


def test_threshold_sweep_finds_the_separating_pair():
    sweep = threshold_sweep(_frames())
    assert len(sweep) == len(THRESHOLD_GRID) ** 2
    best = choose_thresholds(sweep)
    assert best["macro_f1"] == pytest.approx(1.0)
    assert 0.7 < best["visual_threshold"] <= 0.85 and 0.55 < best["textual_threshold"] <= 0.65


def test_evidence_quality_counts_hits_and_active_patches_on_the_concept():
    objects = pl.DataFrame({"image_id": ["a", "b"], "color": ["red", "blue"], "shape": ["circle", "square"],
                            "size": ["small", "large"]})
    # 2×2 grids: image a has the red circle in patch 0, image b the blue square in patches 0 and 1
    ann = pl.DataFrame({"image_id": ["a"] * 4 + ["b"] * 4, "grid_row": [0, 0, 1, 1] * 2, "grid_col": [0, 1] * 4,
                        "color": ["red", None, None, None, "blue", "blue", None, None],
                        "shape": ["circle", None, None, None, "square", "square", None, None],
                        "size": ["small", None, None, None, "large", "large", None, None]})
    top = pl.DataFrame({"latent": [7, 7], "modality": ["image", "image"], "sample_id": ["sa", "sb"],
                        "patch_activations": [[3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]],
                        "active_threshold": [0.5, 0.5]})
    gt = pl.DataFrame({"latent": [7], "gt_modality": ["visual"], "gt_visual_concept": ["red"]})
    q = evidence_quality(top, gt, {"sa": "a", "sb": "b"}, image_concepts(objects), patch_concepts(ann))
    assert q == {"images": 2, "hits": 1, "active_patches": 3, "on_concept": 1}


def test_calibration_world_is_the_profiles_calibration_seed():
    data = calibration_config_data()
    profile = yaml.safe_load(profile_text("embedded"))
    assert data["dataset"]["shapes"]["seed"] == profile["world_seeds"]["calibration"]
    assert data["dataset"]["shapes"]["seed"] != profile["dataset"]["shapes"]["seed"]


def test_embedded_profile_carries_the_calibrated_choice():
    chosen = json.loads(CALIBRATION_FILE.read_text())["chosen"]
    profile = yaml.safe_load(profile_text("embedded"))
    for dotted, value in chosen.items():
        section, key = dotted.split(".")
        assert profile[section][key] == value, dotted
    assert json.loads(CALIBRATION_FILE.read_text())["world_seed"] == profile["world_seeds"]["calibration"]


def test_sweep_labels_exactly_as_the_label_rule_does():
    """The sweep labels in numpy for speed; every setting it scores must give the labels (and so the
    macro-F1) that msae.score.classify gives with the same settings."""
    import numpy as np
    from sklearn.metrics import f1_score

    from msae.score.classify import PopulationGate, classify_frame

    rng = np.random.default_rng(0)
    n = 60
    concepts = pl.DataFrame({
        "latent": list(range(n)), "prompting": ["masked"] * n,
        "visual_score": rng.uniform(0.4, 1, n), "textual_score": rng.uniform(0.4, 1, n),
        "concepts_agree": rng.random(n) < 0.3,
        "visual_population_auroc": rng.uniform(0.4, 1, n), "visual_population_positives": rng.integers(0, 60, n),
        "visual_population_random": rng.uniform(0.4, 0.6, n),
        "textual_population_auroc": rng.uniform(0.4, 1, n), "textual_population_positives": rng.integers(0, 60, n),
        "textual_population_random": rng.uniform(0.4, 0.6, n),
        "textual_population_coverage": rng.uniform(0.4, 1, n), "textual_population_matches": rng.integers(0, 60, n),
        "textual_population_precision": rng.uniform(0.4, 1, n),
        "textual_concept": [None if i % 5 == 0 else "and" for i in range(n)],
    }).with_columns(pl.when(pl.col("latent") % 7 == 0).then(None).otherwise(pl.col("visual_score"))
                    .alias("visual_score"))
    truth = rng.choice(["visual", "textual", "none", "mixed", "multimodal"], size=n).tolist()
    gt = pl.DataFrame({"latent": list(range(n)), "gt_modality": truth})
    assert any(truth.count(c) < MIN_CLASS_SUPPORT for c in set(truth))  # so the support rule is exercised
    sweep = threshold_sweep([(concepts, gt)])
    alone = threshold_sweep([(concepts, gt)], gates=coverage_alone_gates(choose_thresholds(sweep)))
    assert {r["textual_coverage_alone_threshold"] for r in alone} == set(COVERAGE_ALONE_GRID) - {0.0}
    assert {r["textual_coverage_alone_threshold"] for r in sweep} == {0.0}  # the big grid leaves it off
    picked = [sweep[i] for i in rng.choice(len(sweep), size=40, replace=False)]
    for r in picked + [alone[i] for i in rng.choice(len(alone), size=20, replace=False)]:
        gate = PopulationGate(r["visual_population_threshold"], r["textual_population_threshold"],
                              r["population_min_positives"], r["textual_coverage_threshold"],
                              r["textual_precision_threshold"], r["textual_coverage_alone_threshold"])
        labels = classify_frame(concepts, r["visual_threshold"], r["textual_threshold"], gate).to_list()
        counted = sorted(c for c in set(truth) if truth.count(c) >= MIN_CLASS_SUPPORT)  # the objective's classes
        want = f1_score(truth, labels, labels=counted, average="macro", zero_division=0)
        assert r["macro_f1"] == pytest.approx(want), r
