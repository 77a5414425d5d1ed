"""Asset `latent_stats` (layer × width): per-latent statistics, top examples, cards and their index."""

import dagster as dg

from msae.config import MsaeConfig
from msae.store import Store
from msae_assets.per_sae import build_per_sae_asset, per_sae_plan
from msae_assets.stage import StagePlan
from msae_assets.stage import markdown_table
from msae_assets.versions import code_version
from msae_resources.vlm import GPU_POOL


def _decorate(store: Store, layer: int, width: int, meta: dict) -> dict:
    """A table of the most frequent explained latents, read back from the stage's own output."""
    import polars as pl

    from msae.latents.stage import STATS, latents_folder

    stats = store.read_parquet(latents_folder(layer, width), STATS).filter(pl.col("explained"))
    top = stats.sort(pl.col("fires_image") + pl.col("fires_text"), descending=True).head(10)
    rows = [{"latent": r["latent"], "freq image": f"{r['freq_image']:.3g}", "freq text": f"{r['freq_text']:.3g}",
             "max image": f"{r['max_image']:.3g}", "max text": f"{r['max_text']:.3g}",
             "modality score": f"{r['modality_score']:.2f}"} for r in top.iter_rows(named=True)]
    return {**meta, "most_frequent_latents_md": markdown_table(rows)}


def latent_stats_plan(cfg: MsaeConfig) -> StagePlan:
    return per_sae_plan("latent_stats", code_version("latent_stats", cfg.latents), ["sae"])


def build_latent_stats_asset(cfg: MsaeConfig) -> dg.AssetsDefinition:
    from msae.latents.stage import run_latent_stats

    return build_per_sae_asset(
        cfg, plan=latent_stats_plan(cfg),
        compute=lambda store, layer, width, fp: run_latent_stats(cfg, store, layer, width, fingerprint=fp,
                                                                 report=dg.get_dagster_logger().info),
        description="One streaming pass through the SAE → `<store>/latents/layer=<L>/width=<W>/`: `stats.parquet`, "
        "`top_examples.parquet`, `cards/*.png` and `index.html` (`docs/formats.md`).",
        group="latents", kinds={"pytorch", "parquet"}, decorate=_decorate, pool=GPU_POOL,
    )
