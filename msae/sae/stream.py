"""Row selection and a shuffled, resumable, bounded-memory stream over a zarr activation array.

The array is ``[n_tokens, d_model]`` and chunked along rows; ``tokens.parquet`` row ``i`` describes
row ``i``. Nothing here loads the whole array: the stream reads a few row-chunks at a time.

Plan of one epoch (computed from row indices alone, without reading data)::

    chunks that hold selected rows --permute(seed, epoch)--> groups of consecutive chunks holding
    >= buffer_rows selected rows ("blocks") --read + shuffle(seed, epoch, block)--> batches

A block's last ``n % batch_size`` rows are dropped (under one batch per block). Because the number
of batches in each block is known before reading, ``batches(start=n)`` resumes at batch ``n``
reading only the block that contains it — the stream's whole state is one integer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import polars as pl
import torch

TrainOn = Literal["image", "text", "both"]


# --- which rows ---------------------------------------------------------------------------------
def modality_mask(
    tokens: pl.DataFrame, train_on: TrainOn = "both", *, include_special: bool = False,
    include_template: bool = False,
) -> np.ndarray:
    """Boolean mask over token rows: the modality asked for, minus special/template tokens."""
    if train_on not in ("image", "text", "both"):
        raise ValueError(f"train_on must be 'image', 'text' or 'both', got {train_on!r}")
    mod = tokens["modality"]
    keep = {"image": mod == "image", "text": mod == "text", "both": mod.is_in(["image", "text"])}[train_on]
    if include_special and train_on == "both":
        keep = keep | (mod == "special")
    if not include_template and "role" in tokens.columns:
        keep = keep & (tokens["role"].fill_null("") != "template")
    return keep.fill_null(False).to_numpy()


def _unit_hash(text: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def heldout_mask(tokens: pl.DataFrame, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of rows whose *sample* is held out (a stable hash of ``sample_id`` and seed).

    Splitting samples, not tokens, means evaluation tokens come from samples never trained on; the
    split does not depend on row order or on which other samples exist.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return np.zeros(tokens.height, dtype=bool)
    ids = tokens["sample_id"].cast(pl.Utf8)
    uniq = ids.unique().to_list()
    held = {s for s in uniq if _unit_hash(s, seed) < fraction}
    if not held and uniq:  # tiny tables: hold out at least one sample
        held = {min(uniq, key=lambda s: _unit_hash(s, seed))}
    return ids.is_in(list(held)).to_numpy()


# --- reading ------------------------------------------------------------------------------------
def read_unit(array: Any) -> int:
    """Rows per read: the shard size when the array is sharded, else the chunk size (numpy: 16k)."""
    shards = getattr(array, "shards", None)
    chunks = shards or getattr(array, "chunks", None)
    if chunks is None:  # an in-memory numpy array: any slab size will do
        return min(int(array.shape[0]), 16384) or 1
    return int(chunks[0])


def read_rows(array: Any, rows: np.ndarray, *, max_rows: int | None = None) -> np.ndarray:
    """Rows ``rows`` (sorted or not) of ``array``, read one row-chunk at a time, in ``rows`` order
    after sorting; at most ``max_rows`` (the first ones in row order)."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if max_rows is not None:
        rows = rows[:max_rows]
    unit = read_unit(array)
    out = np.empty((len(rows), array.shape[1]), dtype=array.dtype)
    chunk_of = rows // unit
    bounds = np.flatnonzero(np.diff(chunk_of)) + 1
    for seg in np.split(np.arange(len(rows)), bounds):
        if len(seg) == 0:
            continue
        c = int(chunk_of[seg[0]])
        block = array[c * unit: min((c + 1) * unit, array.shape[0])]
        out[seg] = block[rows[seg] - c * unit]
    return out


def sample_rows(array: Any, rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """About ``n`` random rows among ``rows``, reading only a random subset of chunks (float32)."""
    rows = np.asarray(rows, dtype=np.int64)
    unit = read_unit(array)
    chunks, counts = np.unique(rows // unit, return_counts=True)
    rng = np.random.default_rng([seed, 7])
    order = rng.permutation(len(chunks))
    take = order[: int(np.searchsorted(np.cumsum(counts[order]), n)) + 1]
    picked = rows[np.isin(rows // unit, chunks[take])]
    if len(picked) > n:
        picked = rng.choice(picked, n, replace=False)
    return read_rows(array, picked).astype(np.float32)


# --- the stream ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    epoch: int
    index: int
    chunks: np.ndarray
    n_rows: int


class ActivationStream:
    """Shuffled batches of selected rows, epoch after epoch, deterministic given ``seed``.

    Memory: about ``buffer_rows + read_unit`` rows (twice that with ``prefetch``, which reads the
    next block in a background thread while the current one is consumed).
    """

    def __init__(self, array: Any, rows: np.ndarray, *, batch_size: int, buffer_rows: int = 65536,
                 seed: int = 0, prefetch: bool = True):
        self.array = array
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size = batch_size
        self.buffer_rows = max(buffer_rows, batch_size)
        self.seed = seed
        self.prefetch = prefetch
        self.unit = read_unit(array)
        self._chunks, self._counts = np.unique(self.rows // self.unit, return_counts=True)
        if len(self.rows) < batch_size:
            raise ValueError(f"only {len(self.rows)} selected rows, fewer than one batch ({batch_size}); "
                             "lower sae.batch_size or extract more samples")

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def blocks(self, epoch: int) -> list[_Block]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._chunks))
        blocks, cur, n = [], [], 0
        for i in order:
            cur.append(self._chunks[i])
            n += int(self._counts[i])
            if n >= self.buffer_rows:
                blocks.append(_Block(epoch, len(blocks), np.array(cur), n))
                cur, n = [], 0
        if cur:
            blocks.append(_Block(epoch, len(blocks), np.array(cur), n))
        return blocks

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return sum(b.n_rows // self.batch_size for b in self.blocks(epoch))

    def _load(self, block: _Block) -> np.ndarray:
        starts = np.searchsorted(self.rows, block.chunks * self.unit)
        stops = np.searchsorted(self.rows, (block.chunks + 1) * self.unit)
        sel = np.concatenate([self.rows[a:b] for a, b in zip(starts, stops)])
        data = read_rows(self.array, sel)  # sorted by row, so the shuffle below is all that orders it
        perm = np.random.default_rng([self.seed, block.epoch, block.index, 1]).permutation(len(data))
        return data[perm]

    def _plan(self, start: int) -> Iterator[tuple[_Block, int]]:
        """(block, first batch to yield from it) from batch ``start`` on, forever."""
        done, epoch = 0, 0
        while True:
            blocks = self.blocks(epoch)
            if not any(b.n_rows >= self.batch_size for b in blocks):
                raise ValueError("no block holds a full batch; lower sae.batch_size")
            for b in blocks:
                nb = b.n_rows // self.batch_size
                if done + nb > start:
                    yield b, max(start - done, 0)
                done += nb
            epoch += 1

    def batches(self, start: int = 0) -> Iterator[torch.Tensor]:
        """float32 batches ``[batch_size, d]``, beginning with batch number ``start``."""
        plan = self._plan(start)
        pool = ThreadPoolExecutor(max_workers=1) if self.prefetch else None
        try:
            block, skip = next(plan)
            pending = pool.submit(self._load, block) if pool else None
            while True:
                data = pending.result() if pending is not None else self._load(block)
                nxt, nxt_skip = next(plan)
                pending = pool.submit(self._load, nxt) if pool else None
                bs = self.batch_size
                for i in range(skip, len(data) // bs):
                    yield torch.from_numpy(data[i * bs:(i + 1) * bs]).float()
                block, skip = nxt, nxt_skip
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
