"""The `sae` stage: library function on a tiny extracted store, the asset, its checks and versions."""

from __future__ import annotations

import math

import dagster as dg
import numpy as np
import pytest

from msae.config import parse_config
from msae.manifest import load_manifest
from msae.sae.formats import load_sae, read_metadata, save_sae
from msae.sae.model import SparseCoder
from msae.sae.stage import fit_sae
from msae.store import Store
from msae_assets.definitions import build_definitions


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets}


def _materialize(defs, names, instance, partition=None) -> dg.ExecuteInProcessResult:
    assets = _assets(defs)
    result = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                            partition_key=partition, selection=names)
    assert result.success
    return result


def _meta(result, name) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node(name)[-1].metadata.items()}


def _checks(result) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


def _extracted_store(cfg) -> Store:
    """vqa_samples + activations (every layer) through the library, as the assets do."""
    from msae.data.samples import build_samples, read_samples, write_samples
    from msae.extract import extract_activations
    from msae.vlm.load import load_vlm

    store = Store(cfg.store)
    write_samples(build_samples(cfg.dataset, store), store)
    extract_activations(read_samples(store), load_vlm(cfg.model), cfg.layers, store, cfg.extraction, progress=False)
    return store


def test_fit_sae_trains_evaluates_saves_and_resumes(tiny_config_data):
    from msae.vlm.load import load_vlm

    cfg = parse_config(tiny_config_data)
    store = _extracted_store(cfg)
    vlm = load_vlm(cfg.model)
    r = fit_sae(cfg, store, 2, 16, vlm)

    m = r.metrics()
    for key in ("fvu", "fvu_image", "fvu_text", "l0", "loss_clean", "loss_with_sae", "loss_zero_ablated",
                "loss_recovered"):
        assert math.isfinite(m[key]), key
    assert 0 <= m["fvu"] < 1 and 0 <= m["dead_fraction"] <= 1 and 0 <= m["dense_fraction"] <= 1
    assert m["l0"] == pytest.approx(cfg.sae.k)  # TopK: exactly k per token
    assert m["eval_image_tokens"] > 0 and m["eval_text_tokens"] > 0
    assert m["loss_samples"] == cfg.sae.loss_samples
    assert r.log.height > 0 and r.log["fvu"][-1] < r.log["fvu"][0]  # it learned something
    assert r.train["train_steps"] == cfg.sae.token_budget // cfg.sae.batch_size

    folder = store.path(store.sae_name(2, 16))
    assert r.path == store.url(store.sae_name(2, 16))
    meta = read_metadata(folder)
    assert meta["fvu"] == pytest.approx(m["fvu"]) and meta["loss_recovered"] == pytest.approx(m["loss_recovered"])
    assert meta["layer"] == 2 and meta["width"] == 16
    assert store.exists(store.sae_name(2, 16), "train_log.parquet")
    sparsify = pytest.importorskip("sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(folder)
    assert theirs.num_latents == 16 and theirs.cfg.k == cfg.sae.k

    # a rerun resumes from the final checkpoint: no steps, same weights, same data version
    again = fit_sae(cfg, store, 2, 16, None)
    assert again.train["resumed_from_step"] == again.train["train_steps"]
    assert again.data_version == r.data_version and again.loss is None
    assert again.metrics()["fvu"] == pytest.approx(m["fvu"])


def test_fit_sae_pretrained(tiny_config_data, tmp_path):
    cfg = parse_config(tiny_config_data)
    store = _extracted_store(cfg)
    repo = tmp_path / "repo"
    save_sae(SparseCoder(32, 16, 4, seed=1), repo / "model.layers.0")
    pre = parse_config({**tiny_config_data, "sae": {"source": "pretrained", "pretrained": str(repo),
                                                    "eval_fraction": 0.25, "loss_samples": 0}})
    r = fit_sae(pre, store, 0, 16)
    assert math.isfinite(r.metrics()["fvu"]) and r.log.height == 0 and r.loss is None
    assert load_sae(store.path(store.sae_name(0, 16))).num_latents == 16
    with pytest.raises(ValueError, match="widths"):
        fit_sae(pre, store, 0, 32)
    with pytest.raises(Exception, match="hookpoint"):
        fit_sae(pre, store, 2, 16)  # no SAE for model.layers.2 in the repo


def test_sae_asset_materializes_reuses_and_checks(tiny_config_data):
    data = {**tiny_config_data, "sae": {**tiny_config_data["sae"], "check_max_fvu": 1.0, "check_max_dead_fraction": 1.0}}
    cfg = parse_config(data)
    defs = build_definitions(cfg)
    store = Store(cfg.store)
    with dg.instance_for_test() as instance:
        _materialize(defs, ["vqa_samples"], instance)
        _materialize(defs, ["activations"], instance, partition="0")
        first = _materialize(defs, ["sae"], instance, partition="0|16")
        meta = _meta(first, "sae")
        assert meta["reused"] is False and meta["layer"] == 0 and meta["width"] == 16
        for key in ("fvu", "fvu_image", "fvu_text", "l0", "dead_fraction", "dense_fraction", "loss_recovered",
                    "metrics", "training_curve", "path"):
            assert key in meta, key
        assert "data:image/png;base64," in meta["training_curve"]
        assert _checks(first) == {"fvu": True, "dead_fraction": True}
        assert load_manifest(store, "sae", "layer=0/width=16") is not None
        mat = first.asset_materializations_for_node("sae")[-1]
        assert mat.partition == "0|16"

        second = _materialize(defs, ["sae"], instance, partition="0|16")
        assert _meta(second, "sae")["reused"] is True
        assert _meta(second, "sae")["fvu"] == meta["fvu"]

        # an impossible bound: same code version (nothing retrains), the check fails, the run does not
        strict = parse_config({**data, "sae": {**data["sae"], "check_max_fvu": 1e-12, "check_max_dead_fraction": 0.0}})
        strict_defs = build_definitions(strict)
        version = lambda d: _assets(d)["sae"].code_versions_by_key[dg.AssetKey("sae")]  # noqa: E731
        assert version(strict_defs) == version(defs)
        third = _materialize(strict_defs, ["sae"], instance, partition="0|16")
        assert _meta(third, "sae")["reused"] is True
        checks = _checks(third)
        assert checks["fvu"] is False
        assert checks["dead_fraction"] is (meta["dead_fraction"] == 0.0)


def test_sae_code_version_isolated(tiny_config_data):
    def versions(data):
        return {n: a.code_versions_by_key[dg.AssetKey(n)] for n, a in _assets(build_definitions(parse_config(data))).items()}

    base = versions(tiny_config_data)
    changed = versions({**tiny_config_data, "sae": {**tiny_config_data["sae"], "k": 8}})
    assert changed["sae"] != base["sae"]
    assert changed["activations"] == base["activations"] and changed["vqa_samples"] == base["vqa_samples"]
    bounds = versions({**tiny_config_data, "sae": {**tiny_config_data["sae"], "check_max_fvu": 0.1}})
    assert bounds == base


def test_sae_partitions_and_dependency(tiny_config_data):
    cfg = parse_config({**tiny_config_data, "widths": [16, 32]})
    sae = _assets(build_definitions(cfg))["sae"]
    keys = sae.partitions_def.get_partition_keys()
    assert sorted(keys) == ["0|16", "0|32", "2|16", "2|32"]
    assert dg.AssetKey("activations") in sae.dependency_keys


def test_materialize_commands_one_call_per_sae_key(tiny_config_data):
    from msae_assets.materialize import materialize_commands

    cmds = materialize_commands(parse_config({**tiny_config_data, "widths": [16, 32]}))
    per_key = [c[c.index("--select") + 1:] for c in cmds if "--partition" in c]
    stages = "sae,latent_stats,concepts,concept_scores,controls"
    assert per_key == [[stages, "--partition", k] for k in ("0|16", "0|32", "2|16", "2|32")]
    assert cmds[1][-2:] == ["--partition-range", "0...2"]
    assert cmds[-1][-1] == "report"  # after every partition it summarises
    only_sae = materialize_commands(parse_config(tiny_config_data), ("vqa_samples", "activations", "sae"))
    assert [c[-1] for c in only_sae] == ["vqa_samples", "0...2", "0|16", "2|16"]


def test_library_imports_without_dagster():
    import subprocess
    import sys

    code = ("import sys; sys.modules['dagster'] = None; import msae.sae.stage, msae.extract.extractor, "
            "msae.latents.stage, msae.explain.stage, msae.score.stage, msae.report.build, msae.embed.embedders; "
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_planted_recovery_through_fit_sae(tmp_path):
    """A small planted set through the same code path as the asset: features are found."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_planted import run

    res = run(tmp_path / "store", n_rows=16_384, d=32, n_features=24, token_budget=1_000_000, seed=0)
    assert res["mean_max_cos"] > 0.9
    assert res["modality_label_accuracy"] >= 0.75
    assert np.isfinite(res["fvu"]) and res["fvu"] < 0.2


def test_loss_recovered_on_answer_tokens(tiny_config_data):
    from msae.data.samples import read_samples
    from msae.extract.extractor import prepare_batches
    from msae.sae.stage import batched_loss_recovered
    from msae.vlm.load import load_vlm

    cfg = parse_config({**tiny_config_data, "sae": {**tiny_config_data["sae"], "loss_tokens": "answer"}})
    store = _extracted_store(cfg)
    vlm = load_vlm(cfg.model)
    samples = read_samples(store).head(3)
    batch = next(prepare_batches(samples, vlm, cfg.extraction, answer_mask=True))
    answer = batch["answer_mask"]
    assert answer.any(dim=1).all() and not (answer & ~batch["attention_mask"].bool()).any()
    sae = SparseCoder(32, 16, 4, seed=0)
    r = batched_loss_recovered(vlm, samples, cfg, 0, sae)
    assert r is not None and all(math.isfinite(v) for v in (r.clean, r.with_sae, r.zero_ablated))
