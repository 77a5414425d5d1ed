"""Asset `concept_scores` (layer × width): alignment scores, categories and modality labels per latent."""

import dagster as dg

from msae.config import MsaeConfig
from msae.store import Store
from msae_assets.per_sae import build_per_sae_asset, per_sae_plan
from msae_assets.stage import StagePlan, markdown_table
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL


def _decorate(store: Store, layer: int, width: int, meta: dict) -> dict:
    census = [{"modality": k.removeprefix("census_"), "latents": v} for k, v in meta.items()
              if k.startswith("census_")]
    return {**meta, "census_md": markdown_table(census)}


def concept_scores_plan(cfg: MsaeConfig) -> StagePlan:
    judge: dict = {}
    if cfg.scores.judge != "none":  # the judge's prompts and (fallback) model shape its scores too
        from msae.score.autointerp import judge_prompt_version, load_judge_templates

        judge = {"prompts": judge_prompt_version(load_judge_templates()), "model": cfg.explainer.model,
                 "base_url": cfg.explainer.base_url}
    version = code_version("concept_scores", cfg.embedders, cfg.scores.model_dump(
        mode="json", exclude={"ablation", "bootstrap"}), cfg.explainer.examples, judge)
    return per_sae_plan("concept_scores", version, ["concepts"])


def build_concept_scores_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    from msae.score.stage import run_concept_scores

    return build_per_sae_asset(
        cfg, plan=concept_scores_plan(cfg),
        compute=lambda store, layer, width, fp: run_concept_scores(cfg, store, layer, width),
        description="CLIP/ALIGN visual quality on blurred top images, textual quality on peak windows, "
        "embedding detection, categories and modality labels → `<store>/concepts/layer=<L>/width=<W>/"
        "concepts.parquet` (+ `ground_truth.parquet` where annotations exist).",
        group="concepts", kinds={"pytorch", "parquet"}, decorate=_decorate,
        pool=GPU_POOL,  # CLIP/ALIGN embed the images on the GPU
    )
