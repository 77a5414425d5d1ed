"""The checkpoint sensor: per new checkpoint, waves of public RunRequests in graph order (the next
only once the previous runs succeeded), none when unchanged, and runs pinned by its tags load that
checkpoint, record it, and reuse what did not change."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from msae.checkpoints import HubCheckpoints
from msae.config import parse_config
from msae_assets.checkpoints import CHECKPOINT_ASSET, DATA_VERSION_TAG
from msae_assets.definitions import build_definitions
from msae_assets.sensors import SENSOR_NAME, SensorCursor, evaluate_checkpoint_sensor
from msae_resources.vlm import CHECKPOINT_TAGS

OLD = time.time() - 3600


def fake_checkpoint(folder: Path, weights: bytes = b"w") -> Path:
    """A complete, settled save_pretrained-looking folder (the sensor never loads it)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llava_next"}')
    (folder / "model.safetensors").write_bytes(weights)
    for p in folder.iterdir():
        os.utime(p, (OLD, OLD))
    return folder


def watching(data: dict, location: Path, **kw) -> dict:
    return {**data, "checkpoints": {"watch": "folder", "location": str(location), "pattern": "checkpoint-*",
                                    "settle_s": 60, **kw}}


def tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None):
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    return sensor.evaluate_tick(ctx)


def add_run(instance: dg.DagsterInstance, req: dg.RunRequest, status: dg.DagsterRunStatus) -> str:
    """What the daemon would store for ``req`` (its tags), finished with ``status``."""
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", run_id=run_id, status=status, tags=dict(req.tags)))
    return run_id


def units(result) -> list[tuple[tuple[str, ...], str | None]]:
    return [(tuple(k.to_user_string() for k in r.asset_selection), r.partition_key) for r in result.run_requests]


PER_SAE = ("sae", "latent_stats", "concepts", "controls", "concept_scores")  # graph order


def test_sensor_requests_waves_of_runs_per_new_checkpoint(tiny_config_data, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    cfg = parse_config(watching(tiny_config_data, ckpts))
    defs = build_definitions(cfg)
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED  # off unless checkpoints.enabled
    assert sensor.minimum_interval_seconds == 300

    with dg.instance_for_test() as instance:
        empty = tick(defs, instance, None)
        assert empty.run_requests == [] and "no checkpoint ready" in empty.skip_message

        fake_checkpoint(ckpts / "checkpoint-100")
        first = tick(defs, instance, empty.cursor)
        # wave 1: activations, one run per layer (public RunRequests: asset selection + partition key)
        assert units(first) == [(("activations",), "0"), (("activations",), "2")]
        req = first.run_requests[0]
        assert req.tags[CHECKPOINT_TAGS["id"]] == "checkpoint-100"
        assert req.tags[CHECKPOINT_TAGS["name_or_path"]] == str(ckpts / "checkpoint-100")
        version = req.tags[CHECKPOINT_TAGS["version"]]
        assert version and SensorCursor.parse(first.cursor).version == version
        assert all(r.tags[CHECKPOINT_TAGS["version"]] == version and r.run_key for r in first.run_requests)
        # the checkpoint is observed with its version as the source asset's data version
        (obs,) = first.asset_events
        assert obs.asset_key == dg.AssetKey(CHECKPOINT_ASSET) and obs.tags[DATA_VERSION_TAG] == version
        # ... the same data version the observable source asset reports when observed from the UI
        from dagster._core.definitions.observe import observe

        source = next(a for a in defs.assets if getattr(a, "key", None) == dg.AssetKey(CHECKPOINT_ASSET))
        assert observe([source], instance=instance).success
        record = instance.get_latest_data_version_record(dg.AssetKey(CHECKPOINT_ASSET))
        assert record.event_log_entry.asset_observation.tags[DATA_VERSION_TAG] == version

        # unchanged, and the activations runs not finished: nothing new (no SAE run before its input)
        again = tick(defs, instance, first.cursor)
        assert again.run_requests == [] and "already launched" in again.skip_message
        assert "wave 1/3: 0/2 runs succeeded" in again.skip_message
        add_run(instance, first.run_requests[0], dg.DagsterRunStatus.SUCCESS)
        assert tick(defs, instance, again.cursor).run_requests == []  # one layer of two
        add_run(instance, first.run_requests[1], dg.DagsterRunStatus.SUCCESS)

        # wave 2: every layer x width stage, one run per key, in graph order inside the run
        second = tick(defs, instance, again.cursor)
        assert units(second) == [(PER_SAE, "0|16"), (PER_SAE, "2|16")]
        assert all(r.tags[CHECKPOINT_TAGS["version"]] == version for r in second.run_requests)
        # a failed run holds the wave and is named; its re-execution (same tags) lets it go on
        add_run(instance, second.run_requests[0], dg.DagsterRunStatus.SUCCESS)
        failed = add_run(instance, second.run_requests[1], dg.DagsterRunStatus.FAILURE)
        held = tick(defs, instance, second.cursor)
        assert held.run_requests == [] and "1 failed" in held.skip_message and failed in held.skip_message
        add_run(instance, second.run_requests[1], dg.DagsterRunStatus.SUCCESS)

        # wave 3: the report (unpartitioned), then the re-run is complete
        third = tick(defs, instance, held.cursor)
        assert units(third) == [(("report",), None)]
        add_run(instance, third.run_requests[0], dg.DagsterRunStatus.SUCCESS)
        done = tick(defs, instance, third.cursor)
        assert done.run_requests == [] and "complete" in done.skip_message
        assert SensorCursor.parse(done.cursor).wave is None
        assert tick(defs, instance, done.cursor).skip_message.endswith("already launched")

        # an unfinished newer folder (no weights yet) is ignored
        (ckpts / "checkpoint-200").mkdir()
        (ckpts / "checkpoint-200" / "config.json").write_text("{}")
        assert tick(defs, instance, done.cursor).run_requests == []

        # another checkpoint appears: a new re-run for it, from the first wave
        shutil.rmtree(ckpts / "checkpoint-200")
        fake_checkpoint(ckpts / "checkpoint-200", b"later")
        later = tick(defs, instance, done.cursor)
        assert [r.tags[CHECKPOINT_TAGS["id"]] for r in later.run_requests] == ["checkpoint-200"] * 2
        assert units(later)[0] == (("activations",), "0")
        assert later.run_requests[0].tags[CHECKPOINT_TAGS["version"]] != version
        # a newer checkpoint while a re-run waits supersedes it
        shutil.rmtree(ckpts / "checkpoint-200")
        fake_checkpoint(ckpts / "checkpoint-300", b"latest")
        newest = tick(defs, instance, later.cursor)
        assert {r.tags[CHECKPOINT_TAGS["id"]] for r in newest.run_requests} == {"checkpoint-300"}

        # a cursor set by hand that the sensor cannot read counts as "nothing launched yet"
        assert len(tick(defs, instance, "not json").run_requests) == 2


def test_sensor_enabled_and_no_sensor_without_checkpoints(tiny_config_data, tmp_path):
    on = build_definitions(parse_config(watching(tiny_config_data, tmp_path, enabled=True, interval_s=60)))
    sensor = on.resolve_sensor_def(SENSOR_NAME)
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING and sensor.minimum_interval_seconds == 60
    off = build_definitions(parse_config(tiny_config_data))
    assert list(off.sensors or []) == []
    assert CHECKPOINT_ASSET not in {a.key.to_user_string() for a in off.resolve_asset_graph().asset_nodes}


def test_cron_gate_and_hub_source(tiny_config_data, tmp_path):
    """The schedule option: looks only once a cron tick has passed; a hub repo's new commit triggers."""
    cfg = parse_config({**tiny_config_data, "checkpoints": {"watch": "hf_repo", "location": "me/llava-ft",
                                                            "cron": "0 3 * * *"}})
    defs = build_definitions(cfg)
    api = SimpleNamespace(sha="a" * 40)
    api.model_info = lambda repo_id, revision=None, **_: SimpleNamespace(sha=api.sha)
    source = HubCheckpoints("me/llava-ft", "main", api)
    day = dt.datetime(2026, 12, 1, 3, 30, tzinfo=dt.timezone.utc).timestamp()
    with dg.instance_for_test() as instance:
        def run(cursor, now):
            ctx = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
            return evaluate_checkpoint_sensor(ctx, cfg.checkpoints, source, now=now)

        first = run(None, day)  # never looked: look now
        req = first.run_requests[0]
        assert req.tags[CHECKPOINT_TAGS["revision"]] == "a" * 40
        assert req.tags[CHECKPOINT_TAGS["name_or_path"]] == "me/llava-ft"
        api.sha = "b" * 40
        early = run(first.cursor, day + 3600)  # 04:30, no tick since 03:30
        assert not early.run_requests and "next look" in early.skip_reason.skip_message
        next_day = run(first.cursor, day + 86400)  # 03:30 next day: the 03:00 tick passed
        assert {r.tags[CHECKPOINT_TAGS["revision"]] for r in next_day.run_requests} == {"b" * 40}
        # while a re-run waits, the cron gate still lets the sensor follow its runs (and say so)
        assert "wave 1/3" in run(next_day.cursor, day + 86400 + 3600).skip_reason.skip_message


@pytest.mark.slow
def test_runs_pinned_to_a_checkpoint_record_it_and_reuse(tiny_config_data, tiny_vlm_dir, tmp_path):
    """What a sensor-launched run does: load the tagged checkpoint, record it, recompute only for a new one."""
    from msae.manifest import load_manifest
    from msae.store import Store
    from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
    from msae.world.shapes import VOCABULARY

    ckpts = tmp_path / "ckpts"
    shutil.copytree(tiny_vlm_dir, ckpts / "checkpoint-1")
    cfg = parse_config(watching(tiny_config_data, ckpts, settle_s=0))
    defs = build_definitions(cfg)
    assets = {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}
    store = Store(cfg.store)

    def materialize(instance, names, partition=None, tags=None) -> dict:
        result = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                                partition_key=partition, selection=names, tags=tags)
        assert result.success
        mats = result.asset_materializations_for_node(names[-1])
        return {k: v.value for k, v in mats[-1].metadata.items()}

    def sensor_tags(instance, cursor):
        result = tick(defs, instance, cursor)
        tags = {r.tags[CHECKPOINT_TAGS["version"]] for r in result.run_requests}
        assert len(tags) == 1  # every run of the wave pinned to the same checkpoint
        return {k: v for k, v in result.run_requests[0].tags.items() if k in CHECKPOINT_TAGS.values()}, result.cursor

    with dg.instance_for_test() as instance:
        materialize(instance, ["vqa_samples"])
        tags, cursor = sensor_tags(instance, None)
        first = materialize(instance, ["activations"], "0", tags)
        assert first["reused"] is False and first["checkpoint"] == "checkpoint-1"
        assert first["checkpoint_version"] == tags[CHECKPOINT_TAGS["version"]]
        assert load_manifest(store, "activations", "2").metadata["checkpoint"] == "checkpoint-1"
        first_version = load_manifest(store, "activations", "0").data_version
        # the same checkpoint again (a re-executed run, or a manual run that finds it newest): reused
        assert materialize(instance, ["activations"], "2", tags)["reused"] is True
        assert materialize(instance, ["activations"], "0")["reused"] is True

        # a new checkpoint: different weights -> the fingerprint changes -> recomputed, recorded
        geometry = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=3, text_heads=2,
                               text_intermediate=64)
        model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), geometry, seed=1)
        model.save_pretrained(ckpts / "checkpoint-2")
        processor.save_pretrained(ckpts / "checkpoint-2")
        # a run pinned to checkpoint-1 still loads checkpoint-1, although checkpoint-2 is now the newest
        pinned = materialize(instance, ["activations"], "0", tags)
        assert pinned["checkpoint"] == "checkpoint-1" and pinned["reused"] is True
        tags2, cursor = sensor_tags(instance, cursor)
        assert tags2[CHECKPOINT_TAGS["id"]] == "checkpoint-2"
        second = materialize(instance, ["activations"], "0", tags2)
        assert second["reused"] is False and second["checkpoint"] == "checkpoint-2"
        assert second["extraction_fingerprint"] != first["extraction_fingerprint"]
        assert load_manifest(store, "activations", "0").data_version != first_version  # downstream goes stale
        # and the run's tags say which checkpoint it was
        runs = instance.get_runs()
        assert runs[0].tags[CHECKPOINT_TAGS["id"]] == "checkpoint-2"

