"""Asset `controls` (layer × width): a random-SAE control and the dissection oracle (``msae.controls``)."""

import dagster as dg

from msae.config import MsaeConfig
from msae_assets.per_sae import build_per_sae_asset
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL


def build_controls_asset(cfg: MsaeConfig, stage_versions: list[str]) -> dg.AssetsDefinition:
    """``stage_versions``: the code versions of latent_stats, concepts and concept_scores — the
    controls rerun whenever any of the stages they repeat would."""
    from msae.controls import run_controls

    version = code_version("controls", cfg.controls, *stage_versions)
    return build_per_sae_asset(
        cfg, name="controls", upstream=["sae", "latent_stats"], version=version,
        compute=lambda store, layer, width, fp: run_controls(cfg, store, layer, width, fingerprint=fp),
        description="Latent stats, concepts, scores and ground truth of a random-weight SAE of the trained SAE's "
        "shape (labels should collapse to the prior) → `<store>/controls/random_sae/`; the dissection explainer's "
        "concepts and labels for the real SAE (an oracle: it reads the annotations) → `<store>/controls/dissection/`.",
        group="controls", kinds={"pytorch", "parquet"}, pool=GPU_POOL,  # latent stats/scores of the random SAE
    )
