"""Asset `activations` (per layer): residual-stream activations in zarr plus the token table.

All configured layers are captured in one forward pass, so materializing any layer partition
fills every layer's array; the other partitions then find their manifests and return at once.

The model is one of the stage's inputs (:func:`msae.vlm.identity.model_identity`: a local
folder's content stamp, a hub id with its revision), so weights retrained in place are re-extracted.
When the config watches for checkpoints, the checkpoint the VLM resource loads for this run (the
sensor's pinned one, else the newest) is that input instead — its version joins the
fingerprint, so a new checkpoint is never mistaken for the one the stored activations came
from — and is recorded in the metadata (``checkpoint``, ``checkpoint_version``, …). The batch
settings are left out of the code version: they change speed and memory, not the activations.

Each layer's data version is that layer's value identity (:func:`msae.extract.progress.layer_data_versions`),
not the extraction run's fingerprint: a changed chunking or an added layer re-extracts, but a
layer whose values did not change keeps its data version, so its SAEs are not re-trained.
"""

from collections.abc import Callable

import dagster as dg

from msae.checkpoints import Checkpoint
from msae.config import ModelConfig, MsaeConfig
from msae.manifest import Manifest, current_manifest, fingerprint, reset_if_damaged, save_manifest, upstream_version
from msae.runtime import apply_threads, executor_concurrency
from msae.store import Store
from msae.store_lock import stage_lock
from msae.vlm.identity import model_identity
from msae_assets.run_health import tag_run_process
from msae_assets.checkpoints import CHECKPOINT_ASSET
from msae_assets.partitions import layer_partitions
from msae_assets.stage import STAMP, StagePlan, markdown_table, to_dagster_metadata
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL, VLMResource

# ModelConfig fields that change how fast and in how much memory extraction runs, never its output.
BATCH_FIELDS = {"batch_size", "auto_batch_max", "device_map"}


def activations_code_version(cfg: MsaeConfig) -> str:
    model: ModelConfig = cfg.model
    return code_version("activations", model.model_dump(mode="json", exclude=BATCH_FIELDS), cfg.extraction, cfg.layers)


def activations_plan(cfg: MsaeConfig, checkpoint: Callable[[], Checkpoint | None]) -> StagePlan:
    """The samples and the weights, for every layer alike. ``checkpoint``: the one the run loads
    (:meth:`msae_resources.vlm.VLMResource.checkpoint`; None: the model as configured, named by its
    content stamp, so a model retrained in place keeps its path but not its identity)."""

    def inputs(store: Store, _partition: str | None) -> dict[str, str]:
        found = {"vqa_samples": upstream_version(store, "vqa_samples")}
        if (ckpt := checkpoint()) is not None:
            found[CHECKPOINT_ASSET] = ckpt.version
        else:
            found["model"] = model_identity(cfg.model.name_or_path, cfg.model.revision)
        return found

    deps = ("vqa_samples", *((CHECKPOINT_ASSET,) if cfg.checkpoints is not None else ()))
    return StagePlan("activations", activations_code_version(cfg), deps, inputs)


def build_activations_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    version = activations_code_version(cfg)
    deps = list(activations_plan(cfg, lambda: None).upstream)

    @dg.asset(
        name="activations",
        code_version=version,
        partitions_def=layer_partitions(cfg),
        backfill_policy=dg.BackfillPolicy.single_run(),
        deps=deps,
        description="Residual stream of each decoder layer → `<store>/activations/layer=<L>.zarr` "
        "and one token table `<store>/tokens.parquet` (row i describes row i of every layer).",
        kinds={"pytorch", "zarr"},
        group_name="extraction",
        pool=GPU_POOL,
    )
    def activations(context: dg.AssetExecutionContext, vlm: VLMResource) -> dg.MaterializeResult:
        tag_run_process(context)
        apply_threads(cfg, step_concurrency=executor_concurrency(context))  # msae.runtime
        store = Store(cfg.store)
        ckpt = vlm.checkpoint()
        plan = activations_plan(cfg, vlm.checkpoint)
        inputs = plan.inputs(store, None)
        fp = fingerprint(version, inputs)
        wanted = [int(k) for k in context.partition_keys]
        done = {layer: current_manifest(store, "activations", fp, str(layer)) for layer in wanted}
        if all(done.values()):
            context.log.info(f"activations {wanted}: up to date ({fp}), reusing")
            manifests = [Manifest(m.stage, m.fingerprint, m.data_version, {**m.metadata, "reused": True})
                         for m in done.values() if m is not None]
        else:  # one writer for all layers (they share tokens.parquet and _progress/); damaged arrays start over
            with stage_lock(store, "activations", run_id=context.run_id):
                reset_if_damaged(store, "activations", [str(layer) for layer in cfg.layers])
                manifests = _extract_all_layers(cfg, store, vlm, fp, ckpt.metadata() if ckpt is not None else {},
                                                inputs)
            manifests = [m for m in manifests if int(m.metadata["layer"]) in wanted]
        meta = manifests[0].metadata if len(manifests) == 1 else {
            "layers_md": markdown_table([{k: m.metadata[k] for k in ("layer", "rows", "path")} for m in manifests])
        }
        shared = {k: v for k, v in manifests[0].metadata.items() if k not in ("layer", "path", "rows", "bytes")}
        return dg.MaterializeResult(
            metadata=to_dagster_metadata({**shared, **meta, STAMP: plan.stamp(fp)}),
            data_version=dg.DataVersion("+".join(sorted({m.data_version for m in manifests}))),
        )

    return activations

def _extract_all_layers(cfg: MsaeConfig, store: Store, vlm: VLMResource, fp: str,
                        checkpoint_meta: dict, inputs: dict[str, str]) -> list[Manifest]:
    """One forward pass for every configured layer; a manifest per layer (with the checkpoint used)
    whose data version is the layer's value identity (module doc)."""
    from msae.data.images import ImageLimits
    from msae.data.samples import read_samples
    from msae.extract.extractor import extract_activations
    from msae.extract.progress import layer_data_versions

    with vlm.load() as loaded:
        result = extract_activations(read_samples(store), loaded, cfg.layers, store, cfg.extraction,
                                     image_limits=ImageLimits.from_config(cfg.dataset))
    common = {**result.summary(), **checkpoint_meta}
    # the model settings the code version hashes (device, attention kernel, …) and the upstream data
    # versions also decide the values; the layer list and the storage layout do not
    model = cfg.model.model_dump(mode="json", exclude=BATCH_FIELDS)
    versions = layer_data_versions(store, cfg.layers, {"model": model, "inputs": inputs})
    manifests = []
    for layer in cfg.layers:
        layer_meta = result.layer_summary(layer)
        meta = {**common, **layer_meta, "layer": layer}
        m = Manifest("activations", fp, versions[layer], meta)
        save_manifest(store, m, str(layer))
        manifests.append(m)
    return manifests
