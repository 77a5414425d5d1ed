"""Asset `sae` (per layer × width): one sparse autoencoder trained (or loaded) on a layer's activations.

Checks per partition: held-out FVU and dead fraction against ``sae.check_max_fvu`` /
``sae.check_max_dead_fraction``. The bounds are left out of the code version, so changing one
re-checks on the next materialization without retraining.
"""

import base64
import warnings
from contextlib import nullcontext

import dagster as dg

from msae.config import MsaeConfig
from msae.manifest import upstream_version
from msae.store import Store
from msae_assets.partitions import layer_width_partitions
from msae_assets.per_sae import sae_folder
from msae_assets.stage import STAMP, StagePlan, markdown_table, run_stage, to_dagster_metadata
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL, VLMResource

CHECK_FIELDS = {"check_max_fvu", "check_max_dead_fraction"}
CURVE = "training_curve.png"
TABLE_KEYS = ("fvu", "fvu_image", "fvu_text", "l0", "dead_fraction", "dense_fraction",
              "loss_clean", "loss_with_sae", "loss_zero_ablated", "loss_recovered")


def sae_code_version(cfg: MsaeConfig) -> str:
    return code_version("sae", cfg.sae.model_dump(mode="json", exclude=CHECK_FIELDS))


def sae_plan(cfg: MsaeConfig) -> StagePlan:
    """One layer × width SAE reads its layer's activations; the check bounds are in the stamp only."""
    return StagePlan("sae", sae_code_version(cfg), ("activations",),
                     lambda store, part: {"activations": upstream_version(store, "activations", _layer_of(part))},
                     check_config=cfg.sae.model_dump(include=CHECK_FIELDS))


def _layer_of(part: str | None) -> str:
    """"layer=1/width=256" → "1" (the activations' partition)."""
    return str(part).split("/")[0].removeprefix("layer=")


def sae_checks(cfg: MsaeConfig, meta: dict) -> list[dg.AssetCheckResult]:
    """Pass/fail of the two bounds, from the stage's metrics (NaN fails)."""
    bounds = {"fvu": ("fvu", cfg.sae.check_max_fvu), "dead_fraction": ("dead_fraction", cfg.sae.check_max_dead_fraction)}
    return [dg.AssetCheckResult(check_name=name, passed=bool(meta[key] <= bound),
                                metadata={key: meta[key], "max": bound})
            for name, (key, bound) in bounds.items()]


def build_sae_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    plan = sae_plan(cfg)
    version = plan.code_version
    partitions = layer_width_partitions(cfg)
    uses_vlm = cfg.sae.loss_samples > 0
    with warnings.catch_warnings():  # partitioned checks and this mapping are preview/beta in 1.13
        warnings.simplefilter("ignore")
        checks = [dg.AssetCheckSpec("fvu", asset="sae", partitions_def=partitions,
                                    description=f"held-out FVU ≤ `sae.check_max_fvu` ({cfg.sae.check_max_fvu})"),
                  dg.AssetCheckSpec("dead_fraction", asset="sae", partitions_def=partitions,
                                    description="latents never firing on held-out tokens ≤ "
                                    f"`sae.check_max_dead_fraction` ({cfg.sae.check_max_dead_fraction})")]
        dep = dg.AssetDep("activations", partition_mapping=dg.MultiToSingleDimensionPartitionMapping(
            partition_dimension_name="layer"))

    @dg.asset(
        name="sae",
        code_version=version,
        partitions_def=partitions,
        deps=[dep],
        check_specs=checks,
        description="A TopK/BatchTopK SAE per layer × width → `<store>/sae/layer=<L>/width=<W>/` (sparsify "
        "layout + `msae.json` metrics + training log), evaluated on held-out samples.",
        kinds={"pytorch", "safetensors"},
        group_name="sae",
        pool=GPU_POOL,  # training on the GPU, and (loss_samples > 0) the VLM
    )
    def sae(context: dg.AssetExecutionContext, vlm: VLMResource) -> dg.MaterializeResult:
        store = Store(cfg.store)
        keys = context.partition_key.keys_by_dimension
        layer, width = int(keys["layer"]), int(keys["width"])
        folder = store.sae_name(layer, width)

        def compute() -> tuple[str, dict]:
            from msae.sae.stage import fit_sae, training_curve_png  # torch: only when there is work

            with vlm.load() if uses_vlm else nullcontext(None) as loaded:
                r = fit_sae(cfg, store, layer, width, loaded, report=context.log.info)
            if (png := training_curve_png(r.log, f"layer {layer}, width {width}")) is not None:
                store.write_bytes(png, folder, CURVE)
            return r.data_version, {"path": r.path, "layer": layer, "width": width, "source": r.source,
                                    **r.metrics(), **{k: v for k, v in r.train.items() if v is not None}}

        part = sae_folder(layer, width)
        inputs = plan.inputs(store, part)
        m = run_stage(context, store, "sae", version, inputs, compute, partition=part)
        meta = {**m.metadata, STAMP: plan.stamp(m.fingerprint)}
        meta["metrics_md"] = markdown_table([{"metric": k, "value": f"{meta[k]:.4g}"} for k in TABLE_KEYS if k in meta])
        if store.exists(folder, CURVE):
            png = base64.b64encode(store.read_bytes(folder, CURVE)).decode()
            meta["training_curve_md"] = f"![training curve](data:image/png;base64,{png})"
        return dg.MaterializeResult(metadata=to_dagster_metadata(meta), data_version=dg.DataVersion(m.data_version),
                                    check_results=sae_checks(cfg, meta))

    return sae
