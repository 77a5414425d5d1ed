"""Observable source asset `vlm_checkpoint`: the newest checkpoint of the VLM, as a data version.

The design guide keeps checkpoints out of partition keys: a checkpoint is not a partition of the
work but a new version of an input. So the watched location (``checkpoints:`` in the config) is
a source asset whose data version is the checkpoint's revision (hub: the commit sha) or content
stamp (folder: a hash of its files' sizes and times). `activations` depends on it: a new
observation marks `activations` and everything after it stale in the UI, and the checkpoint
sensor (``msae_assets/sensors.py``) records the same observation when it launches the re-run.

Only defined when the config watches for checkpoints; otherwise the model is a fixed config value
and already part of the `activations` code version.
"""

import dagster as dg

from msae.checkpoints import Checkpoint, checkpoint_source
from msae.config import CheckpointsConfig, MsaeConfig

CHECKPOINT_ASSET = "vlm_checkpoint"
NO_CHECKPOINT = "none"  # data version while the location holds no ready checkpoint
DATA_VERSION_TAG = "dagster/data_version"  # how Dagster stores an observation's data version


def observation_metadata(watched: CheckpointsConfig, ckpt: Checkpoint | None) -> dict[str, str]:
    base = {"watch": watched.watch, "location": watched.location}
    if ckpt is None:
        return {**base, "checkpoint": "(none ready yet)"}
    return {**base, **ckpt.metadata()}


def checkpoint_observation(watched: CheckpointsConfig, ckpt: Checkpoint | None) -> dg.AssetObservation:
    """The observation a sensor records for ``ckpt`` (same data version the source asset reports)."""
    version = ckpt.version if ckpt is not None else NO_CHECKPOINT
    return dg.AssetObservation(CHECKPOINT_ASSET, metadata=observation_metadata(watched, ckpt),
                               tags={DATA_VERSION_TAG: version})


def build_checkpoint_assets(cfg: MsaeConfig) -> list[dg.SourceAsset]:
    """``[vlm_checkpoint]`` when ``cfg.checkpoints`` is set, else nothing."""
    watched = cfg.checkpoints
    if watched is None:
        return []

    @dg.observable_source_asset(
        name=CHECKPOINT_ASSET,
        group_name="extraction",
        description=f"The newest ready checkpoint of the VLM in {watched.watch} {watched.location}; its data "
        "version is the checkpoint's revision or content stamp (see `msae/checkpoints.py`).",
    )
    def vlm_checkpoint(context: dg.AssetExecutionContext) -> dg.ObserveResult:
        ckpt = checkpoint_source(watched).latest()
        context.log.info(f"vlm_checkpoint: {ckpt.id if ckpt else 'none ready'} in {watched.location}")
        return dg.ObserveResult(
            data_version=dg.DataVersion(ckpt.version if ckpt is not None else NO_CHECKPOINT),
            metadata=observation_metadata(watched, ckpt),
        )

    return [vlm_checkpoint]
