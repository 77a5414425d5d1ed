"""Asset `report`: every layer × width partition summarised in <store>/report/index.html."""

import base64
import hashlib
import warnings

import dagster as dg

from msae.config import MsaeConfig
from msae.manifest import upstream_version
from msae.store import Store
from msae_assets.stage import markdown_table, run_stage, to_dagster_metadata
from msae_assets.versions import code_version


def build_report_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    version = code_version("report", cfg.scores, cfg.explainer.prompting, cfg.layers, cfg.widths)
    with warnings.catch_warnings():  # AllPartitionMapping on an unpartitioned asset: beta in 1.13
        warnings.simplefilter("ignore")
        deps = [dg.AssetDep(name, partition_mapping=dg.AllPartitionMapping())
                for name in ("concept_scores", *(("controls",) if cfg.controls.enabled else ()))]

    @dg.asset(name="report", code_version=version, deps=deps, group_name="report", kinds={"html"},
              description="Census, quality, FVU per modality, threshold ablation, ground-truth evaluation, "
              "masked-vs-whole gain → <store>/report/index.html and report.json.")
    def report(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from msae.report.build import build_report

        store = Store(cfg.store)
        inputs = {f"{dep.asset_key.to_user_string()}[{layer}|{width}]": upstream_version(
            store, dep.asset_key.to_user_string(), f"layer={layer}/width={width}")
            for dep in deps for layer in cfg.layers for width in cfg.widths}

        def compute() -> tuple[str, dict]:
            s = build_report(cfg, store)
            digest = hashlib.sha256(store.read_bytes("report", "report.json")).hexdigest()[:16]
            return digest, _metadata(s)

        m = run_stage(context, store, "report", version, inputs, compute)
        meta = {**m.metadata, "index_path": store.url("report", "index.html")}
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
