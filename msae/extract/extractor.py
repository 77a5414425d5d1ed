"""Residual-stream extraction: samples → batched VLM forwards → zarr arrays + token table.

One forward pass per batch fills every requested layer (hooks; the forward stops after the
deepest layer). Rows are all non-pad tokens of every extracted sample in sample order, then
position order; ``tokens.parquet`` row i describes row i of every layer's array. Work is done in
resumable chunks of ``chunk_samples`` samples (see :mod:`msae.extract.writer` for the commit
protocol); a fingerprint of model, layers, extraction config and samples guards the progress
(:mod:`msae.extract.progress`).

Batch size: ``model.batch_size`` samples per forward, or ``auto`` (an estimate from the free GPU
memory, :func:`msae.extract.batching.auto_batch_size`). A CUDA out-of-memory error does not fail
the run: the batch is halved and the same samples are run again, and the smaller size is kept for
the rest of the run. Rows are committed only after a successful forward, so the output is the same
as without the error, and the resumable chunks are untouched (a chunk is committed only once all
its samples are).

This module keeps the chunk loop; per-sample preparation lives in :mod:`msae.extract.prepare`,
batches, forwards and batch sizing in :mod:`msae.extract.batching`, and the result and its
summaries in :mod:`msae.extract.results`. Their public names are re-exported here.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import polars as pl
import torch
from tqdm.auto import tqdm

from msae.config import ExtractionConfig
from msae.data.images import DEFAULT_LIMITS, ImageLimits
from msae.extract.batching import (
    _batches,
    _forward_rows,
    _prefetched,
    auto_batch_size,
    collate,
    free_accelerator_memory,
    is_out_of_memory,
    prepare_batches,
    resolve_batch_size,
)
from msae.extract.hooks import find_decoder_layers
from msae.extract.prepare import SAMPLE_COLUMNS, Prepared, Skipped, _Preparer, image_token_id
from msae.extract.progress import _clear, _complete_and_intact, _load_progress, extraction_fingerprint
from msae.extract.results import (
    ExtractionError,
    ExtractionResult,
    _ChunkAcc,
    _raise_all_failed,
    _result,
    _totals,
)
from msae.extract.token_map import TOKEN_SCHEMA, ImageTokenMapper, TokenMapError, build_token_table
from msae.extract.writer import PARTS, PROGRESS, ActivationWriter, concat_parts, part_name
from msae.store import Store
from msae.vlm.load import LoadedVLM

logger = logging.getLogger("msae.extract")


def validate_layers(model: torch.nn.Module, layers: list[int]) -> list[int]:
    n = len(find_decoder_layers(model))
    if not layers:
        raise ValueError("layers: at least one decoder layer is required")
    if any(not isinstance(layer, int) or isinstance(layer, bool) for layer in layers):
        raise ValueError(f"layers: must be integers, got {layers}")
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layers: {bad} out of range; the model has {n} decoder layers (valid: 0..{n - 1}): "
                         f"choose layers < {n}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: duplicates in {layers}")
    return sorted(layers)


def _d_model(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(getattr(cfg, "text_config", cfg), "hidden_size"))


def _commit_chunk(store: Store, progress: dict[str, Any]) -> None:
    """Record progress (the last step of a chunk's commit; tests inject crashes here)."""
    store.write_json(progress, PROGRESS)


def extract_activations(
    samples: pl.DataFrame,
    vlm: LoadedVLM,
    layers: list[int],
    store: Store,
    cfg: ExtractionConfig,
    progress: bool = True,
    batch_size: int | None = None,
    image_limits: ImageLimits = DEFAULT_LIMITS,
) -> ExtractionResult:
    """Extract the residual stream after ``layers`` for every sample; see the module docstring.

    ``image_limits``: the dataset's bounds on an image read (``ImageLimits.from_config``).

    Samples whose image cannot be loaded or that the processor rejects are skipped and counted
    by reason; if none is left an :class:`ExtractionError` names the reasons.
    """
    t0 = time.perf_counter()
    layers = validate_layers(vlm.model, list(layers))
    missing = [c for c in ("sample_id", "question", "answer") if c not in samples.columns]
    if missing:
        raise ValueError(f"samples table lacks columns {missing}")
    batch_size = resolve_batch_size(vlm, layers, batch_size)
    n = samples.height
    n_chunks = max(1, math.ceil(n / cfg.chunk_samples))
    d_model = _d_model(vlm.model)
    fp, fp_inputs = extraction_fingerprint(samples, vlm, layers, cfg)

    state = _load_progress(store)
    if state is not None and state.get("fingerprint") == fp and _complete_and_intact(store, state, layers):
        if state["n_rows"] == 0 or _totals(state)["done"] == 0:
            _raise_all_failed(_totals(state), n)
        logger.info("activations already extracted (%s); reusing", fp)
        return _result(store, state, layers, n, time.perf_counter() - t0, 0, reused=True, resumed=0)
    if state is None or state.get("fingerprint") != fp:
        if state is not None:
            logger.info("extraction fingerprint changed (%s -> %s): starting over", state.get("fingerprint"), fp)
        _clear(store)
        state = None
    if state is None:
        state = {
            "fingerprint": fp, "fingerprint_inputs": fp_inputs, "n_samples": n, "n_chunks": n_chunks,
            "chunk_samples": cfg.chunk_samples, "layers": layers, "d_model": d_model,
            "store_dtype": cfg.store_dtype, "n_rows": 0, "chunks": {}, "complete": False,
        }

    writer = ActivationWriter(
        store, layers, d_model, cfg.store_dtype, cfg.rows_per_zarr_chunk,
        attrs={"fingerprint": fp, "rows": "row i is described by row i of tokens.parquet"},
    )
    if not writer.open(int(state["n_rows"])):
        logger.warning("activation arrays do not match the progress record: starting over")
        writer.close()
        _clear(store)
        state.update(n_rows=0, chunks={}, complete=False)
        writer = ActivationWriter(store, layers, d_model, cfg.store_dtype, cfg.rows_per_zarr_chunk,
                                  attrs={"fingerprint": fp})
        writer.open(0)

    resumed = len(state["chunks"])
    if resumed:
        logger.info("resuming extraction: %d/%d chunks already done", resumed, n_chunks)
    mapper = ImageTokenMapper(vlm.model)
    prep = _Preparer(vlm, cfg, mapper, image_limits)
    pad_id = vlm.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    model = vlm.model
    rows_all = list(samples.select([c for c in SAMPLE_COLUMNS if c in samples.columns]).iter_rows(named=True))
    done_samples = sum(min(cfg.chunk_samples, n - int(c) * cfg.chunk_samples) for c in state["chunks"])
    new_tokens = 0
    bar = tqdm(total=n, initial=done_samples, disable=not progress, unit="sample", desc="extract")
    todo = [c for c in range(n_chunks) if str(c) not in state["chunks"]]
    work = [  # (chunk, batch rows, last batch of its chunk?) — a chunk without samples has one empty batch
        (c, batch, k == len(batches) - 1)
        for c in todo
        for batches in [list(_batches(
            [(i, rows_all[i]) for i in range(c * cfg.chunk_samples, min(n, (c + 1) * cfg.chunk_samples))],
            batch_size,
        )) or [[]]]
        for k, batch in enumerate(batches)
    ]

    def prepare(batch: list[tuple[int, dict]]) -> list[Prepared | Skipped]:
        return [prep(i, row) for i, row in batch]

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msae-prep")
    chunk = _ChunkAcc(writer.n_rows)
    size, halvings = batch_size, 0  # samples per forward now; lowered on out-of-memory
    try:
        # images are loaded and processed one batch ahead, across chunk boundaries
        for (c, _batch, last), items in zip(work, _prefetched(pool, prepare, [w[1] for w in work])):
            ok = [x for x in items if isinstance(x, Prepared)]
            for x in items:
                if isinstance(x, Skipped):
                    chunk.skip(x)
            start = 0
            while start < len(ok):  # the prepared batch in forwards of at most `size` samples
                sub = ok[start : start + size]
                try:
                    rows, k = _forward_rows(model, sub, layers, pad_id, vlm, cfg.store_dtype)
                except Exception as err:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
                    if not is_out_of_memory(err):
                        raise
                    if len(sub) == 1:
                        logger.error("CUDA out of memory on a single sample (%s): lower extraction.max_length, "
                                     "use a GPU with more memory or spread the model with model.device_map",
                                     sub[0].tokens.sample_id)
                        raise
                    size = len(sub) // 2
                    halvings += 1
                    logger.warning("CUDA out of memory with %d samples per forward: retrying them %d at a time",
                                   len(sub), size)
                else:
                    writer.append(rows)
                    chunk.clamped += k
                    table = build_token_table([p.tokens for p in sub], vlm.tokenizer, prep.image_token_id,
                                              prep.special_ids)
                    if table.height != rows[layers[0]].shape[0]:
                        raise TokenMapError(
                            f"token table has {table.height} rows but the batch produced "
                            f"{rows[layers[0]].shape[0]} activation rows"
                        )
                    chunk.parts.append(table)
                    new_tokens += table.height
                    start += len(sub)
                    continue
                free_accelerator_memory()  # after the except block: the error's frames no longer hold tensors
            bar.update(len(items))
            if progress and new_tokens:
                bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
            if not last:
                continue
            # commit the chunk: rows written -> token part -> progress record
            writer.flush()
            part = pl.concat(chunk.parts) if chunk.parts else pl.DataFrame(schema=TOKEN_SCHEMA)
            store.write_parquet(part, part_name(c))
            state["chunks"][str(c)] = chunk.record(part, writer.n_rows)
            state["n_rows"] = writer.n_rows
            _commit_chunk(store, state)
            if chunk.clamped:
                logger.warning("chunk %d: %d activation values beyond float16 range were clamped", c, chunk.clamped)
            chunk = _ChunkAcc(writer.n_rows)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        writer.close()

    totals = _totals(state)
    if totals["done"] == 0:
        state["complete"] = True  # nothing more to try with this fingerprint
        _commit_chunk(store, state)
        _raise_all_failed(totals, n)
    n_rows = concat_parts(store, range(n_chunks), TOKEN_SCHEMA, store.TOKENS)
    if n_rows != state["n_rows"]:
        raise RuntimeError(f"token table has {n_rows} rows but {state['n_rows']} activation rows were committed")
    state["complete"] = True
    _commit_chunk(store, state)
    store.rm(PARTS)
    wall = time.perf_counter() - t0
    result = _result(store, state, layers, n, wall, new_tokens, reused=False, resumed=resumed,
                     batch_size=size, oom_halvings=halvings)
    logger.info(
        "extracted %d tokens from %d/%d samples in %.1fs (%.0f tokens/s); skipped %s",
        result.n_tokens, result.samples_done, n, wall, result.tokens_per_s, result.samples_skipped,
    )
    return result


__all__ = [
    "ExtractionError",
    "ExtractionResult",
    "Prepared",
    "auto_batch_size",
    "collate",
    "extract_activations",
    "extraction_fingerprint",
    "image_token_id",
    "is_out_of_memory",
    "prepare_batches",
    "resolve_batch_size",
    "validate_layers",
]
