"""Finding the newest checkpoint: local folders (complete, settled, ordered) and hub revisions (faked)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from msae.checkpoints import (
    Checkpoint,
    FolderCheckpoints,
    HubCheckpoints,
    checkpoint_source,
    is_checkpoint,
    model_for_checkpoint,
    natural_key,
)
from msae.config import CheckpointsConfig, ConfigError, ModelConfig, parse_config
from msae_resources.vlm import VLMResource, checkpoint_from_tags, checkpoint_tags

OLD = time.time() - 3600  # an hour ago: settled


def write_checkpoint(folder: Path, weights: bytes = b"w", mtime: float | None = OLD, sharded: bool = False) -> Path:
    """A fake save_pretrained folder (config.json + weights), its files dated ``mtime``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    if sharded:
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
        for s in shards:
            (folder / s).write_bytes(weights)
    else:
        (folder / "model.safetensors").write_bytes(weights)
    if mtime is not None:
        for p in folder.iterdir():
            os.utime(p, (mtime, mtime))
    return folder


def test_natural_order():
    names = ["checkpoint-1000", "checkpoint-900", "checkpoint-90", "checkpoint-10000"]
    assert sorted(names, key=natural_key) == ["checkpoint-90", "checkpoint-900", "checkpoint-1000", "checkpoint-10000"]


def test_folder_newest_by_name_complete_and_settled(tmp_path):
    src = FolderCheckpoints(tmp_path / "ckpts", pattern="checkpoint-*", settle_s=60)
    assert src.latest() is None  # the folder does not exist yet
    write_checkpoint(tmp_path / "ckpts/checkpoint-900")
    write_checkpoint(tmp_path / "ckpts/checkpoint-1000")
    write_checkpoint(tmp_path / "ckpts/other-5000")  # does not match the pattern
    latest = src.latest()
    assert latest is not None and latest.id == "checkpoint-1000"
    assert latest.name_or_path == str(tmp_path / "ckpts/checkpoint-1000") and latest.revision is None

    # incomplete: config only, or a sharded save missing a shard -> not a checkpoint
    (tmp_path / "ckpts/checkpoint-2000").mkdir()
    (tmp_path / "ckpts/checkpoint-2000/config.json").write_text("{}")
    half = write_checkpoint(tmp_path / "ckpts/checkpoint-3000", sharded=True)
    (half / "model-00002-of-00002.safetensors").unlink()
    assert not is_checkpoint(tmp_path / "ckpts/checkpoint-2000") and not is_checkpoint(half)
    assert src.latest().id == "checkpoint-1000"

    # a complete but still-changing one is skipped until it settles
    write_checkpoint(tmp_path / "ckpts/checkpoint-4000", mtime=None)  # written just now
    assert src.latest().id == "checkpoint-1000"
    later = FolderCheckpoints(tmp_path / "ckpts", pattern="checkpoint-*", settle_s=60, clock=lambda: time.time() + 120)
    assert later.latest().id == "checkpoint-4000"


def test_folder_order_by_mtime_and_versions(tmp_path):
    write_checkpoint(tmp_path / "b", mtime=OLD - 100)
    write_checkpoint(tmp_path / "a", mtime=OLD)
    assert FolderCheckpoints(tmp_path, order="name", settle_s=0).latest().id == "b"
    by_time = FolderCheckpoints(tmp_path, order="mtime", settle_s=0)
    first = by_time.latest()
    assert first.id == "a"
    assert by_time.latest() == first  # stable while nothing changes
    write_checkpoint(tmp_path / "a", weights=b"new weights", mtime=OLD + 10)  # rewritten in place
    assert by_time.latest().version != first.version


def test_folder_that_is_itself_a_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path / "model")
    src = FolderCheckpoints(ckpt, settle_s=0)
    one = src.latest()
    assert one.id == "model" and one.name_or_path == str(ckpt)
    write_checkpoint(ckpt, weights=b"overwritten", mtime=OLD + 5)
    assert src.latest().version != one.version and src.latest().id == "model"


def test_hub_revision_with_a_fake_api():
    calls = []

    class FakeApi:
        sha = "a" * 40

        def model_info(self, repo_id, revision=None, **_):
            calls.append((repo_id, revision))
            return SimpleNamespace(sha=self.sha)

    api = FakeApi()
    src = HubCheckpoints("me/llava-ft", "main", api)
    ckpt = src.latest()
    assert ckpt == Checkpoint(id="a" * 12, name_or_path="me/llava-ft", revision="a" * 40, version="a" * 40)
    assert calls == [("me/llava-ft", "main")]
    api.sha = "b" * 40
    assert src.latest().revision == "b" * 40
    cfg = CheckpointsConfig(watch="hf_repo", location="me/llava-ft", revision="dev")
    assert checkpoint_source(cfg, api).latest().version == "b" * 40 and calls[-1] == ("me/llava-ft", "dev")


def test_model_for_checkpoint_keeps_everything_else():
    model = ModelConfig(name_or_path="base", dtype="bfloat16", batch_size="auto", device="cpu")
    ck = Checkpoint(id="x", name_or_path="me/repo", revision="c" * 40, version="c" * 40)
    out = model_for_checkpoint(model, ck)
    assert (out.name_or_path, out.revision) == ("me/repo", "c" * 40)
    assert out.model_dump(exclude={"name_or_path", "revision"}) == model.model_dump(exclude={"name_or_path", "revision"})
    assert model_for_checkpoint(model, None) is model


def test_config_validation(tmp_path):
    base = {"store": str(tmp_path), "dataset": {"kind": "shapes"}, "model": {"name_or_path": "m"},
            "layers": [0], "widths": [16]}
    cfg = parse_config({**base, "checkpoints": {"watch": "folder", "location": str(tmp_path), "cron": "0 3 * * *"}})
    assert cfg.checkpoints.watch == "folder" and not cfg.checkpoints.enabled
    with pytest.raises(ConfigError, match="absolute"):
        parse_config({**base, "checkpoints": {"watch": "folder", "location": "relative/ckpts"}})
    with pytest.raises(ConfigError, match="owner/name"):
        parse_config({**base, "checkpoints": {"watch": "hf_repo", "location": "/abs/path"}})
    with pytest.raises(ConfigError, match="5 cron fields"):
        parse_config({**base, "checkpoints": {"watch": "folder", "location": str(tmp_path), "cron": "daily"}})
    with pytest.raises(ConfigError, match="checkpoints.intervall_s"):
        parse_config({**base, "checkpoints": {"watch": "folder", "location": str(tmp_path), "intervall_s": 5}})
    assert parse_config({**base, "model": {"name_or_path": "m", "batch_size": "auto"}}).model.batch_size == "auto"
    with pytest.raises(ConfigError, match="model.batch_size"):
        parse_config({**base, "model": {"name_or_path": "m", "batch_size": 0}})


def test_resource_resolves_tags_then_newest(tmp_path):
    ck = Checkpoint(id="checkpoint-7", name_or_path=str(tmp_path / "checkpoint-7"), revision=None, version="v7")
    assert checkpoint_from_tags(checkpoint_tags(ck)) == ck
    assert checkpoint_from_tags({"other": "x"}) is None

    write_checkpoint(tmp_path / "checkpoint-1")
    watched = CheckpointsConfig(watch="folder", location=str(tmp_path), settle_s=0)
    res = VLMResource.from_config(ModelConfig(name_or_path="base", device="cpu"), watched)
    assert res.checkpoint().id == "checkpoint-1"
    assert res.resolved_model().name_or_path == str(tmp_path / "checkpoint-1")
    write_checkpoint(tmp_path / "checkpoint-2")
    assert res.checkpoint().id == "checkpoint-1"  # looked up once: one run, one checkpoint

    unwatched = VLMResource.from_config(ModelConfig(name_or_path="base", device="cpu"))
    assert unwatched.checkpoint() is None and unwatched.resolved_model().name_or_path == "base"


def test_checkpoints_library_imports_without_dagster():
    import subprocess
    import sys

    code = "import sys; sys.modules['dagster'] = None\nimport msae.checkpoints\nprint('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
