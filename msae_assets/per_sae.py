"""The shape every layer × width stage after `sae` shares: one partition in, files out, a manifest."""

from collections.abc import Callable, Sequence
from typing import Any

import dagster as dg

from msae.config import MsaeConfig
from msae.manifest import layer_width_folder, upstream_version
from msae.store import Store
from msae_assets.partitions import layer_width_partitions
from msae_assets.stage import STAMP, StagePlan, run_stage, to_dagster_metadata

Compute = Callable[[Store, int, int, str], tuple[str, dict[str, Any]]]
"""(store, layer, width, fingerprint) -> (data version, metadata)."""
Checks = Callable[[dict[str, Any]], list[dg.AssetCheckResult]]
"""The stage's metadata (computed or reused) -> one result per check spec."""


def sae_partition(context: dg.AssetExecutionContext) -> tuple[int, int]:
    keys = context.partition_key.keys_by_dimension
    return int(keys["layer"]), int(keys["width"])


def sae_folder(layer: int, width: int) -> str:
    """The store's form of a layer × width partition (its manifests' and outputs' sub-folder)."""
    return layer_width_folder(layer, width)


def per_sae_plan(name: str, version: str, upstream: Sequence[str]) -> StagePlan:
    """A layer × width stage reads the same partition of each upstream stage."""
    return StagePlan(name, version, tuple(upstream),
                     lambda store, part: {u: upstream_version(store, u, part) for u in upstream})


def build_per_sae_asset(
    cfg: MsaeConfig, *, plan: StagePlan, compute: Compute, description: str,
    group: str, kinds: set[str], decorate: Callable[[Store, int, int, dict], dict] | None = None,
    check_specs: Sequence[dg.AssetCheckSpec] = (), checks: Checks | None = None, pool: str | None = None,
) -> dg.AssetsDefinition:
    """An asset partitioned like `sae`, reading its upstream stages of the same partition.

    ``pool``: the Dagster pool of its step (:data:`msae_resources.vlm.GPU_POOL` when it uses the GPU).

    ``check_specs``/``checks``: asset checks evaluated from the stage's metadata on every
    materialization (also when the manifest is reused), so their results always describe the output.
    """

    name, version = plan.stage, plan.code_version

    @dg.asset(name=name, code_version=version, partitions_def=layer_width_partitions(cfg), deps=list(plan.upstream),
              description=description, kinds=kinds, group_name=group, check_specs=list(check_specs),
              pool=pool)
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from msae.manifest import fingerprint

        store = Store(cfg.store)
        layer, width = sae_partition(context)
        part = sae_folder(layer, width)
        inputs = plan.inputs(store, part)
        fp = fingerprint(version, inputs)
        m = run_stage(context, store, name, version, inputs, lambda: compute(store, layer, width, fp), partition=part)
        meta = {**m.metadata, STAMP: plan.stamp(fp)}
        results = checks(meta) if checks is not None else []
        if decorate is not None:
            meta = decorate(store, layer, width, meta)
        return dg.MaterializeResult(metadata=to_dagster_metadata(meta), data_version=dg.DataVersion(m.data_version),
                                    check_results=results)

    return _asset
