"""Alignment scoring is split from labelling: a threshold edit relabels stored scores, embeds nothing again.

`concept_scores` keeps the thresholds in its code version (Dagster marks it and its readers stale),
but the embedding scores, the ground truth and the judge are cached under keys without them.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import dagster as dg
import numpy as np
import polars as pl
import pytest

import msae.score.ground_truth as ground_truth
import msae.score.stage as score_stage
from msae.config import parse_config
from msae.explain.stage import PROPOSALS, concepts_folder
from msae.store import Store
from pipeline_helpers import materialize_ok

PART = "0|16"
FOLDER = concepts_folder(0, 16)


class _Spy:
    """An embedder that counts its embed_* calls (everything else is the real one's)."""

    def __init__(self, inner, calls: Counter) -> None:
        self._inner, self._calls = inner, calls

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not name.startswith("embed_"):
            return attr

        def counted(*args, **kwargs):
            self._calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture
def calls(monkeypatch) -> Counter:
    """Counts of embedder calls and ground-truth computations made through the stage."""
    counts: Counter = Counter()
    real_load, real_gt = score_stage.load_embedders, ground_truth.ground_truth_from_config

    def load(cfg):
        image_text, text = real_load(cfg)
        return [_Spy(m, counts) for m in image_text], _Spy(text, counts)

    def gt(*args, **kwargs):
        counts["ground_truth"] += 1
        return real_gt(*args, **kwargs)

    monkeypatch.setattr(score_stage, "load_embedders", load)
    monkeypatch.setattr(ground_truth, "ground_truth_from_config", gt)
    return counts


def _meta(result: dg.ExecuteInProcessResult) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("concept_scores")[-1].metadata.items()}


def _scores(data: dict, instance, calls: Counter) -> tuple[dict, Counter]:
    """Materialize concept_scores; (its metadata, the embedder / ground-truth calls it made)."""
    calls.clear()
    meta = _meta(materialize_ok(data, instance, ["concept_scores"], PART))
    return meta, Counter(calls)


def _with_scores(data: dict, **scores) -> dict:
    out = copy.deepcopy(data)
    out["scores"] = {**out["scores"], **scores}
    return out


def test_threshold_edit_relabels_without_embedding_again(tiny_config_data, calls):
    data = {**copy.deepcopy(tiny_config_data), "layers": [0]}
    store = Store(data["store"])
    with dg.instance_for_test() as instance:
        materialize_ok(data, instance, ["vqa_samples"])
        materialize_ok(data, instance, ["activations"], "0")
        materialize_ok(data, instance, ["sae", "latent_stats", "concepts"], PART)
        assert store.exists("world", "annotations.parquet")  # ground truth is part of the stage here

        meta, made = _scores(data, instance, calls)
        assert meta["reused"] is False
        assert made["embed_images"] > 0 and made["embed_texts"] > 0 and made["ground_truth"] == 1
        concepts = store.read_bytes(FOLDER, score_stage.CONCEPTS)
        gt = store.read_bytes(FOLDER, score_stage.GROUND_TRUTH)
        base = pl.read_parquet(io.BytesIO(concepts))
        for col in ("latent", "prompting", "modality", "visual_concept", "textual_concept", "visual_score",
                    "textual_score"):
            assert col in base.columns

        # the same config again: the manifest is reused, nothing is computed
        meta, made = _scores(data, instance, calls)
        assert meta["reused"] is True and sum(made.values()) == 0

        # an extreme threshold: every row with both scores is aligned both ways; only labels are recomputed
        loose = _with_scores(data, visual_threshold=0.0, textual_threshold=0.0, agreement=-1.0)
        meta, made = _scores(loose, instance, calls)
        assert meta["reused"] is False and sum(made.values()) == 0, made  # the stage ran, but embedded nothing
        assert meta["alignment_reused"] is True and meta["ground_truth_reused"] is True
        relabelled = pl.read_parquet(store.path(FOLDER, score_stage.CONCEPTS))
        both = relabelled["visual_score"].is_not_null() & relabelled["textual_score"].is_not_null()
        assert both.any()
        assert (relabelled.filter(both)["modality"] == "multimodal").all()  # agreement -1: any cosine agrees
        only_v = relabelled["visual_score"].is_not_null() & relabelled["textual_score"].is_null()
        assert (relabelled.filter(only_v)["modality"] == "visual").all()
        assert (relabelled["modality"] != base["modality"]).any()
        score_cols = [c for c in base.columns if c not in ("modality", "concepts_agree")]
        assert relabelled.select(score_cols).equals(base.select(score_cols))
        assert store.read_bytes(FOLDER, score_stage.GROUND_TRUTH) == gt

        # back to the first thresholds: byte for byte the first output, from the cached scores
        meta, made = _scores(data, instance, calls)
        assert sum(made.values()) == 0 and meta["alignment_reused"] is True
        assert store.read_bytes(FOLDER, score_stage.CONCEPTS) == concepts
        assert store.read_bytes(FOLDER, score_stage.GROUND_TRUTH) == gt

        # and byte for byte what scoring and labelling in one uncached pass write (the stage before the split)
        cfg = parse_config(data)
        proposals = store.read_parquet(FOLDER, PROPOSALS)
        from msae.latents.evidence import load_evidence

        image_text, text = score_stage.load_embedders(cfg)
        evidence = load_evidence(store, 0, 16, sorted(set(proposals["latent"].to_list())))
        pools = score_stage.store_pools(cfg, store, np.random.default_rng([cfg.scores.seed, 2]))
        direct = score_stage.score_partition_full(cfg, store, 0, 16, evidence, proposals, image_text, text, pools)
        buf = io.BytesIO()
        direct.write_parquet(buf, compression="zstd", statistics=True)
        assert buf.getvalue() == concepts

        # a setting the scores read (the controls' seed) does embed again; ground truth still reused
        meta, made = _scores(_with_scores(data, seed=1), instance, calls)
        assert meta["alignment_reused"] is False and made["embed_images"] > 0 and made["ground_truth"] == 0

        # a ground-truth setting recomputes ground truth only
        meta, made = _scores(_with_scores(data, seed=1, gt_auroc=0.8), instance, calls)
        assert meta["alignment_reused"] is True and made["ground_truth"] == 1 and made["embed_images"] == 0


def test_damaged_score_cache_is_recomputed_not_read(tiny_config_data, calls):
    data = {**copy.deepcopy(tiny_config_data), "layers": [0]}
    store = Store(data["store"])
    with dg.instance_for_test() as instance:
        materialize_ok(data, instance, ["vqa_samples"])
        materialize_ok(data, instance, ["activations"], "0")
        materialize_ok(data, instance, ["sae", "latent_stats", "concepts"], PART)
        _scores(data, instance, calls)
        concepts = store.read_bytes(FOLDER, score_stage.CONCEPTS)
        entries = [p for p in store.fs.find(store.path(FOLDER, score_stage.CACHE)) if p.endswith("scores.arrow")]
        assert len(entries) == 1
        raw = bytearray(open(entries[0], "rb").read())
        raw[len(raw) // 2] ^= 0xFF
        open(entries[0], "wb").write(bytes(raw))

        meta, made = _scores(_with_scores(data, visual_threshold=0.9), instance, calls)
        assert meta["alignment_reused"] is False and made["embed_images"] > 0
        meta, made = _scores(data, instance, calls)  # the rewritten entry is good again
        assert meta["alignment_reused"] is True and sum(made.values()) == 0
        assert store.read_bytes(FOLDER, score_stage.CONCEPTS) == concepts


def test_label_frame_matches_the_rule():
    from msae.score.classify import label_frame

    frame = pl.DataFrame({
        "latent": [0, 1, 2, 3], "prompting": ["masked"] * 4,
        "visual_concept": ["red", "red square", "red", None], "textual_concept": ["Red.", "red", "blue", "blue"],
        "visual_score": [0.9, 0.9, 0.9, None], "textual_score": [0.9, 0.5, 0.9, 0.9],
        "concept_cosine": [1.0, 0.7, 0.1, None], "visual_category": ["colour"] * 4,
    })
    cfg = parse_config({"store": "memory://x", "dataset": {"kind": "shapes"}, "model": {"name_or_path": "m"},
                        "layers": [0], "widths": [16]}).scores
    out = label_frame(frame, cfg)
    assert out.columns == ["latent", "prompting", "visual_concept", "textual_concept", "visual_score",
                           "textual_score", "concept_cosine", "concepts_agree", "visual_category", "modality"]
    assert out["concepts_agree"].to_list() == [True, True, False, False]
    assert out["modality"].to_list() == ["multimodal", "visual", "mixed", "textual"]
    assert frame.columns[-1] == "visual_category"  # the input is not changed
    strict = label_frame(frame, cfg.model_copy(update={"visual_threshold": 1.0, "textual_threshold": 1.0}))
    assert strict["modality"].to_list() == ["none"] * 4
