"""Asset `concepts` (layer × width): a visual and a textual concept per explained latent and prompting mode.

Check per partition: ``explainer_requests_ok`` (severity WARN) — every explainer request was
answered. A partition with failed requests still materializes (its other proposals are usable)
but is recorded as incomplete, so the next materialization re-sends exactly the failed requests.
"""

import warnings

import dagster as dg

from msae.config import MsaeConfig
from msae.store import Store
from msae_assets.partitions import layer_width_partitions
from msae_assets.per_sae import build_per_sae_asset, per_sae_plan
from msae_assets.stage import StagePlan, markdown_table
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL


def concepts_code_version(cfg: MsaeConfig) -> str:
    """Explainer settings that shape answers plus the prompt templates' text: a prompt edit reruns this."""
    from msae.explain.stage import explainer_fingerprint

    return code_version("concepts", explainer_fingerprint(cfg.explainer, cfg.model))


def concepts_plan(cfg: MsaeConfig) -> StagePlan:
    return per_sae_plan("concepts", concepts_code_version(cfg), ["latent_stats"])


def _decorate(store: Store, layer: int, width: int, meta: dict) -> dict:
    import polars as pl

    from msae.explain.stage import PROPOSALS, concepts_folder

    p = store.read_parquet(concepts_folder(layer, width), PROPOSALS)
    rows = [{"latent": r["latent"], "mode": r["prompting"], "visual": r["visual_concept"] or "—",
             "textual": r["textual_concept"] or "—"}
            for r in p.filter(pl.col("visual_concept").is_not_null()).head(12).iter_rows(named=True)]
    return {**meta, "examples_md": markdown_table(rows)}


REQUESTS_OK = "explainer_requests_ok"


def concepts_checks(meta: dict) -> list[dg.AssetCheckResult]:
    """WARN (not an error: the answered proposals stand) when explainer requests failed, with the
    count and a few examples; reused manifests are always complete, so they pass."""
    failed = int(meta.get("explainer_failures", meta.get("errors", 0)) or 0)
    return [dg.AssetCheckResult(
        check_name=REQUESTS_OK, passed=failed == 0, severity=dg.AssetCheckSeverity.WARN,
        metadata={"failed": failed, "requests": int(meta.get("requests", 0)),
                  "reasons": dg.MetadataValue.json(meta.get("explainer_failure_reasons", {})),
                  "examples": dg.MetadataValue.json(meta.get("explainer_failure_examples", []))},
        description=None if failed == 0 else f"{failed} explainer requests failed; the next materialization "
        "re-sends them (answers that arrived are cached)")]


def build_concepts_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    from msae.explain.stage import run_concepts

    with warnings.catch_warnings():  # partitioned checks are preview in 1.13
        warnings.simplefilter("ignore")
        specs = [dg.AssetCheckSpec(REQUESTS_OK, asset="concepts", partitions_def=layer_width_partitions(cfg),
                                   description="every explainer request of the partition was answered "
                                   "(WARN otherwise: failed ones are re-sent on the next materialization)")]
    return build_per_sae_asset(
        cfg, plan=concepts_plan(cfg),
        compute=lambda store, layer, width, fp: run_concepts(cfg, store, layer, width),
        description="Explainer proposals (masked regions and whole-image baseline) → "
        "`<store>/concepts/layer=<L>/width=<W>/proposals.parquet`.",
        group="concepts", kinds={"parquet"}, decorate=_decorate, check_specs=specs, checks=concepts_checks,
        pool=GPU_POOL if cfg.explainer.backend == "transformers" else None,  # it loads a VLM; the others do not
    )
