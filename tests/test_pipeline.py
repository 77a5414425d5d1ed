"""The Dagster pipeline: materialize twice and reuse, code versions isolate stages, real CLI run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from unittest import mock

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml
import zarr

from msae.config import parse_config
from msae.manifest import load_manifest
from msae.store import Store
from msae_assets.definitions import build_definitions


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets}


@contextlib.contextmanager
def _instance(env: dict[str, str]) -> Iterator[dg.DagsterInstance]:
    """The CLI runs' instance (their DAGSTER_HOME, which its dagster.yaml reads), from this process."""
    with mock.patch.dict(os.environ, {"DAGSTER_HOME": env["DAGSTER_HOME"]}), \
            dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        yield instance


def _materialize(defs, names, instance, partition=None) -> dg.ExecuteInProcessResult:
    assets = _assets(defs)
    result = dg.materialize(
        [assets[n] for n in names],
        instance=instance,
        resources=defs.resources,
        partition_key=partition,
        selection=names,
    )
    assert result.success
    return result


def _meta(result, name) -> dict:
    mats = result.asset_materializations_for_node(name)
    return {k: v.value for k, v in mats[-1].metadata.items()}


@pytest.mark.slow
def test_materialize_then_reuse(tiny_config_data):
    cfg = parse_config(tiny_config_data)
    defs = build_definitions(cfg)
    store = Store(cfg.store)
    with dg.instance_for_test() as instance:
        first = _materialize(defs, ["vqa_samples"], instance)
        assert _meta(first, "vqa_samples")["reused"] is False
        n_samples = _meta(first, "vqa_samples")["n_samples"]
        assert n_samples == 8

        act = _materialize(defs, ["activations"], instance, partition="0")
        assert _meta(act, "activations")["reused"] is False
        # one forward pass filled every configured layer
        tokens = pl.read_parquet(store.path(store.TOKENS))
        for layer in cfg.layers:
            arr = zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True))
            assert arr.shape[0] == tokens.height
            assert np.isfinite(arr[:64]).all()
            assert load_manifest(store, "activations", str(layer)) is not None
        assert tokens["sample_id"].n_unique() == n_samples

        # the other layer partition and a second run of everything reuse what is there
        other = _materialize(defs, ["activations"], instance, partition="2")
        assert _meta(other, "activations")["reused"] is True
        again = _materialize(defs, ["vqa_samples"], instance)
        assert _meta(again, "vqa_samples")["reused"] is True
        assert _materialize(defs, ["activations"], instance, partition="0") is not None


@pytest.mark.slow
def test_model_retrained_in_place_is_extracted_again(tiny_config_data, tiny_vlm_dir, tmp_path):
    """A model folder rewritten in place keeps its path: the activations must not be reused. New
    weights re-extract and get a new data version; a rewritten training report (eval.json) does
    not re-extract."""
    import shutil

    import torch
    from transformers import LlavaNextForConditionalGeneration

    folder = tmp_path / "vlm"
    shutil.copytree(tiny_vlm_dir, folder)
    data = {**tiny_config_data, "model": {**tiny_config_data["model"], "name_or_path": str(folder)}}
    store = Store(parse_config(data).store)
    with dg.instance_for_test() as instance:
        _materialize(build_definitions(parse_config(data)), ["vqa_samples"], instance)
        first = _meta(_materialize(build_definitions(parse_config(data)), ["activations"], instance, "0"),
                      "activations")
        version = load_manifest(store, "activations", "0").data_version
        (folder / "eval.json").write_text('{"note": "a training report"}')
        assert _meta(_materialize(build_definitions(parse_config(data)), ["activations"], instance, "0"),
                     "activations")["reused"] is True
        model = LlavaNextForConditionalGeneration.from_pretrained(folder)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.5)
        model.save_pretrained(folder)
        again = _meta(_materialize(build_definitions(parse_config(data)), ["activations"], instance, "0"),
                      "activations")
        assert first["reused"] is False and again["reused"] is False
        assert load_manifest(store, "activations", "0").data_version != version


def test_code_versions_isolate_stages(tiny_config_data):
    base = _assets(build_definitions(parse_config(tiny_config_data)))
    changed_extraction = {**tiny_config_data, "extraction": {"chunk_samples": 2}}
    changed_dataset = {**tiny_config_data, "dataset": {"kind": "shapes", "shapes": {"seed": 8, "n_images": 8}}}
    ex = _assets(build_definitions(parse_config(changed_extraction)))
    ds = _assets(build_definitions(parse_config(changed_dataset)))

    def version(assets, name):
        return assets[name].code_versions_by_key[dg.AssetKey(name)]

    assert version(ex, "vqa_samples") == version(base, "vqa_samples")
    assert version(ex, "activations") != version(base, "activations")
    assert version(ds, "vqa_samples") != version(base, "vqa_samples")
    assert version(ds, "activations") == version(base, "activations")  # changes reach it via data versions


def _kill_when(cmd: list[str], env: dict, log_path, line: str) -> None:
    """Start the CLI driver and SIGKILL its whole process group once ``line`` appears in its log
    (a crash or the OOM killer: nothing gets to clean up)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while proc.poll() is None and line not in log_path.read_text():
            time.sleep(0.2)
        assert proc.poll() is None, f"the driver ended before {line!r}:\n{log_path.read_text()[-3000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_cli_materializes_everything_and_is_resumable(tiny_config_data, tmp_path):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_data))
    env = {**os.environ, "MSAE_CONFIG": str(cfg_path), "DAGSTER_HOME": str(tmp_path / "dagster_home")}
    env.pop("MSAE_STORE", None)
    cmd = [sys.executable, "-m", "msae_assets.materialize"]
    # kill -9 of the driver (its runs are in-process) while the first SAE trains: its run stays
    # STARTED holding the gpu pool's only slot; the next call — here with the Dagster CLI, as CI
    # makes it — must fail it, release the slot and finish (no manual step)
    _kill_when([*cmd, "--verbose"], env, tmp_path / "killed.log", 'Started execution of step "sae"')
    out = subprocess.run([*cmd, "--cli"], env=env, capture_output=True, text=True)  # no time limit: a busy machine is slow, not wrong
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "was dead: marked failed, pool slots released" in out.stdout
    # quiet by default: a line per call, then where the report and latent browsers are
    calls = [line for line in out.stdout.splitlines() if line.startswith("call ")]
    per_sae = "sae,latent_stats,concepts,concept_scores,controls"
    assert [c.split(" … ")[0] for c in calls] == [
        "call 1 of 5: vqa_samples", "call 2 of 5: 0...2 activations", f"call 3 of 5: 0|16 {per_sae}",
        f"call 4 of 5: 2|16 {per_sae}", "call 5 of 5: report"]
    assert "sae computed" in calls[2] and "DEBUG" not in out.stdout + out.stderr
    assert f"Report: {tiny_config_data['store']}/report/index.html" in out.stdout
    store = Store(tiny_config_data["store"])
    assert store.exists(store.SAMPLES) and store.exists(store.TOKENS)
    first = {layer: load_manifest(store, "activations", str(layer)) for layer in (0, 2)}
    # a second run (in this process: the default) finds every manifest current and recorded: it
    # starts no Dagster run at all
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)  # no time limit: a busy machine is slow, not wrong
    assert out.returncode == 0, out.stderr[-3000:]
    calls = [line for line in out.stdout.splitlines() if line.startswith("call ")]
    assert len(calls) == 5 and all("up to date, skipped" in c for c in calls), calls
    assert "no Dagster run started" in out.stdout
    assert {layer: load_manifest(store, "activations", str(layer)) for layer in (0, 2)} == first
    # a check bound is outside every code version: only `sae` is called again (its checks re-evaluated,
    # its manifest reused); what follows it is judged on its own and stays skipped
    with _instance(env) as instance:
        before = instance.get_run_records()
    cfg_path.write_text(yaml.safe_dump({**tiny_config_data, "sae": {**tiny_config_data.get("sae", {}),
                                                                      "check_max_fvu": 0.999}}))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)  # no time limit: a busy machine is slow, not wrong
    assert out.returncode == 0, out.stderr[-3000:]
    calls = [line.split(" … ") for line in out.stdout.splitlines() if line.startswith("call ")]
    assert [c[0] for c in calls] == ["call 1 of 5: vqa_samples", "call 2 of 5: 0...2 activations",
                                     "call 3 of 5: 0|16 sae", "call 4 of 5: 2|16 sae", "call 5 of 5: report"]
    assert [c[1].split(" (")[0] for c in calls] == ["up to date, skipped", "up to date, skipped", "sae reused",
                                                   "sae reused", "up to date, skipped"]
    with _instance(env) as instance:
        assert len(instance.get_run_records()) == len(before) + 2


@pytest.mark.parametrize("profile", ["embedded", "paper"])
def test_a_config_and_its_dump_have_the_same_code_versions(profile):
    """A dumped config (benchmarks, MSAE_CONFIG files) must not look like an edit: defaults go
    through the validators that normalise values read from a file."""
    from msae.config import load_config
    from msae_assets.uptodate import stage_plans

    cfg = load_config(profile=profile)
    dumped = parse_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    versions = {k: p.code_version for k, p in stage_plans(cfg, lambda: None).items()}
    assert versions == {k: p.code_version for k, p in stage_plans(dumped, lambda: None).items()}
