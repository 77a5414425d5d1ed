"""Asset `report`: every layer × width partition summarised in <store>/report/index.html."""

import base64
import hashlib
import warnings

import dagster as dg

from msae.config import MsaeConfig
from msae.manifest import upstream_version
from msae.store import Store
from msae_assets.per_sae import sae_folder
from msae_assets.stage import STAMP, StagePlan, markdown_table, run_stage, to_dagster_metadata
from msae_assets.versions import code_version


def report_plan(cfg: MsaeConfig) -> StagePlan:
    """The report reads every layer × width partition of the scores (and the controls)."""
    upstream = ("concept_scores", *(("controls",) if cfg.controls.enabled else ()))

    def inputs(store: Store, _partition: str | None) -> dict[str, str]:
        return {f"{name}[{layer}|{width}]": upstream_version(store, name, sae_folder(layer, width))
                for name in upstream for layer in cfg.layers for width in cfg.widths}

    return StagePlan("report", code_version("report", cfg.scores, cfg.explainer.prompting, cfg.layers, cfg.widths),
                     upstream, inputs)


def build_report_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    plan = report_plan(cfg)
    version = plan.code_version
    with warnings.catch_warnings():  # AllPartitionMapping on an unpartitioned asset: beta in 1.13
        warnings.simplefilter("ignore")
        deps = [dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping()) for name in plan.upstream]

    @dg.asset(name="report", code_version=version, deps=deps, group_name="report", kinds={"html"},
              description="Census, quality, FVU per modality, threshold ablation, ground-truth evaluation, "
              "masked-vs-whole gain → `<store>/report/index.html` and `report.json`.")
    def report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from msae.report.build import build_report

        store = Store(cfg.store)
        inputs = plan.inputs(store, None)

        def compute() -> tuple[str, dict]:
            s = build_report(cfg, store)
            digest = hashlib.sha256(store.read_bytes("report", "report.json")).hexdigest()[:16]
            return digest, _metadata(s)

        m = run_stage(context, store, "report", version, inputs, compute)
        meta = {**m.metadata, "index_path": store.url("report", "index.html"), STAMP: plan.stamp(m.fingerprint)}
        if store.exists("report", "quality.png"):
            png = base64.b64encode(store.read_bytes("report", "quality.png")).decode()
            meta["quality_plot_md"] = f"![quality](data:image/png;base64,{png})"
        return dg.MaterializeResult(metadata=to_dagster_metadata(meta), data_version=dg.DataVersion(m.data_version))

    return report


def _metadata(s: dict) -> dict:
    census = [{"layer": p["layer"], "width": p["width"], **p["census"]} for p in s["partitions"]]
    gt = [{"layer": p["layer"], "width": p["width"], **{f"{k} macro-F1": round(p["ground_truth"][k]["macro_f1"], 3)
                                                        for k in ("pipeline", "modality_score", "selectivity")}}
          for p in s["partitions"] if p["ground_truth"]]
    out = {"census_md": markdown_table(census), "ground_truth_md": markdown_table(gt)}
    if (q := s.get("pooled_masked_vs_whole")) is not None:
        out |= {"masked_vs_whole_gain_pct": round(q["gain_pct"][0], 2), "gain_ci_low": round(q["gain_pct"][1], 2),
                "gain_ci_high": round(q["gain_pct"][2], 2)}
    return out
