"""`checkpoint_sensor`: re-run extraction and everything after it when a new VLM checkpoint appears.

Every ``checkpoints.interval_s`` seconds (or, the schedule option, only at ``checkpoints.cron``
times) the sensor asks the watched location for its newest ready checkpoint
(:mod:`msae.checkpoints`). When its version differs from the one in the sensor's cursor it

* records an observation of `vlm_checkpoint` with the new data version (the UI then shows
  `activations` and what follows as stale), and
* starts a re-run of `activations` and every asset downstream of it, pinned to the checkpoint:
  every run carries its tags (``msae/checkpoint``, ``msae/checkpoint_path``,
  ``msae/checkpoint_revision``, ``msae/checkpoint_version``), so the VLM resource loads exactly
  that checkpoint and `activations` records it in its metadata and fingerprint.

Why waves of runs: one run cannot span two partitions definitions (`activations` is per layer,
the SAE stages per layer × width, `report` unpartitioned), and the run queue starts the runs a
sensor requests in any order, at once. A layer × width run started before `activations` finished
would read the previous checkpoint's activations manifest — and reuse its outputs. So the re-run
goes in waves in graph order (:func:`rerun_waves`): one run per partition key of each wave, and the
next wave only once every run of the previous one succeeded, checked on later ticks from the runs'
tags (``msae/rerun_wave``, ``msae/rerun_unit``). A failed run holds its wave; re-executing it (the
re-execution keeps the tags) lets the re-run go on, and a newer checkpoint starts over. Within a
run the assets go in dependency order; runs of one wave may overlap, and the GPU pool
(``dagster.yaml``: ``concurrency.pools.default_limit: 1``) serialises their GPU steps. Partitions
whose inputs did not change are not recomputed: each stage returns early when its manifest's
fingerprint still matches (:func:`msae_assets.stage.run_stage`).

Why the schedule option is a cron gate on the sensor rather than a ``ScheduleDefinition``: a
schedule keeps no cursor, and the waves need one. The gate is computed with ``croniter``.

Public Dagster API only: ``RunRequest`` (asset selection + partition key), ``SensorResult``,
``RunsFilter`` / ``DagsterInstance.get_run_records`` and ``RepositoryDefinition.assets_defs_by_key``.
"""

from __future__ import annotations

import datetime as dt
import graphlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from zoneinfo import ZoneInfo

import dagster as dg
from croniter import croniter

from msae.checkpoints import Checkpoint, CheckpointSource, checkpoint_source
from msae.config import CheckpointsConfig, MsaeConfig
from msae_assets.checkpoints import checkpoint_observation
from msae_resources.vlm import CHECKPOINT_TAGS, checkpoint_tags

SENSOR_NAME = "checkpoint_sensor"
FIRST_RECOMPUTED = "activations"
RECOMPUTED = dg.AssetSelection.assets(FIRST_RECOMPUTED).downstream()
WAVE_TAG = "msae/rerun_wave"  # index of the wave a run belongs to
UNIT_TAG = "msae/rerun_unit"  # "<first asset of its group>:<partition key or ->", one per run of a wave

SUCCEEDED = {dg.DagsterRunStatus.SUCCESS}
FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class SensorCursor:
    """What the sensor remembers between ticks: the last checkpoint it launched for, when it last
    looked, and (while a re-run is under way) the wave whose runs it waits for."""

    version: str | None = None
    id: str | None = None
    checked_at: float | None = None
    wave: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> SensorCursor:
        """The stored cursor; an empty or foreign one (e.g. set by hand with `dagster sensor cursor`)
        counts as 'nothing launched yet' — at worst one re-run, which the manifests make cheap."""
        try:
            raw = json.loads(text) if text else {}
            cursor = cls(**{k: raw[k] for k in ("version", "id", "checked_at", "wave", "tags") if k in raw})
            if not isinstance(cursor.tags, dict) or not (cursor.wave is None or isinstance(cursor.wave, int)):
                return cls()
            return cursor
        except (ValueError, TypeError, AttributeError):
            return cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def looked(self, now: float) -> SensorCursor:
        return SensorCursor(self.version, self.id, now, self.wave, self.tags)

    def at_wave(self, wave: int | None) -> SensorCursor:
        return SensorCursor(self.version, self.id, self.checked_at, wave, self.tags if wave is not None else {})


@dataclass(frozen=True)
class RunUnit:
    """One run of a wave: assets sharing a partitions definition, for one partition key (or none)."""

    assets: tuple[dg.AssetKey, ...]
    partition_key: str | None

    @property
    def name(self) -> str:
        return f"{self.assets[0].to_user_string()}:{self.partition_key or '-'}"


def rerun_waves(assets_by_key: Mapping[dg.AssetKey, dg.AssetsDefinition]) -> list[list[RunUnit]]:
    """`activations` and everything downstream, as waves of runs in graph order.

    An asset joins the wave of its latest upstream (within the re-run) when it shares that
    upstream's partitions definition (one run per key covers both, Dagster orders them inside the
    run), else the wave after it. Within a wave, assets group by partitions definition.
    """
    deps = {k: set(a.asset_deps[k]) for k, a in assets_by_key.items()}
    start = dg.AssetKey(FIRST_RECOMPUTED)
    chosen = {start}
    order = _graph_order(deps)
    for key in order:
        if deps.get(key, set()) & chosen:
            chosen.add(key)
    wave_of: dict[dg.AssetKey, int] = {}
    for key in (k for k in order if k in chosen):
        pdef = assets_by_key[key].partitions_def
        wave_of[key] = max((wave_of[d] + (assets_by_key[d].partitions_def != pdef) for d in deps[key] & chosen),
                           default=0)
    waves: list[list[RunUnit]] = []
    for index in range(max(wave_of.values()) + 1):
        groups: list[list[dg.AssetKey]] = []
        for key in (k for k in order if wave_of.get(k) == index):
            pdef = assets_by_key[key].partitions_def
            group = next((g for g in groups if assets_by_key[g[0]].partitions_def == pdef), None)
            if group is None:
                groups.append([key])
            else:
                group.append(key)
        waves.append([RunUnit(tuple(g), p) for g in groups for p in _partition_keys(assets_by_key[g[0]])])
    return waves


def _graph_order(deps: Mapping[dg.AssetKey, set[dg.AssetKey]]) -> list[dg.AssetKey]:
    """Topological order, level by level, names sorted within a level (stable run requests)."""
    sorter = graphlib.TopologicalSorter(deps)
    sorter.prepare()
    order: list[dg.AssetKey] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda k: k.to_user_string())
        order.extend(ready)
        sorter.done(*ready)
    return order


def _partition_keys(asset: dg.AssetsDefinition) -> list[str | None]:
    pdef = asset.partitions_def
    return [None] if pdef is None else list(pdef.get_partition_keys())


def wave_requests(wave: int, units: Sequence[RunUnit], tags: Mapping[str, str]) -> list[dg.RunRequest]:
    """One RunRequest per unit, pinned by ``tags``; the run key makes a repeated request a no-op."""
    version = tags.get(CHECKPOINT_TAGS["version"], "")
    return [dg.RunRequest(run_key=f"{version}:{wave}:{u.name}", asset_selection=list(u.assets),
                          partition_key=u.partition_key,
                          tags={**tags, WAVE_TAG: str(wave), UNIT_TAG: u.name})
            for u in units]


@dataclass(frozen=True)
class WaveStatus:
    done: list[str]
    running: list[str]
    failed: dict[str, list[str]]  # unit -> ids of its failed runs (none succeeded, none running)

    def describe(self, wave: int, total: int, units: int) -> str:
        text = f"wave {wave + 1}/{total}: {len(self.done)}/{units} runs succeeded, {len(self.running)} queued or running"
        if self.failed:
            ids = ", ".join(i for runs in self.failed.values() for i in runs[:1])
            text += (f", {len(self.failed)} failed (runs {ids}): re-execute them to go on, or a new "
                     "checkpoint starts over")
        return text


def wave_status(instance: dg.DagsterInstance, wave: int, units: Sequence[RunUnit],
                tags: Mapping[str, str]) -> WaveStatus:
    """Which units of a wave have a successful run (a re-execution counts: it keeps the tags)."""
    version = tags.get(CHECKPOINT_TAGS["version"], "")
    records = instance.get_run_records(filters=dg.RunsFilter(tags={CHECKPOINT_TAGS["version"]: version,
                                                                   WAVE_TAG: str(wave)}))
    by_unit: dict[str, list[dg.DagsterRun]] = {}
    for record in records:
        by_unit.setdefault(record.dagster_run.tags.get(UNIT_TAG, ""), []).append(record.dagster_run)
    done, running, failed = [], [], {}
    for unit in units:
        runs = by_unit.get(unit.name, [])
        if any(r.status in SUCCEEDED for r in runs):
            done.append(unit.name)
        elif not runs or any(r.status not in FAILED for r in runs):
            running.append(unit.name)  # not created yet (the daemon launches after the tick) or in flight
        else:
            failed[unit.name] = [r.run_id for r in runs]
    return WaveStatus(done, running, failed)


def cron_due(cron: str, timezone: str, last_checked: float | None, now: float) -> bool:
    """Has a tick of ``cron`` passed since ``last_checked`` (always true before the first look)?"""
    if last_checked is None:
        return True
    return latest_cron_tick(cron, timezone, now).timestamp() > last_checked


def latest_cron_tick(cron: str, timezone: str, now: float) -> dt.datetime:
    """The last tick of ``cron`` at or before ``now``, in ``timezone`` (croniter handles DST)."""
    at = dt.datetime.fromtimestamp(now, ZoneInfo(timezone))
    if croniter.match(cron, at):
        return at
    return croniter(cron, at).get_prev(dt.datetime)


def next_cron_tick(cron: str, timezone: str, now: float) -> dt.datetime:
    return croniter(cron, dt.datetime.fromtimestamp(now, ZoneInfo(timezone))).get_next(dt.datetime)


def evaluate_checkpoint_sensor(
    context: dg.SensorEvaluationContext, watched: CheckpointsConfig, source: CheckpointSource | None = None,
    now: float | None = None,
) -> dg.SensorResult:
    """One tick: look (if due) and start a re-run for a new checkpoint, else move a pending re-run on."""
    now = time.time() if now is None else now
    state = SensorCursor.parse(context.cursor)
    if watched.cron is not None and not cron_due(watched.cron, watched.timezone, state.checked_at, now):
        nxt = next_cron_tick(watched.cron, watched.timezone, now)
        looked_reason = f"next look at {nxt.isoformat()} (checkpoints.cron {watched.cron!r})"
    else:
        source = source or checkpoint_source(watched)
        ckpt = source.latest()
        state = state.looked(now)
        if ckpt is not None and ckpt.version != state.version:
            return start_rerun(context, watched, source, ckpt, now)
        looked_reason = (f"no checkpoint ready in {source.describe()}" if ckpt is None
                         else f"checkpoint {ckpt.id} ({ckpt.version}) already launched")
    if state.wave is None:
        return dg.SensorResult(skip_reason=looked_reason, cursor=state.dump())
    return advance_rerun(context, state, looked_reason)


def _waves(context: dg.SensorEvaluationContext) -> list[list[RunUnit]]:
    repo = context.repository_def
    if repo is None:
        raise dg.DagsterInvariantViolationError(f"{SENSOR_NAME} needs the repository (build_sensor_context(definitions=…))")
    return rerun_waves(repo.assets_defs_by_key)


def start_rerun(context: dg.SensorEvaluationContext, watched: CheckpointsConfig, source: CheckpointSource,
                ckpt: Checkpoint, now: float) -> dg.SensorResult:
    """The first wave (`activations`, every layer) pinned to ``ckpt``, and the observation."""
    waves = _waves(context)
    tags = checkpoint_tags(ckpt)
    context.log.info(f"new checkpoint {ckpt.id} ({ckpt.version}) in {source.describe()}: re-running "
                     f"activations and everything downstream in {len(waves)} waves")
    return dg.SensorResult(
        run_requests=wave_requests(0, waves[0], tags),
        cursor=SensorCursor(ckpt.version, ckpt.id, now, 0, tags).dump(),
        asset_events=[checkpoint_observation(watched, ckpt)],
    )


def advance_rerun(context: dg.SensorEvaluationContext, state: SensorCursor, looked_reason: str) -> dg.SensorResult:
    """The next wave once every run of the pending one succeeded; otherwise wait and say why."""
    waves = _waves(context)
    wave = state.wave if state.wave is not None and state.wave < len(waves) else None
    if wave is None:
        return dg.SensorResult(skip_reason=looked_reason, cursor=state.at_wave(None).dump())
    status = wave_status(context.instance, wave, waves[wave], state.tags)
    if len(status.done) < len(waves[wave]):
        return dg.SensorResult(
            skip_reason=f"{looked_reason}; re-run for {state.id}: {status.describe(wave, len(waves), len(waves[wave]))}",
            cursor=state.dump())
    nxt = wave + 1
    if nxt == len(waves):
        context.log.info(f"re-run for checkpoint {state.id} ({state.version}): all {len(waves)} waves succeeded")
        return dg.SensorResult(skip_reason=f"{looked_reason}; re-run for {state.id} complete",
                               cursor=state.at_wave(None).dump())
    context.log.info(f"re-run for checkpoint {state.id}: wave {wave + 1} succeeded, launching wave {nxt + 1}/{len(waves)}")
    return dg.SensorResult(run_requests=wave_requests(nxt, waves[nxt], state.tags), cursor=state.at_wave(nxt).dump())


def build_checkpoint_sensors(cfg: MsaeConfig) -> list[dg.SensorDefinition]:
    """``[checkpoint_sensor]`` when the config watches for checkpoints, else nothing."""
    watched = cfg.checkpoints
    if watched is None:
        return []
    if watched.cron is not None and not croniter.is_valid(watched.cron):
        raise dg.DagsterInvalidDefinitionError(f"checkpoints.cron {watched.cron!r} is not a valid cron expression "
                                               "(5 fields, e.g. '0 3 * * *')")
    when = f"at cron {watched.cron!r} ({watched.timezone})" if watched.cron else f"every {watched.interval_s} s"

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=watched.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if watched.enabled else dg.DefaultSensorStatus.STOPPED,
        asset_selection=RECOMPUTED,
        description=f"Looks {when} for a new checkpoint in {watched.watch} {watched.location}; on one, "
        "re-runs activations and everything downstream for it in waves of runs in graph order "
        "(run tags `msae/checkpoint*`, `msae/rerun_*`).",
    )
    def checkpoint_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return evaluate_checkpoint_sensor(context, watched)

    return [checkpoint_sensor]
