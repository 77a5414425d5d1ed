"""What cards, explainers and scorers need about each latent, loaded in one pass over the tables.

``latent_stats`` writes per-latent statistics and top examples (see docs/formats.md); rendering
also needs the samples' images, questions and answers and the token pieces of the text examples.
Each parquet file is read once for all requested latents (columns and rows pruned by pyarrow, so a
paper-size ``tokens.parquet`` is not loaded whole), never per latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from msae.store import Store


def latents_dir(layer: int, width: int) -> str:
    """The latent_stats partition folder, relative to the store root."""
    return f"latents/layer={layer}/width={width}"


@dataclass(frozen=True)
class ImageExample:
    """One top image of a latent with its base-grid activations."""

    sample_id: str
    sample_index: int
    image_path: str
    question: str
    answer: str
    patch_activations: np.ndarray = field(compare=False)
    """[grid_rows, grid_cols] float32."""
    score: float
    active_count: int
    mean_activation: float
    max_activation: float
    active_threshold: float = 0.0
    """Patches above this activation count as active (``latents.active_fraction`` × the max; 0: any)."""


@dataclass(frozen=True)
class TextExample:
    """One top text of a latent: every text token of the sample (template included) in position order."""

    sample_id: str
    sample_index: int
    pieces: list[str]
    activations: np.ndarray = field(compare=False)
    """float32, aligned with pieces."""
    peak: int
    """Index into pieces of the peak token."""
    question: str
    answer: str
    image_path: str
    answer_index: int = -1
    """Index into pieces of the sample's answer position (``msae.latents.answer_position``), -1 if none."""

    def display(self) -> list[str]:
        """Display strings of the pieces, the answer position shown by its name."""
        from msae.latents.answer_position import display_words
        from msae.latents.render import display_tokens

        return display_words(display_tokens(self.pieces), np.arange(len(self.pieces)) == self.answer_index)


@dataclass(frozen=True)
class LatentEvidence:
    latent: int
    stats: dict[str, Any]
    images: list[ImageExample]
    texts: list[TextExample]


def read_table(store: Store, name: str, columns: Sequence[str] | None = None,
               filters: list[tuple[str, str, Any]] | None = None) -> pl.DataFrame:
    """Read selected columns and rows of a parquet file in the store (pushdown through pyarrow)."""
    with store.fs.open(store.path(name), "rb") as f:
        table = pq.read_table(f, columns=list(columns) if columns is not None else None, filters=filters)
    return pl.from_arrow(table)


def resolve_image(store: Store, image: str | None) -> str:
    """An absolute path or URL stays as it is; a relative one is relative to the store root."""
    if not image:
        return ""
    if image.startswith("/") or "://" in image:
        return image
    return store.url(image)


def _select_latents(store: Store, top_name: str, stats: pl.DataFrame,
                    latents: Sequence[int] | None) -> list[int]:
    """Requested latents, or every explained latent (every latent with top examples if no flag)."""
    if latents is not None:
        return [int(x) for x in latents]
    if "explained" in stats.columns:
        return [int(x) for x in stats.filter(pl.col("explained"))["latent"].to_list()]
    if not store.exists(top_name):
        return []
    return sorted({int(x) for x in read_table(store, top_name, ["latent"])["latent"].to_list()})


def _stats_rows(stats: pl.DataFrame, chosen: Sequence[int]) -> dict[int, dict[str, Any]]:
    return {int(r["latent"]): r for r in stats.filter(pl.col("latent").is_in(list(chosen))).to_dicts()}


@dataclass(frozen=True)
class SampleText:
    """One sample's text tokens in position order, as evidence and control windows read them."""

    sample_id: str
    positions: np.ndarray
    pieces: list[str]
    template: np.ndarray
    """bool per piece: a chat-template token."""
    answer_index: int
    """Index into pieces of the sample's answer position (``msae.latents.answer_position``), -1 if none."""


def sample_texts(store: Store, sample_indices: Sequence[int]) -> dict[int, SampleText]:
    """sample_index → its :class:`SampleText`, from one pruned read of tokens.parquet."""
    from msae.latents.answer_position import answer_position_rows

    if not len(sample_indices):
        return {}
    tokens = read_table(store, Store.TOKENS, ["sample_index", "sample_id", "position", "token", "modality", "role"],
                        [("modality", "!=", "image"), ("sample_index", "in", [int(i) for i in sample_indices])])
    tokens = tokens.sort(["sample_index", "position"])
    tokens = tokens.with_columns(pl.Series("_answer", answer_position_rows(tokens))).filter(pl.col("modality") == "text")
    out: dict[int, SampleText] = {}
    for (index,), g in tokens.group_by(["sample_index"], maintain_order=True):
        hits = np.flatnonzero(g["_answer"].to_numpy())
        out[int(index)] = SampleText(g["sample_id"][0], g["position"].to_numpy().astype(np.int64), g["token"].to_list(),
                                     (g["role"].fill_null("") == "template").to_numpy(),
                                     int(hits[0]) if hits.size else -1)
    return out


def _align(positions: np.ndarray, row_positions: Sequence[int], row_acts: Sequence[float]) -> np.ndarray:
    """Activations on the given token positions (0 where the row has none)."""
    lookup = dict(zip((int(p) for p in row_positions), (float(a) for a in row_acts), strict=True))
    return np.array([lookup.get(int(p), 0.0) for p in positions], dtype=np.float32)


def _peak(positions: np.ndarray, acts: np.ndarray, peak_position: int | None) -> int:
    """The ranked peak (peak_position honours template eligibility) else the first argmax."""
    if peak_position is not None:
        hits = np.flatnonzero(positions == peak_position)
        if hits.size:
            return int(hits[0])
    return int(np.argmax(acts)) if acts.size else -1


def _image_example(row: dict[str, Any], sample: dict[str, Any], image_path: str) -> ImageExample:
    acts = np.asarray(row["patch_activations"], dtype=np.float32).reshape(row["grid_rows"], row["grid_cols"])
    return ImageExample(
        sample_id=row["sample_id"], sample_index=int(row["sample_index"]), image_path=image_path,
        question=sample.get("question") or "", answer=sample.get("answer") or "", patch_activations=acts,
        score=float(row["score"]), active_count=int(row["active_count"]),
        mean_activation=float(row["mean_activation"]), max_activation=float(row["max_activation"]),
        active_threshold=float(row.get("active_threshold") or 0.0))


def _text_example(row: dict[str, Any], sample: dict[str, Any], image_path: str,
                  text: SampleText | None) -> TextExample:
    if text is None:  # tokens.parquet lacks the sample: keep the row's positions, unknown pieces
        positions = np.asarray(row["text_positions"] or [], dtype=np.int64)
        pieces, answer_index = ["?"] * len(positions), -1
    else:
        positions, pieces, answer_index = text.positions, text.pieces, text.answer_index
    acts = _align(positions, row["text_positions"] or [], row["text_activations"] or [])
    return TextExample(
        sample_id=row["sample_id"], sample_index=int(row["sample_index"]), pieces=list(pieces),
        activations=acts, peak=_peak(positions, acts, row.get("peak_position")),
        question=sample.get("question") or "", answer=sample.get("answer") or "", image_path=image_path,
        answer_index=answer_index)


def load_evidence(store: Store, layer: int, width: int,
                  latents: Sequence[int] | None = None) -> dict[int, LatentEvidence]:
    """Evidence of the requested latents (default: every explained latent), keyed by latent id.

    Examples are in rank order; a latent without top examples gets empty lists.
    """
    base = latents_dir(layer, width)
    stats = store.read_parquet(base, "stats.parquet")
    top_name = f"{base}/top_examples.parquet"
    chosen = _select_latents(store, top_name, stats, latents)
    stats_rows = _stats_rows(stats, chosen)
    if not chosen or not store.exists(top_name):  # nothing explained: stats only, no examples
        return {latent: LatentEvidence(latent, stats_rows.get(latent, {"latent": latent}), [], []) for latent in chosen}
    top = read_table(store, top_name, None, [("latent", "in", chosen)])
    top = top.filter(pl.col("latent").is_in(chosen)).sort(["latent", "modality", "rank"])

    sample_ids = top["sample_id"].unique().to_list()
    samples = read_table(store, Store.SAMPLES, ["sample_id", "image", "question", "answer"],
                         [("sample_id", "in", sample_ids)] if sample_ids else None)
    sample_rows = {r["sample_id"]: r for r in samples.to_dicts()}
    text_indices = top.filter(pl.col("modality") == "text")["sample_index"].unique().to_list()
    tokens = sample_texts(store, [int(i) for i in text_indices])

    images: dict[int, list[ImageExample]] = {latent: [] for latent in chosen}
    texts: dict[int, list[TextExample]] = {latent: [] for latent in chosen}
    for row in top.to_dicts():
        sample = sample_rows.get(row["sample_id"], {})
        image_path = resolve_image(store, sample.get("image"))
        if row["modality"] == "image":
            images[int(row["latent"])].append(_image_example(row, sample, image_path))
        else:
            texts[int(row["latent"])].append(
                _text_example(row, sample, image_path, tokens.get(int(row["sample_index"]))))
    return {latent: LatentEvidence(latent, stats_rows.get(latent, {"latent": latent}), images[latent], texts[latent])
            for latent in chosen}
