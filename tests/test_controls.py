"""Controls: the store overlay, the random SAE, the configs they run with, and seeds' disjointness."""

from __future__ import annotations

import pytest
import torch

from msae.config import ConfigError, parse_config
from msae.controls import ControlStore, control_config, oracle_config, oracle_store, random_sae_like
from msae.sae.model import SparseCoder
from msae.store import Store


def test_control_store_moves_only_the_per_sae_folders(tmp_path):
    store = Store(str(tmp_path))
    c = ControlStore(store.root)
    assert c.url("sae/layer=1/width=8") == f"{store.root}/controls/random_sae/sae/layer=1/width=8"
    assert c.url("latents", "layer=1/width=8", "stats.parquet").startswith(f"{store.root}/controls/random_sae/latents/")
    assert c.url("concepts/layer=1/width=8") == f"{store.root}/controls/random_sae/concepts/layer=1/width=8"
    for shared in (store.TOKENS, store.SAMPLES, store.activations_name(1), "world/annotations.parquet"):
        assert c.url(shared) == store.url(shared)
    # the oracle redirects concepts only: it explains the real SAE's evidence
    o = oracle_store(store)
    assert o.url("latents/layer=1/width=8") == store.url("latents/layer=1/width=8")
    assert o.url("concepts/layer=1/width=8") == f"{store.root}/controls/dissection/concepts/layer=1/width=8"
    # writes land where the overlay says, reads see them
    c.write_json({"a": 1}, "concepts/layer=1/width=8", "x.json")
    assert (tmp_path / "controls/random_sae/concepts/layer=1/width=8/x.json").is_file()
    assert c.read_json("concepts/layer=1/width=8", "x.json") == {"a": 1}
    assert not store.exists("concepts/layer=1/width=8", "x.json")


def test_random_sae_keeps_shape_and_centre_only():
    trained = SparseCoder(16, 64, 4, seed=3)
    with torch.no_grad():
        trained.b_dec.copy_(torch.arange(16.0))
        trained.encoder.weight.mul_(5)
    r1, r2 = random_sae_like(trained, seed=1), random_sae_like(trained, seed=1)
    assert (r1.d_in, r1.num_latents, r1.k, r1.architecture) == (16, 64, 4, "topk")
    assert torch.equal(r1.b_dec, trained.b_dec)
    assert torch.equal(r1.W_dec, r2.W_dec)  # seeded
    assert not torch.allclose(r1.encoder.weight, trained.encoder.weight)
    assert torch.allclose(r1.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert not torch.equal(random_sae_like(trained, seed=2).W_dec, r1.W_dec)


def _cfg(**extra):
    return parse_config({"store": "/tmp/x", "dataset": {"kind": "shapes"}, "model": {"name_or_path": "none"},
                         "layers": [1], "widths": [64, 512], "explainer": {"backend": "transformers"}, **extra})


def test_control_configs():
    cfg = _cfg()
    small, big = control_config(cfg, 64), control_config(cfg, 512)
    assert small.explainer.prompting == ["masked"] and small.latents.select == cfg.latents.select
    assert big.latents.select == "sample" and big.latents.n == cfg.controls.latents
    assert small.latents.cards == big.latents.cards == 0
    assert oracle_config(cfg).explainer.backend == "dissection"
    assert oracle_config(cfg).explainer.prompting == ["masked"]


def test_world_seeds_must_be_disjoint_and_name_the_run():
    seeds = {"vlm_training": [0, 2], "vlm_validation": [98], "calibration": 4321, "evaluation": 1234}
    ok = _cfg(dataset={"kind": "shapes", "shapes": {"seed": 1234}}, world_seeds=seeds)
    assert ok.world_seeds.evaluation == 1234
    with pytest.raises(ConfigError, match="neither world_seeds.evaluation"):
        _cfg(dataset={"kind": "shapes", "shapes": {"seed": 7}}, world_seeds=seeds)
    with pytest.raises(ConfigError, match="share seeds"):
        _cfg(dataset={"kind": "shapes", "shapes": {"seed": 1234}}, world_seeds={**seeds, "calibration": 2})


def _controls_meta(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("controls")[-1].metadata.items()}


@pytest.mark.slow
def test_controls_reuse_their_evidence_by_level(tiny_config_data, tmp_path):
    """What the controls explain is cached apart from how they are scored: a threshold edit re-runs
    only their scores, a prompt edit their concepts too (never the random SAE's statistics), and a
    damaged statistics file is rebuilt, not read (concepts are keyed by the statistics' content)."""
    import copy
    import shutil

    import dagster as dg

    from msae.config import PROJECT_ROOT
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.stage import STATS, latents_folder
    from msae.score.stage import CONCEPTS
    from pipeline_helpers import materialize_ok

    data = {**copy.deepcopy(tiny_config_data), "layers": [0]}
    part, stages = "0|16", ["sae", "latent_stats", "concepts", "concept_scores", "controls"]
    cstore = ControlStore(Store(data["store"]).root)
    with dg.instance_for_test() as instance:
        materialize_ok(data, instance, ["vqa_samples"])
        materialize_ok(data, instance, ["activations"], "0")
        first = _controls_meta(materialize_ok(data, instance, stages, part))
        assert first["reused"] is False and first["stats_reused"] is False and first["concepts_reused"] is False
        stats = cstore.read_bytes(latents_folder(0, 16), STATS)
        proposals = cstore.read_bytes(concepts_folder(0, 16), PROPOSALS)
        labels = cstore.read_parquet(concepts_folder(0, 16), CONCEPTS)

        loose = copy.deepcopy(data)
        loose["scores"] = {**loose["scores"], "visual_threshold": 0.0, "textual_threshold": 0.0}
        meta = _controls_meta(materialize_ok(loose, instance, ["controls"], part))
        assert meta["reused"] is False and meta["stats_reused"] is True and meta["concepts_reused"] is True
        assert cstore.read_bytes(concepts_folder(0, 16), PROPOSALS) == proposals  # not explained again
        relabelled = cstore.read_parquet(concepts_folder(0, 16), CONCEPTS)
        assert relabelled["latent"].to_list() == labels["latent"].to_list()
        assert (relabelled["modality"] != "none").sum() >= (labels["modality"] != "none").sum()

        templates = tmp_path / "templates"
        shutil.copytree(PROJECT_ROOT / "msae" / "explain" / "templates", templates)
        (templates / "visual_masked.txt").write_text((templates / "visual_masked.txt").read_text() + "\nOne word.\n")
        edited = {**loose, "explainer": {**loose.get("explainer", {}), "prompt_dir": str(templates)}}
        meta = _controls_meta(materialize_ok(edited, instance, ["concepts", "concept_scores", "controls"], part))
        assert meta["stats_reused"] is True and meta["concepts_reused"] is False
        assert cstore.read_bytes(latents_folder(0, 16), STATS) == stats

        cstore.fs.rm(cstore.path(latents_folder(0, 16), STATS))  # damage: the recorded file is gone
        meta = _controls_meta(materialize_ok(edited, instance, ["controls"], part))
        assert meta["stats_reused"] is False
        assert cstore.read_bytes(latents_folder(0, 16), STATS) == stats  # seeded: the same statistics again,
        assert meta["concepts_reused"] is True  # so the concepts keyed by their content stand
