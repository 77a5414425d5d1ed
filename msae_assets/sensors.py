"""`checkpoint_sensor`: re-run extraction and everything after it when a new VLM checkpoint appears.

Every ``checkpoints.interval_s`` seconds (or, the schedule option, only at ``checkpoints.cron``
times) the sensor asks the watched location for its newest ready checkpoint
(:mod:`msae.checkpoints`). When its version differs from the one in the sensor's cursor it

* records an observation of `vlm_checkpoint` with the new data version (the UI then shows
  `activations` and what follows as stale), and
* requests a backfill of `activations` and every asset downstream of it, all partitions, tagged
  with the checkpoint (``msae/checkpoint``, ``msae/checkpoint_path``, ``msae/checkpoint_revision``,
  ``msae/checkpoint_version``). Each run of the backfill carries the tags; the VLM resource loads
  exactly that checkpoint, and `activations` records it in its metadata and fingerprint.

A backfill, not a run: `activations` is per layer and the SAE stages per layer × width, and one
run cannot span two partitions definitions; the backfill daemon runs them in graph order, one
single run for all layers of `activations` (its backfill policy), then each layer × width key.
Partitions whose inputs did not change are not recomputed: each stage returns early when its
manifest's fingerprint still matches (:func:`msae_assets.stage.run_stage`).

Why the schedule option is a cron gate on the sensor rather than a ``ScheduleDefinition``: Dagster
1.13 schedules cannot launch backfills, which a graph with two partitions definitions needs.

Dagster internals used (pinned by ``dagster>=1.13,<1.14``): ``RunRequest.for_asset_graph_subset``
(how Dagster's own automation launches backfills) and its cron helper.
"""

import datetime as dt
import json
import time
from dataclasses import asdict, dataclass

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._utils.schedules import get_latest_completed_cron_tick, get_next_cron_tick

from msae.checkpoints import Checkpoint, CheckpointSource, checkpoint_source
from msae.config import CheckpointsConfig, MsaeConfig
from msae_assets.checkpoints import checkpoint_observation
from msae_resources.vlm import checkpoint_tags

SENSOR_NAME = "checkpoint_sensor"
RECOMPUTED = dg.AssetSelection.assets("activations").downstream()


@dataclass(frozen=True)
class SensorCursor:
    """What the sensor remembers between ticks: the last checkpoint it launched for, when it last looked."""

    version: str | None = None
    id: str | None = None
    checked_at: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> "SensorCursor":
        """The stored cursor; an empty or foreign one (e.g. set by hand with `dagster sensor cursor`)
        counts as 'nothing launched yet' — at worst one re-run, which the manifests make cheap."""
        try:
            raw = json.loads(text) if text else {}
            return cls(**{k: raw[k] for k in ("version", "id", "checked_at") if k in raw})
        except (ValueError, TypeError):
            return cls()

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def cron_due(cron: str, timezone: str, last_checked: float | None, now: float) -> bool:
    """Has a tick of ``cron`` passed since ``last_checked`` (always true before the first look)?"""
    if last_checked is None:
        return True
    latest_tick = get_latest_completed_cron_tick(cron, dt.datetime.fromtimestamp(now, dt.timezone.utc), timezone)
    return latest_tick.timestamp() > last_checked


def recompute_request(context: dg.SensorEvaluationContext, ckpt: Checkpoint) -> dg.RunRequest:
    """A backfill of `activations` and everything downstream, every partition, pinned to ``ckpt``."""
    repo = context.repository_def
    if repo is None:
        raise dg.DagsterInvariantViolationError(f"{SENSOR_NAME} needs the repository (build_sensor_context(definitions=…))")
    graph = repo.asset_graph
    subset = AssetGraphSubset.from_asset_keys(RECOMPUTED.resolve(graph), graph)
    return dg.RunRequest.for_asset_graph_subset(subset, tags=checkpoint_tags(ckpt))


def evaluate_checkpoint_sensor(
    context: dg.SensorEvaluationContext, watched: CheckpointsConfig, source: CheckpointSource | None = None,
    now: float | None = None,
) -> dg.SensorResult:
    """One tick: look (if due), compare with the cursor, request the re-run for a new checkpoint."""
    now = time.time() if now is None else now
    state = SensorCursor.parse(context.cursor)
    if watched.cron is not None and not cron_due(watched.cron, watched.timezone, state.checked_at, now):
        nxt = get_next_cron_tick(watched.cron, dt.datetime.fromtimestamp(now, dt.timezone.utc), watched.timezone)
        return dg.SensorResult(skip_reason=f"next look at {nxt.isoformat()} (checkpoints.cron {watched.cron!r})")
    source = source or checkpoint_source(watched)
    ckpt = source.latest()
    looked = SensorCursor(state.version, state.id, now)
    if ckpt is None:
        return dg.SensorResult(skip_reason=f"no checkpoint ready in {source.describe()}", cursor=looked.dump())
    if ckpt.version == state.version:
        return dg.SensorResult(skip_reason=f"checkpoint {ckpt.id} ({ckpt.version}) already launched",
                               cursor=looked.dump())
    context.log.info(f"new checkpoint {ckpt.id} ({ckpt.version}) in {source.describe()}: re-running "
                     "activations and everything downstream")
    return dg.SensorResult(
        run_requests=[recompute_request(context, ckpt)],
        cursor=SensorCursor(ckpt.version, ckpt.id, now).dump(),
        asset_events=[checkpoint_observation(watched, ckpt)],
    )


def build_checkpoint_sensors(cfg: MsaeConfig) -> list[dg.SensorDefinition]:
    """``[checkpoint_sensor]`` when the config watches for checkpoints, else nothing."""
    watched = cfg.checkpoints
    if watched is None:
        return []
    when = f"at cron {watched.cron!r} ({watched.timezone})" if watched.cron else f"every {watched.interval_s} s"

    @dg.sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=watched.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING if watched.enabled else dg.DefaultSensorStatus.STOPPED,
        asset_selection=RECOMPUTED,
        description=f"Looks {when} for a new checkpoint in {watched.watch} {watched.location}; on one, "
        "backfills activations and everything downstream for it (run tags msae/checkpoint*).",
    )
    def checkpoint_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        return evaluate_checkpoint_sensor(context, watched)

    return [checkpoint_sensor]
