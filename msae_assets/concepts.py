"""Asset `concepts` (layer × width): a visual and a textual concept per explained latent and prompting mode."""

import dagster as dg

from msae.config import MsaeConfig
from msae.store import Store
from msae_assets.per_sae import build_per_sae_asset
from msae_assets.stage import markdown_table
from msae_assets.versions import code_version


def concepts_code_version(cfg: MsaeConfig) -> str:
    """Explainer settings that shape answers plus the prompt templates' text: a prompt edit reruns this."""
    from msae.explain.stage import explainer_fingerprint

    return code_version("concepts", explainer_fingerprint(cfg.explainer, cfg.model))


def _decorate(store: Store, layer: int, width: int, meta: dict) -> dict:
    import polars as pl

    from msae.explain.stage import PROPOSALS, concepts_folder

    p = store.read_parquet(concepts_folder(layer, width), PROPOSALS)
    rows = [{"latent": r["latent"], "mode": r["prompting"], "visual": r["visual_concept"] or "—",
             "textual": r["textual_concept"] or "—"}
            for r in p.filter(pl.col("visual_concept").is_not_null()).head(12).iter_rows(named=True)]
    return {**meta, "examples_md": markdown_table(rows)}


def build_concepts_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    from msae.explain.stage import run_concepts

    return build_per_sae_asset(
        cfg, name="concepts", upstream=["latent_stats"], version=concepts_code_version(cfg),
        compute=lambda store, layer, width, fp: run_concepts(cfg, store, layer, width),
        description="Explainer proposals (masked regions and whole-image baseline) → "
        "<store>/concepts/layer=<L>/width=<W>/proposals.parquet.",
        group="concepts", kinds={"parquet"}, decorate=_decorate,
    )
