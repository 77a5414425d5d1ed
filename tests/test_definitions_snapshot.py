"""Snapshot of the Dagster definitions of the embedded profile: what the UI, the daemon and the
manifests see — asset keys, partitions, dependencies (with their partition mappings), pools, asset
checks, code versions per stage — and the checkpoint sensor (with a ``checkpoints:`` section added).

A change to any of these is a change of behaviour (a new code version recomputes the stage and makes
everything after it stale), so it has to be deliberate: the test fails with a readable diff, and

    .venv/bin/python tests/test_definitions_snapshot.py --update

rewrites ``tests/snapshots/definitions.json`` (commit it with the change that caused it).

Paths are taken as the profile writes them (resolved against an empty folder), so the snapshot does
not depend on where the checkout lives.
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"
WATCHING = {"watch": "hf_repo", "location": "me/llava-ft", "cron": "0 3 * * *"}


def partitions(pdef: dg.PartitionsDefinition | None) -> dict[str, Any] | None:
    if pdef is None:
        return None
    out: dict[str, Any] = {"kind": type(pdef).__name__, "keys": list(pdef.get_partition_keys())}
    if isinstance(pdef, dg.MultiPartitionsDefinition):
        out["dimensions"] = [d.name for d in pdef.partitions_defs]
    return out


def describe_asset(asset: dg.AssetsDefinition, key: dg.AssetKey) -> dict[str, Any]:
    deps = {}
    for dep in sorted(asset.asset_deps[key], key=lambda k: k.to_user_string()):
        mapping = asset.get_partition_mapping(dep)
        deps[dep.to_user_string()] = type(mapping).__name__ if mapping is not None else None
    return {
        "group": asset.group_names_by_key.get(key),
        "partitions": partitions(asset.partitions_def),
        "deps": deps,
        "pool": asset.op.pool if asset.is_executable else None,
        "code_version": asset.code_versions_by_key.get(key),
        "checks": sorted(spec.name for spec in asset.check_specs if spec.asset_key == key),
        "observable_source": asset.is_observable,
    }


def describe(defs: dg.Definitions) -> dict[str, Any]:
    repo = defs.get_repository_def()
    assets = {k.to_user_string(): describe_asset(a, k) for k, a in repo.assets_defs_by_key.items()}
    for key, source in repo.source_assets_by_key.items():  # vlm_checkpoint, when checkpoints are watched
        assets[key.to_user_string()] = {"group": source.group_name, "observable_source": source.is_observable,
                                        "partitions": partitions(source.partitions_def)}
    sensors = {}
    for sensor in repo.sensor_defs:
        selection = sensor.asset_selection.resolve(list(repo.assets_defs_by_key.values())) \
            if sensor.asset_selection is not None else set()
        sensors[sensor.name] = {"minimum_interval_seconds": sensor.minimum_interval_seconds,
                                "default_status": sensor.default_status.value,
                                "assets": sorted(k.to_user_string() for k in selection)}
    return {"assets": dict(sorted(assets.items())), "sensors": sensors,
            "resources": sorted(repo.get_top_level_resources())}


def current() -> dict[str, Any]:
    """The embedded profile, and the same watching a hub repo for checkpoints (the sensor's setup)."""
    from msae.config import parse_config, profile_text
    from msae_assets.definitions import build_definitions

    data = yaml.safe_load(profile_text("embedded"))
    with tempfile.TemporaryDirectory() as empty:
        base = Path(empty)
        plain = parse_config(data, "profile embedded", base)
        watching = parse_config({**data, "checkpoints": WATCHING}, "profile embedded + checkpoints", base)
        return {"embedded": describe(build_definitions(plain)),
                "embedded_watching_checkpoints": describe(build_definitions(watching))}


def render(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"


def test_definitions_match_the_snapshot():
    got = render(current())
    want = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(keepends=True), got.splitlines(keepends=True),
                                            fromfile=str(SNAPSHOT), tofile="current definitions"))
        raise AssertionError("the Dagster definitions changed; if that is intended, run "
                             f"`.venv/bin/python tests/test_definitions_snapshot.py --update`\n{diff}")


def test_every_gpu_step_is_in_the_gpu_pool():
    """The steps that use the accelerator take turns on it (one pool, one slot in dagster.yaml)."""
    from msae_resources.vlm import GPU_POOL

    assets = current()["embedded"]["assets"]
    gpu = {"sae", "latent_stats", "concept_scores", "controls"}
    assert {name for name, a in assets.items() if a["pool"] == GPU_POOL} >= gpu
    assert assets["report"]["pool"] is None and assets["vqa_samples"]["pool"] is None


def test_transformers_explainer_puts_concepts_in_the_gpu_pool():
    from msae.config import parse_config, profile_text
    from msae_assets.concepts import build_concepts_asset
    from msae_resources.vlm import GPU_POOL

    data = yaml.safe_load(profile_text("embedded"))
    with tempfile.TemporaryDirectory() as empty:
        for backend, pool in (("transformers", GPU_POOL), ("openai", None)):
            explainer = {**data.get("explainer", {}), "backend": backend, "model": "some/model"}
            cfg = parse_config({**data, "explainer": explainer}, "test", Path(empty))
            assert build_concepts_asset(cfg).op.pool == pool, backend


def validate(env_config: Path | None, home: Path) -> subprocess.CompletedProcess:
    """``dagster definitions validate`` on the workspace, as CI runs it (own instance, bounded)."""
    env = {**os.environ, "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MSAE_CONFIG", None)
    if env_config is not None:
        env["MSAE_CONFIG"] = str(env_config)
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    return subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w",
                           str(ROOT / "workspace.yaml")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_dagster_definitions_validate(tmp_path):
    """The embedded profile and a checkpoint-watching config load in Dagster's own validator; a
    definition error (an impossible cron time) makes it fail, so the check is not vacuous."""
    data = yaml.safe_load((ROOT / "msae" / "profiles" / "embedded.yaml").read_text())
    ok = validate(None, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "All code locations passed validation" in ok.stdout + ok.stderr
    watching = tmp_path / "watching.yaml"
    watching.write_text(yaml.safe_dump({**data, "checkpoints": WATCHING}))
    ok = validate(watching, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "checkpoints": {**WATCHING, "cron": "61 3 * * *"}}))
    failed = validate(bad, tmp_path)
    assert failed.returncode == 1 and "61 3 * * *" in failed.stdout + failed.stderr


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: python tests/test_definitions_snapshot.py --update")
    SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
    SNAPSHOT.write_text(render(current()))
    print(f"wrote {SNAPSHOT}")
