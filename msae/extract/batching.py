"""Batched forwards: right-padded batches, one forward → store-dtype rows, batch size and OOM back-off.

Batch size: ``model.batch_size`` samples per forward, or ``auto`` (an estimate from the free GPU
memory, :func:`auto_batch_size`). On a CUDA out-of-memory error (:func:`is_out_of_memory`) the
extraction loop halves the batch and runs the same samples again; :func:`_forward_rows` writes
nothing, so a failed forward leaves no partial rows behind.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.config import ExtractionConfig
from msae.data.images import DEFAULT_LIMITS, ImageLimits
from msae.extract.hooks import capture_residual
from msae.extract.prepare import SAMPLE_COLUMNS, Prepared, _Preparer
from msae.extract.token_map import ANSWER, ImageTokenMapper
from msae.vlm.load import LoadedVLM

logger = logging.getLogger("msae.extract")

FP16_MAX = 65504.0


# --- batches ---------------------------------------------------------------------------------------


def collate(batch: list[Prepared], pad_id: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Right-padded inputs: real tokens keep positions 0..n-1, as in an unbatched forward.

    ``attention_mask`` marks the real tokens (it selects the rows to keep); it is NOT passed to
    the model (see :func:`_forward_inputs`)."""
    T = max(len(p.input_ids) for p in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), T), dtype=torch.long)
    for i, p in enumerate(batch):
        n = len(p.input_ids)
        input_ids[i, :n] = p.input_ids
        attention[i, :n] = 1
    out: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}
    with_img = [p for p in batch if p.pixel_values is not None]
    if with_img:
        n_max = max(p.pixel_values.shape[0] for p in with_img)
        shape = with_img[0].pixel_values.shape[1:]
        pv = torch.zeros((len(with_img), n_max, *shape), dtype=with_img[0].pixel_values.dtype)
        for i, p in enumerate(with_img):
            pv[i, : p.pixel_values.shape[0]] = p.pixel_values
        out["pixel_values"] = pv.to(device=device, dtype=dtype)
        out["image_sizes"] = torch.tensor([list(p.image_size) for p in with_img], device=device)
    return out


def _forward_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The model's inputs for a right-padded batch, without the attention mask.

    With right padding a causal LM's real tokens never attend to the pads that follow them, so
    their hidden states equal an unbatched forward's exactly. Leaving the mask out keeps SDPA on
    its fused causal kernel; with a padding mask it falls back to an O(T²) materialised mask,
    several times slower for LLaVA-NeXT's ~2–3k-token sequences. Pad rows are discarded.
    """
    return {k: v for k, v in inputs.items() if k != "attention_mask"}


def _batches(rows: list[tuple[int, dict]], size: int) -> Iterator[list[tuple[int, dict]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def _prefetched(pool: ThreadPoolExecutor, fn: Any, items: list[Any], ahead: int = 1) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed on ``pool`` up to ``ahead`` items early."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def prepare_batches(
    samples: pl.DataFrame, vlm: LoadedVLM, cfg: ExtractionConfig, batch_size: int | None = None,
    *, answer_mask: bool = False, image_limits: ImageLimits = DEFAULT_LIMITS,
) -> Iterator[dict[str, Any]]:
    """Model inputs for ``samples`` built exactly as extraction builds them (same rendering,
    processor call and truncation), as right-padded batches WITH ``attention_mask`` (marking the
    real tokens); samples extraction would skip are left out. For evaluations that re-run the
    model on extracted samples (e.g. the SAE's loss recovered).

    ``answer_mask``: also a bool ``[batch, T]`` ``"answer_mask"`` of the answer's tokens (all False
    where the processor gives no offsets); pop it before calling the model."""
    prep = _Preparer(vlm, cfg, ImageTokenMapper(vlm.model), image_limits)
    pad_id = vlm.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    rows = list(samples.select([c for c in SAMPLE_COLUMNS if c in samples.columns]).iter_rows(named=True))
    for batch in _batches(list(enumerate(rows)), resolve_batch_size(vlm, [], batch_size)):
        ok = [x for x in (prep(i, row) for i, row in batch) if isinstance(x, Prepared)]
        if not ok:
            continue
        inputs = collate(ok, pad_id, vlm.dtype, vlm.device)
        if answer_mask:
            mask = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
            for i, p in enumerate(ok):
                if p.tokens.roles is not None:
                    mask[i, : len(p.tokens.roles)] = torch.from_numpy(p.tokens.roles == ANSWER)
            inputs["answer_mask"] = mask
        yield inputs


# --- one forward -----------------------------------------------------------------------------------


_TORCH_STORE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _to_store(h: torch.Tensor, store_dtype: str) -> tuple[np.ndarray, int]:
    clamped = 0
    if store_dtype == "float16":
        big = h.abs() > FP16_MAX
        clamped = int(big.sum())
        if clamped:
            h = h.clamp(-FP16_MAX, FP16_MAX)
    h = h.to(_TORCH_STORE[store_dtype])
    if store_dtype == "bfloat16":
        h = h.view(torch.int16)
    arr = h.cpu().numpy()
    return (arr.view(np.uint16) if store_dtype == "bfloat16" else arr), clamped


def _forward_rows(
    model: torch.nn.Module, batch: list[Prepared], layers: list[int], pad_id: int, vlm: LoadedVLM, store_dtype: str
) -> tuple[dict[int, np.ndarray], int]:
    """One forward over ``batch`` → each layer's real-token rows in the store dtype, and the clamped count.

    Nothing is written here, so an out-of-memory error leaves no partial rows behind."""
    inputs = collate(batch, pad_id, vlm.dtype, vlm.device)
    clamped = 0
    with torch.inference_mode():
        outs = capture_residual(model, layers).run(model, **_forward_inputs(inputs), use_cache=False)
        mask = inputs["attention_mask"].bool()
        rows: dict[int, np.ndarray] = {}
        for layer in layers:
            rows[layer], k = _to_store(outs[layer][mask], store_dtype)
            clamped += k
        del outs
    return rows, clamped


# --- batch size and out-of-memory back-off ---------------------------------------------------------

AUTO_CPU_BATCH = 8
# LLaVA-NeXT's anyres view of a large image: 5 crops × 576 patches plus newlines and text ≈ 2.9k tokens.
AUTO_TOKENS_PER_SAMPLE = 2_900
AUTO_MEMORY_SHARE = 0.6  # of the free memory: the rest is headroom for fragmentation and the vision tower


def auto_batch_size(vlm: LoadedVLM, layers: list[int], max_batch: int = 64) -> int:
    """Samples per forward the free GPU memory should hold (``max_batch`` at most; 8 on CPU).

    An estimate, not a promise — the out-of-memory back-off corrects it. Per token, a decoder
    layer's forward holds about the residual stream and attention projections (6·d) and the MLP's
    gate/up/activation (3·intermediate) at once; each captured layer keeps one more residual row
    (d); eager attention adds its [heads × T] score row (SDPA's fused kernels do not). The forward
    stops after the deepest requested layer, so the LM head's logits never exist.
    """
    if vlm.device.type != "cuda":
        return max(1, min(AUTO_CPU_BATCH, max_batch))
    free, _total = torch.cuda.mem_get_info(vlm.device)
    cfg = getattr(vlm.model.config, "text_config", vlm.model.config)
    d = int(cfg.hidden_size)
    inter = int(getattr(cfg, "intermediate_size", None) or 4 * d)
    elem = torch.finfo(vlm.dtype).bits // 8
    per_token = 6 * d + 3 * inter + len(layers) * d
    if getattr(cfg, "_attn_implementation", None) == "eager":
        per_token += int(cfg.num_attention_heads) * AUTO_TOKENS_PER_SAMPLE
    per_sample = elem * per_token * AUTO_TOKENS_PER_SAMPLE
    return max(1, min(max_batch, int(free * AUTO_MEMORY_SHARE // per_sample)))


def resolve_batch_size(vlm: LoadedVLM, layers: list[int], requested: int | str | None = None) -> int:
    """``requested``, else the model config's ``batch_size``; ``auto`` becomes :func:`auto_batch_size`."""
    size = requested or vlm.batch_size
    if size == "auto":
        max_batch = vlm.config.auto_batch_max if vlm.config is not None else 64
        size = auto_batch_size(vlm, layers, max_batch)
        logger.info("batch_size auto: %d samples per forward", size)
    return int(size)


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA out-of-memory, whichever way torch reports it (typed error, or cuBLAS/cuDNN alloc failure)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("CUDA out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_accelerator_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
