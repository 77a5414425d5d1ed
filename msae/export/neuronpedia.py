"""Neuronpedia export: every explained latent of a layer × width partition as one JSONL line.

A line is a Neuronpedia feature (``Neuron``: ``modelId``, ``layer`` = the source id, ``index``,
``maxActApprox``, ``frac_nonzero``) with its top texts as Neuronpedia ``Activation`` records
(``tokens``, ``values``, ``maxValue``, ``maxValueTokenIndex``) and its concepts as ``Explanation``
records with their ``scores``; msae's own evidence — top images with per-patch activations, per-
modality frequencies, the modality label, ground truth — under the ``msae`` key. Field names follow
Neuronpedia's database schema and its export tools (hijohnnylin/neuronpedia:
``apps/webapp/prisma/schema.prisma``, ``utils/neuronpedia-utils``); the records are checked by
:mod:`msae.export.schema`; the format is in docs/formats.md, "Neuronpedia export".

Pure functions build records from what the store's tables hold (:func:`feature_records`); the I/O
edge (:func:`export_partition`, :func:`export_neuronpedia`) reads a partition and writes
``<out>/layer=<L>/width=<W>/features.jsonl``, ``<out>`` defaulting to ``<store>/export/neuronpedia``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from msae.config import MsaeConfig
from msae.export import ExportError
from msae.export.schema import ConceptRow, validate_record
from msae.latents.evidence import ImageExample, LatentEvidence, TextExample, latents_dir
from msae.manifest import layer_width_folder
from msae.store import Store

EXPORT_ROOT = "export/neuronpedia"
FEATURES = "features.jsonl"
SOURCE_SET_PREFIX = "msae-res"
"""Neuronpedia source sets name the author, the hook and the width (``gemmascope-res-16k``)."""
STATS_FIELDS = ("fires_image", "fires_text", "freq_image", "freq_text", "max_image", "max_text",
                "modality_score", "selectivity")
CONCEPT_FIELDS = tuple(f for f in ConceptRow.model_fields if f != "prompting")
"""concepts.parquet columns kept per prompting mode under ``msae.concepts``."""
NOT_SCORES = {"visual_score_var", "textual_score_var", "visual_rank"}
"""Numeric concept columns that are spreads or ranks, not scores of the concept."""
EMBEDDER_FREE = ("_positives", "_matches", "_coverage", "_precision")
"""Score columns counted or matched on words, with no embedder (explanationScoreModelName None)."""


@dataclass(frozen=True)
class ExportContext:
    """What every record of one partition shares: Neuronpedia's names and msae's settings."""

    model_id: str
    layer: int
    width: int
    label_prompting: str
    hook_name: str | None = None
    data_source: str | None = None
    scorers: Mapping[str, str | None] | None = None
    """kind → the embedder that scored that kind's concepts."""
    token_counts: tuple[int, int] | None = None
    """(image tokens, text tokens) of the pass, for ``frac_nonzero``."""

    @property
    def source_set(self) -> str:
        return f"{SOURCE_SET_PREFIX}-{width_label(self.width)}"

    @property
    def source_id(self) -> str:
        """Neuronpedia's source id (its records' ``layer``): ``<layer>-<source set>``."""
        return f"{self.layer}-{self.source_set}"


@dataclass(frozen=True)
class ExportResult:
    layer: int
    width: int
    path: str
    features: int


# --- names ------------------------------------------------------------------------------------
def width_label(width: int) -> str:
    """Neuronpedia's width spelling: 16384 → ``16k``, 131072 → ``131k``, 1048576 → ``1m``, 256 → ``256``."""
    if width >= 1_000_000:
        return f"{width // 1_000_000}m"
    return f"{width // 1000}k" if width >= 1000 else str(width)


def model_id(name_or_path: str) -> str:
    """A Neuronpedia model id (lower case, letters, digits, ``-``, ``_``) from a hub id or folder."""
    name = PurePosixPath(name_or_path.rstrip("/")).name or name_or_path
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")
    return slug or "model"


def finite_or_none(value: Any) -> Any:
    """NaN and ±inf become None (strict JSON has neither); numpy scalars become Python ones."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _key(ctx: ExportContext, latent: int) -> dict[str, str]:
    return {"modelId": ctx.model_id, "layer": ctx.source_id, "index": str(latent)}


# --- records ----------------------------------------------------------------------------------
def text_activation(ctx: ExportContext, latent: int, rank: int, ex: TextExample) -> dict[str, Any] | None:
    """A top text as a Neuronpedia ``Activation`` (None when the sample has no text tokens)."""
    values = [float(v) for v in ex.activations]
    if not values:
        return None
    top = int(np.argmax(ex.activations))
    return {**_key(ctx, latent), "id": f"{ctx.model_id}@{ctx.source_id}:{latent}:text{rank}",
            "tokens": ex.display(), "values": values, "maxValue": values[top], "maxValueTokenIndex": top,
            "minValue": min(values), "qualifyingTokenIndex": ex.peak if ex.peak >= 0 else None,
            "dataSource": ctx.data_source, "dataIndex": ex.sample_id}


def image_activation(rank: int, ex: ImageExample) -> dict[str, Any]:
    """A top image with its per-patch activations (row-major) and the patches counted active."""
    acts = np.asarray(ex.patch_activations, dtype=np.float32)
    flat = [float(v) for v in acts.ravel()]
    rows, cols = acts.shape
    return {"rank": rank, "sample_id": ex.sample_id, "sample_index": ex.sample_index, "image": ex.image_path,
            "question": ex.question, "answer": ex.answer, "grid_rows": int(rows), "grid_cols": int(cols),
            "patch_activations": flat, "max_activation": ex.max_activation, "max_patch": int(np.argmax(acts)),
            "active_threshold": ex.active_threshold,
            "active_patches": [int(i) for i in np.flatnonzero(acts.ravel() > np.float32(ex.active_threshold))],
            "active_count": ex.active_count, "mean_activation": ex.mean_activation, "score": ex.score}


def _scorer(ctx: ExportContext, kind: str, column: str) -> str | None:
    if column.endswith(EMBEDDER_FREE):
        return None
    if "__" in column:  # visual_score__<model>: a further image–text embedder
        return column.split("__", 1)[1]
    return (ctx.scorers or {}).get(kind)


def concept_scores(ctx: ExportContext, kind: str, row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The numeric ``<kind>_*`` columns of a concepts row as Neuronpedia ``ExplanationScore`` records."""
    out = []
    for column, value in row.items():
        value = finite_or_none(value)
        if (not column.startswith(f"{kind}_") or column in NOT_SCORES or isinstance(value, bool)
                or not isinstance(value, (int, float))):
            continue
        out.append({"value": float(value), "explanationScoreTypeName": column,
                    "explanationScoreModelName": _scorer(ctx, kind, column)})
    return out


def explanation(ctx: ExportContext, latent: int, kind: str, row: Mapping[str, Any],
                explainer: str | None) -> dict[str, Any] | None:
    """One concept of a concepts row as a Neuronpedia ``Explanation`` (None when there is none)."""
    concept = row.get(f"{kind}_concept")
    if not concept:
        return None
    type_name = f"msae-{kind}-{row['prompting']}"
    proposed = row.get(f"{kind}_concept_proposed")
    notes = (f"the explainer proposed {proposed!r}; chosen by population detection"
             if proposed and proposed != concept else None)
    return {**_key(ctx, latent), "id": f"{ctx.model_id}@{ctx.source_id}:{latent}:{type_name}",
            "description": concept, "typeName": type_name, "explanationModelName": explainer, "notes": notes,
            "scores": concept_scores(ctx, kind, row)}


def _label_row(ctx: ExportContext, rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The row the label comes from: ``label_prompting``'s, else the first present."""
    return next((r for r in rows if r["prompting"] == ctx.label_prompting), rows[0] if rows else None)


def explanations(ctx: ExportContext, latent: int, rows: Sequence[Mapping[str, Any]],
                 explainers: Mapping[tuple[int, str], str]) -> list[dict[str, Any]]:
    """The visual concept of every prompting mode, and the textual concept once: its prompt is asked
    once per latent and shared by the modes (docs/formats.md, proposals.parquet)."""
    label_row = _label_row(ctx, rows)
    wanted = [(r, "visual") for r in rows] + ([(label_row, "textual")] if label_row is not None else [])
    made = (explanation(ctx, latent, kind, r, explainers.get((latent, r["prompting"]))) for r, kind in wanted)
    return [e for e in made if e is not None]


def _frac_nonzero(ctx: ExportContext, stats: Mapping[str, Any]) -> float | None:
    fires = [stats.get("fires_image"), stats.get("fires_text")]
    if ctx.token_counts is None or None in fires or sum(ctx.token_counts) == 0:
        return None
    return float(sum(fires)) / float(sum(ctx.token_counts))


def feature_record(ctx: ExportContext, ev: LatentEvidence, rows: Sequence[Mapping[str, Any]],
                   ground_truth: Mapping[str, Any] | None,
                   explainers: Mapping[tuple[int, str], str]) -> dict[str, Any]:
    """One latent's line: Neuronpedia's feature, activations and explanations, msae's extras."""
    stats = {k: finite_or_none(ev.stats.get(k)) for k in STATS_FIELDS}
    activations = [a for rank, ex in enumerate(ev.texts) if (a := text_activation(ctx, ev.latent, rank, ex))]
    label_row = _label_row(ctx, rows)
    peaks = [v for v in (stats["max_image"], stats["max_text"]) if v is not None]
    gt = None if ground_truth is None else {k: finite_or_none(v) for k, v in ground_truth.items() if k != "latent"}
    return {
        **_key(ctx, ev.latent), "sourceSetName": ctx.source_set, "hookName": ctx.hook_name,
        "maxActApprox": max([0.0, *peaks, *(a["maxValue"] for a in activations)]),
        "frac_nonzero": _frac_nonzero(ctx, ev.stats),
        "activations": activations,
        "explanations": explanations(ctx, ev.latent, rows, explainers),
        "msae": {
            "latent": ev.latent, "layer": ctx.layer, "width": ctx.width,
            "label": None if label_row is None else label_row.get("modality"),
            "label_prompting": None if label_row is None else label_row["prompting"],
            **stats,
            "concepts": [{"prompting": r["prompting"], **{k: finite_or_none(r.get(k)) for k in CONCEPT_FIELDS}}
                         for r in rows],
            "image_activations": [image_activation(rank, ex) for rank, ex in enumerate(ev.images)],
            "ground_truth": gt,
        },
    }


def _rows_by_latent(frame: pl.DataFrame | None) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for row in ([] if frame is None else frame.to_dicts()):
        out.setdefault(int(row["latent"]), []).append(row)
    return out


def feature_records(ctx: ExportContext, evidence: Mapping[int, LatentEvidence], concepts: pl.DataFrame | None,
                    ground_truth: pl.DataFrame | None = None,
                    proposals: pl.DataFrame | None = None) -> list[dict[str, Any]]:
    """A record per latent of ``evidence`` (the explained ones), in latent order."""
    by_latent = _rows_by_latent(concepts)
    gt = {latent: rows[0] for latent, rows in _rows_by_latent(ground_truth).items()}
    explainers = ({} if proposals is None or "explainer" not in proposals.columns else
                  {(int(r["latent"]), r["prompting"]): r["explainer"] for r in proposals.to_dicts()})
    return [feature_record(ctx, evidence[latent], by_latent.get(latent, []), gt.get(latent), explainers)
            for latent in sorted(evidence)]


def to_jsonl(records: Sequence[Mapping[str, Any]]) -> bytes:
    """Strict JSON (no NaN), one record a line, keys in a fixed order: the same store gives the same bytes."""
    return "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in records).encode()


# --- I/O edge ---------------------------------------------------------------------------------
def export_folder(layer: int, width: int) -> str:
    """The export of one partition, relative to the output root."""
    return layer_width_folder(layer, width)


def context(cfg: MsaeConfig, store: Store, layer: int, width: int) -> ExportContext:
    """Names and settings of a partition's export, from the config and the pass's summary.json."""
    summary = store.read_json(latents_dir(layer, width), "summary.json") if store.exists(
        latents_dir(layer, width), "summary.json") else {}
    counts = (summary.get("n_image_tokens"), summary.get("n_text_tokens"))
    image_text = cfg.embedders.image_text
    visual = image_text[0] if image_text else None
    ds = cfg.dataset
    return ExportContext(
        model_id=model_id(cfg.model.name_or_path), layer=layer, width=width,
        label_prompting=cfg.explainer.prompting[0], hook_name=cfg.sae.hookpoint_template.format(layer=layer),
        data_source=ds.name or ds.path or ds.kind,
        scorers={"visual": visual, "textual": cfg.embedders.text or visual},
        token_counts=None if None in counts else (int(counts[0]), int(counts[1])))


def _optional(store: Store, folder: str, name: str) -> pl.DataFrame | None:
    return store.read_parquet(folder, name) if store.exists(folder, name) else None


def partition_records(cfg: MsaeConfig, store: Store, layer: int, width: int) -> list[dict[str, Any]]:
    """Read one partition's tables and evidence; its records, each validated."""
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import load_evidence
    from msae.score.stage import CONCEPTS, GROUND_TRUTH

    folder = concepts_folder(layer, width)
    concepts = _optional(store, folder, CONCEPTS)
    if concepts is None:
        raise ExportError(f"no {CONCEPTS} for layer {layer}, width {width} in {store.url(folder)}: "
                          "materialize concept_scores for that partition first")
    records = feature_records(context(cfg, store, layer, width), load_evidence(store, layer, width), concepts,
                              _optional(store, folder, GROUND_TRUTH), _optional(store, folder, PROPOSALS))
    for record in records:
        try:
            validate_record(record)
        except ValidationError as err:  # a bug of the export, not of the config: say which latent
            raise ExportError(f"latent {record['index']} of layer {layer}, width {width} does not match the "
                              f"Neuronpedia schema (msae.export.schema): {err}") from None
    return records


def export_partition(cfg: MsaeConfig, store: Store, layer: int, width: int, out: Store | None = None) -> ExportResult:
    """Write ``<out>/layer=<L>/width=<W>/features.jsonl`` (``out``: ``<store>/export/neuronpedia``)."""
    out = out if out is not None else Store(store.url(EXPORT_ROOT))
    records = partition_records(cfg, store, layer, width)
    out.write_bytes(to_jsonl(records), export_folder(layer, width), FEATURES)
    return ExportResult(layer, width, out.url(export_folder(layer, width), FEATURES), len(records))


def export_neuronpedia(cfg: MsaeConfig, store: Store, out: Store | None = None, layers: Sequence[int] | None = None,
                       widths: Sequence[int] | None = None) -> list[ExportResult]:
    """Every configured layer × width partition (or those asked for) that has concepts; asked-for
    partitions without them are an :class:`ExportError`, as is finding none at all."""
    from msae.explain.stage import concepts_folder
    from msae.score.stage import CONCEPTS

    asked = layers is not None or widths is not None
    keys = [(layer, width) for layer in (layers or cfg.layers) for width in (widths or cfg.widths)]
    if not asked:
        keys = [(layer, width) for layer, width in keys if store.exists(concepts_folder(layer, width), CONCEPTS)]
    if not keys:
        raise ExportError(f"no partition of {store.root} has {CONCEPTS}: materialize concept_scores first")
    return [export_partition(cfg, store, layer, width, out) for layer, width in keys]
