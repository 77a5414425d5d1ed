"""Asset `controls` (layer × width): a random-SAE control and the dissection oracle (``msae.controls``)."""

import dagster as dg

from msae.config import MsaeConfig
from msae.controls import EvidenceKeys, run_controls
from msae.manifest import fingerprint, load_manifest
from msae.store import Store
from msae_assets.concept_scores import concept_scores_plan
from msae_assets.concepts import concepts_plan
from msae_assets.latent_stats import latent_stats_plan
from msae_assets.per_sae import build_per_sae_asset, per_sae_plan, sae_folder
from msae_assets.stage import StagePlan
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL


def controls_plan(cfg: MsaeConfig) -> StagePlan:
    """The code versions of latent_stats, concepts and concept_scores are part of this one's: the
    controls rerun whenever any of the stages they repeat would."""
    repeated = [plan(cfg).code_version for plan in (latent_stats_plan, concepts_plan, concept_scores_plan)]
    return per_sae_plan("controls", code_version("controls", cfg.controls, *repeated), ["sae", "latent_stats"])


def evidence_keys(cfg: MsaeConfig, store: Store, layer: int, width: int) -> EvidenceKeys:
    """The keys of the controls' cached levels (:class:`msae.controls.EvidenceKeys`): the code
    versions of the stages each level repeats — never the scores' settings, so a threshold edit
    reuses both — and the data versions of the real SAE and its latent statistics (their outputs
    were verified by this stage a moment before)."""
    part = sae_folder(layer, width)
    ups = {u: load_manifest(store, u, part).data_version for u in ("sae", "latent_stats")}  # type: ignore[union-attr]
    stats_version = code_version("controls", cfg.controls, latent_stats_plan(cfg).code_version)
    concepts_version = code_version("controls", cfg.controls, latent_stats_plan(cfg).code_version,
                                    concepts_plan(cfg).code_version)
    return EvidenceKeys(stats=fingerprint(stats_version, {"sae": ups["sae"]}),
                        concepts=fingerprint(concepts_version, ups))


def build_controls_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    return build_per_sae_asset(
        cfg, plan=controls_plan(cfg),
        compute=lambda store, layer, width, fp: run_controls(
            cfg, store, layer, width, fingerprint=fp, evidence=evidence_keys(cfg, store, layer, width)),
        description="Latent stats, concepts, scores and ground truth of a random-weight SAE of the trained SAE's "
        "shape (labels should collapse to the prior) → `<store>/controls/random_sae/`; the dissection explainer's "
        "concepts and labels for the real SAE (an oracle: it reads the annotations) → `<store>/controls/dissection/`.",
        group="controls", kinds={"pytorch", "parquet"}, pool=GPU_POOL,  # latent stats/scores of the random SAE
    )
