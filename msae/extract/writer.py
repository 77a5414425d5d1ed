"""Writing activations (one zarr v3 array per layer), token-table parts and the progress record.

Commit protocol of one chunk of samples (what makes extraction resumable):
1. append every batch's rows to every layer's array (a background thread compresses and writes);
2. wait for those writes, then write the chunk's token-table part ``_progress/tokens/part-<c>``;
3. record the chunk (and the new committed row count) in ``_progress/extraction.json``.
A run that dies anywhere before (3) leaves rows beyond the committed count; the next run cuts
every array back to the committed count (zarr resize) and redoes the chunk.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from msae.store import Store, tmp_name

PROGRESS = "_progress/extraction.json"
PARTS = "_progress/tokens"
ACTIVATIONS_DIR = "activations"


def part_name(chunk: int) -> str:
    return f"{PARTS}/part-{chunk:06d}.parquet"


def numpy_dtype(store_dtype: str) -> np.dtype:
    """numpy dtype of the stored array; bfloat16 is stored as its raw bits in uint16
    (``attrs['msae_dtype'] == 'bfloat16'``: view as ``torch.bfloat16`` to read)."""
    return np.dtype({"float16": "float16", "float32": "float32", "bfloat16": "uint16"}[store_dtype])


def to_float32(data: np.ndarray, msae_dtype: str | None) -> np.ndarray:
    """Stored rows -> float32, for any ``store_dtype`` (pass the array's ``attrs['msae_dtype']``)."""
    if msae_dtype == "bfloat16":
        return (np.asarray(data).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(data).astype(np.float32, copy=False)


def read_activations(store: Store, layer: int, rows: slice | np.ndarray | None = None):
    """Read rows of a layer's array as a torch tensor in its stored dtype (bfloat16 handled)."""
    import torch
    import zarr

    arr = zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True), mode="r")
    data = arr[rows if rows is not None else slice(None)] if not isinstance(rows, np.ndarray) else arr.oindex[rows]
    t = torch.from_numpy(np.ascontiguousarray(data))
    if arr.attrs.get("msae_dtype") == "bfloat16":
        t = t.view(torch.bfloat16)
    return t


class ActivationWriter:
    """Appends rows to ``<store>/activations/layer=<L>.zarr`` for several layers in lockstep."""

    def __init__(
        self, store: Store, layers: list[int], d_model: int, store_dtype: str, rows_per_chunk: int,
        attrs: dict[str, Any] | None = None, max_pending: int = 2,
    ) -> None:
        import zarr

        self.store = store
        self.layers = list(layers)
        self.d_model = d_model
        self.dtype = numpy_dtype(store_dtype)
        self.store_dtype = store_dtype
        self.rows_per_chunk = rows_per_chunk
        self.attrs = dict(attrs or {})
        self.max_pending = max_pending
        self._zarr = zarr
        self.arrays: dict[int, Any] = {}
        self.n_rows = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msae-zarr")
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    # --- opening ------------------------------------------------------------------------------
    def open(self, committed_rows: int) -> bool:
        """Open or create every layer's array, cutting each back to ``committed_rows``.

        Returns False (nothing opened) when an existing array cannot continue this extraction
        (fewer rows than committed, another width or dtype): the caller then starts over.
        """
        zarr = self._zarr
        for layer in self.layers:
            name = self.store.activations_name(layer)
            zstore = self.store.zarr_store(name)
            arr = None
            if self.store.exists(name):
                try:
                    arr = zarr.open_array(store=zstore, mode="r+")
                except Exception:  # noqa: BLE001 - unreadable leftovers are recreated
                    arr = None
                if arr is not None and (
                    arr.ndim != 2 or arr.shape[1] != self.d_model or arr.dtype != self.dtype
                    or arr.shape[0] < committed_rows
                ):
                    return False
            if arr is None:
                if committed_rows:
                    return False
                arr = zarr.create_array(
                    store=zstore,
                    shape=(0, self.d_model),
                    chunks=(self.rows_per_chunk, self.d_model),
                    dtype=self.dtype,
                    compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
                    fill_value=0,
                    overwrite=True,
                    attributes={**self.attrs, "layer": layer, "msae_dtype": self.store_dtype},
                )
            elif arr.shape[0] > committed_rows:
                arr.resize((committed_rows, self.d_model))
            self.arrays[layer] = arr
        self.n_rows = committed_rows
        return True

    # --- writing ------------------------------------------------------------------------------
    def append(self, rows: dict[int, np.ndarray]) -> None:
        """Queue ``rows[layer]`` (same length for every layer) for appending; returns at once
        unless more than ``max_pending`` batches are already queued."""
        lengths = {v.shape[0] for v in rows.values()}
        if set(rows) != set(self.layers) or len(lengths) != 1:
            raise ValueError(f"append needs equally long rows for layers {self.layers}")
        n = lengths.pop()
        if n == 0:
            return
        start = self.n_rows
        self.n_rows += n
        self._raise_failed()
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self._write, start, rows))

    def _write(self, start: int, rows: dict[int, np.ndarray]) -> None:
        for layer, data in rows.items():
            arr = self.arrays[layer]
            end = start + data.shape[0]
            with self._lock:
                if arr.shape[0] < end:
                    arr.resize((end, self.d_model))
            arr[start:end] = data.astype(self.dtype, copy=False)

    def _raise_failed(self) -> None:
        for f in self._pending:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def flush(self) -> None:
        """Wait for every queued write; re-raises a write's error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def nbytes_stored(self, layer: int) -> int:
        """Bytes the layer's array takes in the store (compressed)."""
        try:
            return int(self.store.fs.du(self.store.path(self.store.activations_name(layer)), total=True))
        except Exception:  # noqa: BLE001 - some filesystems cannot du
            return 0


def concat_parts(store: Store, chunks: Iterable[int], schema: dict[str, pl.DataType], target: str) -> int:
    """Stream the token-table parts of ``chunks`` (in order) into one parquet file; returns rows."""
    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    path = store.path(target)
    tmp = tmp_name(path) if store.is_local else path  # this writer's own temp file, renamed when complete
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    rows = 0
    try:
        with store.fs.open(tmp, "wb") as f, pq.ParquetWriter(f, arrow_schema, compression="zstd") as writer:
            for c in chunks:
                df = store.read_parquet(part_name(c)).cast(schema)
                rows += df.height
                if df.height:
                    writer.write_table(df.to_arrow().cast(arrow_schema), row_group_size=1 << 20)
        if tmp != path:
            os.replace(tmp, path)
    except BaseException:
        if tmp != path and os.path.exists(tmp):
            os.remove(tmp)
        raise
    return rows
