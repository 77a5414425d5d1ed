"""The `latent_stats` stage as a plain function: stats + top examples, then cards and their index.

Writes under ``<store>/latents/layer=<L>/width=<W>/`` (formats: docs/formats.md):
``stats.parquet``, ``top_examples.parquet``, ``summary.json``, ``cards/latent_<id>.png`` and
``index.html``. Pass-1 checkpoints live in ``_progress/`` there (local stores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import polars as pl

from msae.config import MsaeConfig
from msae.store import Store

if TYPE_CHECKING:  # torch is imported by the pass itself, not by the names the assets read
    from msae.latents.stats import LatentStatsResult

STATS = "stats.parquet"
TOP = "top_examples.parquet"
SUMMARY = "summary.json"
INDEX = "index.html"


from msae.latents.evidence import latents_dir as latents_folder  # noqa: E402  (one spelling of the path)


def stats_device(cfg: MsaeConfig) -> str:
    from msae.vlm.load import resolve_device

    return str(resolve_device(cfg.model.device))


def run_latent_stats(cfg: MsaeConfig, store: Store, layer: int, width: int, *, fingerprint: str = "",
                     progress: bool = False, report: Callable[[str], None] | None = None
                     ) -> tuple[str, dict[str, Any]]:
    """Compute and write everything; returns (data version, metadata). ``report``: progress lines
    (:class:`msae.runtime.ProgressReport`)."""
    from msae.sae.formats import load_sae
    from msae.sae.stage import open_layer

    folder = latents_folder(layer, width)
    sae = load_sae(store.url(store.sae_name(layer, width)))
    tokens: str | pl.DataFrame = (store.path(store.TOKENS) if store.is_local
                                  else store.read_parquet(store.TOKENS))
    ckpt = store.path(folder, "_progress", "pass1.npz") if store.is_local else None
    from msae.latents.stats import compute_latent_stats

    result = compute_latent_stats(sae, open_layer(store, layer), tokens, cfg.latents, device=stats_device(cfg),
                                  progress=progress, checkpoint=ckpt, fingerprint=fingerprint, report=report)
    store.write_parquet(result.stats, folder, STATS)
    store.write_parquet(result.top_examples, folder, TOP)
    cards = write_latent_cards(cfg, store, layer, width, result)
    summary = {**result.summary, "cards": len(cards)}
    store.write_json(summary, folder, SUMMARY)
    if ckpt is not None:
        store.rm(folder, "_progress")
    digest = hashlib.sha256(store.read_bytes(folder, STATS) + store.read_bytes(folder, TOP)).hexdigest()[:16]
    meta = {**summary, "stats_path": store.url(folder, STATS), "top_examples_path": store.url(folder, TOP),
            "index_path": store.url(folder, INDEX)}
    return digest, meta


def card_latents(stats: pl.DataFrame, limit: int | None) -> list[int]:
    """Explained latents that get a card: all, or the ``limit`` most frequent (the ones people open first)."""
    explained = stats.filter(pl.col("explained"))
    if limit is not None:
        explained = explained.sort(pl.col("fires_image") + pl.col("fires_text"), descending=True).head(limit)
    return sorted(explained["latent"].to_list())


def write_latent_cards(cfg: MsaeConfig, store: Store, layer: int, width: int, result: LatentStatsResult,
                       concepts: pl.DataFrame | None = None) -> list[str]:
    """A PNG card per chosen latent and the HTML index linking them (optionally with concepts/labels)."""
    from msae.latents.cards import write_cards
    from msae.latents.evidence import load_evidence
    from msae.latents.index_html import write_index

    latents = card_latents(result.stats, cfg.latents.cards)
    evidence = load_evidence(store, layer, width, latents)
    names = write_cards(store, layer, width, evidence, None)
    write_index(store, layer, width, index_entries(evidence, names, concepts))
    return names


def index_entries(evidence: dict, names: list[str], concepts: pl.DataFrame | None) -> list[dict[str, Any]]:
    by_latent = {} if concepts is None else {r["latent"]: r for r in concepts.iter_rows(named=True)}
    entries = []
    for name, (latent, ev) in zip(names, sorted(evidence.items())):
        s = ev.stats
        entry: dict[str, Any] = {"latent": latent, "card": name, "stats": {
            "freq img": f"{s['freq_image']:.3g}", "freq txt": f"{s['freq_text']:.3g}",
            "modality score": f"{s['modality_score']:.2f}"}}
        if (c := by_latent.get(latent)) is not None:
            entry |= {"concept_visual": c.get("visual_concept"), "concept_textual": c.get("textual_concept"),
                      "modality": c.get("modality")}
        entries.append(entry)
    return entries
