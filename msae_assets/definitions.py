"""Dagster definitions built from the one msae config (MSAE_CONFIG / MSAE_PROFILE)."""

from __future__ import annotations

import dagster as dg

from msae.config import MsaeConfig, load_config
from msae_assets.activations import build_activations_asset
from msae_assets.checkpoints import build_checkpoint_assets
from msae_assets.concept_scores import build_concept_scores_asset
from msae_assets.concepts import build_concepts_asset
from msae_assets.controls import build_controls_asset
from msae_assets.latent_stats import build_latent_stats_asset
from msae_assets.report import build_report_asset
from msae_assets.run_health import start_driver_watchdog
from msae_assets.sae import build_sae_asset
from msae_assets.samples import build_vqa_samples_asset
from msae_assets.sensors import build_checkpoint_sensors
from msae_resources.vlm import VLMResource


def build_definitions(cfg: MsaeConfig) -> dg.Definitions:
    """Every asset, partition and resource for one config; tests call this with their own."""
    stages = [build_latent_stats_asset(cfg), build_concepts_asset(cfg), build_concept_scores_asset(cfg)]
    controls = []
    if cfg.controls.enabled:
        controls.append(build_controls_asset(cfg))
    return dg.Definitions(
        assets=[build_vqa_samples_asset(cfg), build_activations_asset(cfg), build_sae_asset(cfg), *stages,
                *controls, build_report_asset(cfg), *build_checkpoint_assets(cfg)],
        resources={"vlm": VLMResource.from_config(cfg.model, cfg.checkpoints)},
        sensors=build_checkpoint_sensors(cfg),
    )


start_driver_watchdog()  # only in a process the msae driver started: it ends when the driver does
defs = build_definitions(load_config())
