"""Extraction results: :class:`ExtractionResult` and its summaries, per-chunk records and totals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from msae.extract.prepare import Skipped
from msae.store import Store


class ExtractionError(RuntimeError):
    """Extraction cannot produce anything (e.g. every sample was skipped)."""


@dataclass
class ExtractionResult:
    """What an extraction produced (totals over all runs that built the current outputs)."""

    layers: list[int]
    n_samples: int
    samples_done: int
    samples_skipped: dict[str, int]
    n_tokens: int
    tokens_by_modality: dict[str, int]
    tokens_by_view: dict[str, int]
    tokens_by_role: dict[str, int]
    d_model: int
    store_dtype: str
    bytes_written: int  # stored (compressed) bytes of all layers' arrays
    bytes_by_layer: dict[int, int]
    wall_s: float  # this call
    tokens_per_s: float  # tokens extracted by this call / wall_s (0 when reused)
    reused: bool
    chunks_total: int
    chunks_resumed: int  # chunks found done by an earlier, interrupted run
    fp16_clamped: int
    fingerprint: str
    tokens_path: str
    activations_paths: dict[int, str] = field(default_factory=dict)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    batch_size: int = 0  # samples per forward at the end of this call (after any halving); 0 when reused
    oom_halvings: int = 0  # times this call halved the batch on CUDA out-of-memory

    def summary(self) -> dict[str, Any]:
        """Plain metadata shared by every layer (for manifests / Dagster)."""
        return {
            "reused": self.reused,
            "n_samples": self.n_samples,
            "samples_done": self.samples_done,
            "samples_skipped": dict(self.samples_skipped),
            "n_tokens": self.n_tokens,
            "tokens_by_modality": dict(self.tokens_by_modality),
            "tokens_by_view": dict(self.tokens_by_view),
            "tokens_by_role": dict(self.tokens_by_role),
            "d_model": self.d_model,
            "store_dtype": self.store_dtype,
            "bytes_written": self.bytes_written,
            "wall_s": round(self.wall_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "chunks_total": self.chunks_total,
            "chunks_resumed": self.chunks_resumed,
            "fp16_clamped": self.fp16_clamped,
            "extraction_fingerprint": self.fingerprint,
            "tokens_path": self.tokens_path,
            "batch_size": self.batch_size,
            "oom_halvings": self.oom_halvings,
        }

    def layer_summary(self, layer: int) -> dict[str, Any]:
        return {
            "layer": layer,
            "rows": self.n_tokens,
            "path": self.activations_paths.get(layer, ""),
            "bytes": self.bytes_by_layer.get(layer, 0),
        }


class _ChunkAcc:
    """What one chunk has produced so far."""

    def __init__(self, row_start: int) -> None:
        self.row_start = row_start
        self.skipped: Counter = Counter()
        self.examples: dict[str, list[str]] = {}
        self.parts: list[pl.DataFrame] = []
        self.clamped = 0

    def skip(self, x: Skipped) -> None:
        self.skipped[x.reason] += 1
        ex = self.examples.setdefault(x.reason, [])
        if len(ex) < 3:
            ex.append(f"{x.sample_id}: {x.detail}")

    def record(self, part: pl.DataFrame, row_end: int) -> dict[str, Any]:
        return {
            "row_start": self.row_start,
            "row_end": row_end,
            "samples_done": int(part["sample_index"].n_unique()) if part.height else 0,
            "skipped": dict(self.skipped),
            "skip_examples": self.examples,
            "modality": _counts(part, "modality"),
            "view": _counts(part, "view"),
            "role": _counts(part, "role"),
            "fp16_clamped": self.clamped,
        }


def _counts(df: pl.DataFrame, col: str) -> dict[str, int]:
    if not df.height:
        return {}
    vc = df.group_by(col).len()
    return {str(k): int(v) for k, v in zip(vc[col].to_list(), vc["len"].to_list()) if k is not None}


def _totals(progress: dict[str, Any]) -> dict[str, Any]:
    tot: dict[str, Counter] = {k: Counter() for k in ("skipped", "modality", "view", "role")}
    done = clamped = 0
    examples: dict[str, list[str]] = {}
    for rec in progress["chunks"].values():
        done += rec["samples_done"]
        clamped += rec.get("fp16_clamped", 0)
        for k in tot:
            tot[k].update(rec[k])
        for reason, ex in rec.get("skip_examples", {}).items():
            examples.setdefault(reason, []).extend(ex[: max(0, 3 - len(examples.get(reason, [])))])
    return {"done": done, "clamped": clamped, "examples": examples, **{k: dict(v) for k, v in tot.items()}}


def _result(
    store: Store, progress: dict[str, Any], layers: list[int], n_samples: int, wall: float, new_tokens: int,
    reused: bool, resumed: int, batch_size: int = 0, oom_halvings: int = 0,
) -> ExtractionResult:
    t = _totals(progress)
    by_layer = {}
    for layer in layers:
        try:
            by_layer[layer] = int(store.fs.du(store.path(store.activations_name(layer)), total=True))
        except Exception:  # noqa: BLE001
            by_layer[layer] = 0
    return ExtractionResult(
        layers=list(layers),
        n_samples=n_samples,
        samples_done=t["done"],
        samples_skipped=t["skipped"],
        n_tokens=int(progress["n_rows"]),
        tokens_by_modality=t["modality"],
        tokens_by_view=t["view"],
        tokens_by_role=t["role"],
        d_model=int(progress["d_model"]),
        store_dtype=progress["store_dtype"],
        bytes_written=sum(by_layer.values()),
        bytes_by_layer=by_layer,
        wall_s=wall,
        tokens_per_s=new_tokens / wall if wall > 0 and new_tokens else 0.0,
        reused=reused,
        chunks_total=int(progress["n_chunks"]),
        chunks_resumed=resumed,
        fp16_clamped=t["clamped"],
        fingerprint=progress["fingerprint"],
        tokens_path=store.url(store.TOKENS),
        activations_paths={layer: store.url(store.activations_name(layer)) for layer in layers},
        skip_examples=t["examples"],
        batch_size=batch_size,
        oom_halvings=oom_halvings,
    )


def _raise_all_failed(totals: dict[str, Any], n: int) -> None:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(totals["skipped"].items())) or "none recorded"
    ex = "; ".join(e for v in totals["examples"].values() for e in v[:1])
    raise ExtractionError(
        f"no activations extracted: all {n} samples were skipped ({reasons})" + (f"; e.g. {ex}" if ex else "")
    )
