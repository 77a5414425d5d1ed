"""Asset `vqa_samples`: the VQA samples the VLM will read, validated, as one parquet table."""

import hashlib

import dagster as dg
import polars as pl

from msae.config import MsaeConfig
from msae.store import Store
from msae_assets.stage import STAMP, StagePlan, markdown_table, run_stage, to_dagster_metadata
from msae_assets.versions import code_version


def table_version(df: pl.DataFrame) -> str:
    """Content hash of a table: equal samples → equal data version → no downstream cascade."""
    return hashlib.sha256(df.write_csv().encode()).hexdigest()[:16]


def vqa_samples_plan(cfg: MsaeConfig) -> StagePlan:
    """The samples read nothing upstream: the dataset settings (the code version) decide them."""
    return StagePlan("vqa_samples", code_version("vqa_samples", cfg.dataset), (), lambda store, part: {})


def build_vqa_samples_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    plan = vqa_samples_plan(cfg)

    @dg.asset(
        name="vqa_samples",
        code_version=plan.code_version,
        description="Validated VQA samples (sample_id, image, question, answer) → `<store>/samples.parquet`",
        kinds={"polars", "parquet"},
        group_name="extraction",
    )
    def vqa_samples(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from msae.data.samples import build_samples, write_samples

        store = Store(cfg.store)

        def compute() -> tuple[str, dict]:
            result = build_samples(cfg.dataset, store)
            write_samples(result, store)
            skips = [{"reason": k, "count": v} for k, v in sorted(result.skips.items())]
            return table_version(result.table), {
                "path": store.url(store.SAMPLES),
                "n_samples": result.table.height,
                "n_seen": result.n_seen,
                "n_skipped": sum(result.skips.values()),
                "skipped_by_reason": dict(result.skips),
                "skips_md": markdown_table(skips),
                "preview_md": markdown_table(result.table.head(8).to_dicts()),
            }

        manifest = run_stage(context, store, "vqa_samples", plan.code_version, plan.inputs(store, None), compute)
        return dg.MaterializeResult(
            metadata=to_dagster_metadata({**manifest.metadata, STAMP: plan.stamp(manifest.fingerprint)}),
            data_version=dg.DataVersion(manifest.data_version),
        )

    return vqa_samples
