"""Residual-stream extraction: samples → batched VLM forwards → zarr arrays + token table.

One forward pass per batch fills every requested layer (hooks; the forward stops after the
deepest layer). Rows are all non-pad tokens of every extracted sample in sample order, then
position order; ``tokens.parquet`` row i describes row i of every layer's array. Work is done in
resumable chunks of ``chunk_samples`` samples (see :mod:`msae.extract.writer` for the commit
protocol); a fingerprint of model, layers, extraction config and samples guards the progress.

Batch size: ``model.batch_size`` samples per forward, or ``auto`` (an estimate from the free GPU
memory, :func:`auto_batch_size`). A CUDA out-of-memory error does not fail the run: the batch is
halved and the same samples are run again, and the smaller size is kept for the rest of the run.
Rows are committed only after a successful forward, so the output is the same as without the
error, and the resumable chunks are untouched (a chunk is committed only once all its samples are).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from msae.config import ExtractionConfig
from msae.extract.hooks import capture_residual, find_decoder_layers
from msae.extract.token_map import (
    ANSWER,
    TOKEN_SCHEMA,
    ChatRenderer,
    ImageTokenMapper,
    SampleTokens,
    TokenMapError,
    build_token_table,
    classify,
    expand_spans,
    shift_span,
    token_roles,
)
from msae.extract.writer import (
    ACTIVATIONS_DIR,
    PARTS,
    PROGRESS,
    ActivationWriter,
    concat_parts,
    part_name,
)
from msae.store import Store
from msae.vlm.load import LoadedVLM

logger = logging.getLogger("msae.extract")

EXTRACTOR_VERSION = 1
SAMPLE_COLUMNS = ("sample_id", "image", "question", "answer")
FP16_MAX = 65504.0


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


# --- fingerprint -----------------------------------------------------------------------------------


def samples_hash(samples: pl.DataFrame) -> str:
    cols = [c for c in SAMPLE_COLUMNS if c in samples.columns]
    return hashlib.sha256(samples.select(cols).write_csv().encode()).hexdigest()[:16]


def weights_signature(model: torch.nn.Module) -> str:
    """Cheap identity of the weights: shape and first/last values of every parameter."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        probe = torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(probe.tobytes())
    return h.hexdigest()[:16]


def extraction_fingerprint(
    samples: pl.DataFrame, vlm: LoadedVLM, layers: list[int], cfg: ExtractionConfig
) -> tuple[str, dict[str, Any]]:
    inputs = {
        "version": EXTRACTOR_VERSION,
        "model": {
            "name_or_path": vlm.name_or_path,
            "revision": vlm.revision,
            "dtype": str(vlm.dtype),
            "weights": weights_signature(vlm.model),
        },
        "layers": list(layers),
        "extraction": cfg.model_dump(mode="json"),
        "samples": samples_hash(samples),
        "n_samples": samples.height,
    }
    fp = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return fp, inputs


# --- per-sample preparation ------------------------------------------------------------------------


@dataclass
class Prepared:
    tokens: SampleTokens
    input_ids: torch.Tensor  # [n] long
    pixel_values: torch.Tensor | None  # [n_crops, 3, H, W]
    image_size: tuple[int, int] | None


@dataclass
class Skipped:
    sample_index: int
    sample_id: str
    reason: str
    detail: str


class _Preparer:
    """Image loading, chat rendering, processor call and token mapping for one sample."""

    def __init__(self, vlm: LoadedVLM, cfg: ExtractionConfig, mapper: ImageTokenMapper) -> None:
        self.processor = vlm.processor
        self.tokenizer = vlm.tokenizer
        self.cfg = cfg
        self.mapper = mapper
        self.renderer = ChatRenderer(vlm.processor, cfg.include_answer)
        self.image_token_id = image_token_id(vlm.model)
        self.image_token = getattr(self.processor, "image_token", "<image>")
        self.special_ids = special_ids(self.tokenizer, self.image_token_id)
        self.offsets_ok = True
        self._warned_roles = False

    def _process(self, img: Any, text: str) -> Any:
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self.offsets_ok:
            kwargs |= {"return_offsets_mapping": True, "return_text_replacement_offsets": True}
        images = [img] if img is not None else None
        try:
            return self.processor(images=images, text=[text], **kwargs)
        except Exception:  # noqa: BLE001
            if not self.offsets_ok:
                raise
            enc = self.processor(images=images, text=[text], return_tensors="pt")  # raises if the input is bad
            self.offsets_ok = False  # the processor cannot give offsets: roles fall back to "template"
            logger.warning("processor cannot return offset mappings; text roles will all be 'template'")
            return enc

    def __call__(self, index: int, row: dict[str, Any]) -> Prepared | Skipped:
        from msae.data.images import BadImage, load_image_rgb, to_rgb

        sid = str(row["sample_id"])
        img = None
        if row.get("image"):
            try:
                img = load_image_rgb(row["image"])
                if img.mode != "RGB":
                    img = to_rgb(img)
            except BadImage as err:
                return Skipped(index, sid, err.reason, str(err))
            except Exception as err:  # noqa: BLE001 - anything else about the image
                return Skipped(index, sid, "unreadable_image", f"{type(err).__name__}: {err}")
        question = row.get("question") or ""
        answer = row.get("answer") or ""
        try:
            rendered = self.renderer.render(question, answer, img is not None)
            enc = self._process(img, rendered.text)
        except Exception as err:  # noqa: BLE001 - a processor failure skips the sample
            return Skipped(index, sid, "processor_error", f"{type(err).__name__}: {err}")

        ids = enc["input_ids"][0].to(torch.long)
        ids_np = ids.numpy()
        layouts, pixel_values, image_size = [], None, None
        if img is not None:
            image_size = tuple(int(v) for v in enc["image_sizes"][0].tolist())
            n_crops = self.mapper.num_crops(image_size)
            pixel_values = enc["pixel_values"][0][:n_crops]
            layouts = [self.mapper.layout(image_size)]

        roles = None
        if self.offsets_ok and "offset_mapping" in enc:
            offsets = enc["offset_mapping"][0].numpy()
            reps = enc.get("text_replacement_offsets")
            reps = reps[0] if reps else expand_spans(
                rendered.text, self.image_token, [int((ids_np == self.image_token_id).sum())] if img else []
            )
            roles = token_roles(offsets, shift_span(rendered.question, reps), shift_span(rendered.answer, reps))

        # truncate text beyond max_length, never cutting image tokens
        if self.cfg.max_length is not None and len(ids_np) > self.cfg.max_length:
            img_pos = np.flatnonzero(ids_np == self.image_token_id)
            keep = max(self.cfg.max_length, int(img_pos[-1]) + 1 if img_pos.size else 0)
            ids, ids_np = ids[:keep], ids_np[:keep]
            roles = roles[:keep] if roles is not None else None

        tokens = SampleTokens(index, sid, ids_np, roles, layouts)
        try:  # the model would refuse this input too: skip it, loudly
            classify(ids_np, self.image_token_id, self.special_ids, layouts, f"sample {sid!r}")
        except TokenMapError as err:
            logger.warning(str(err))
            return Skipped(index, sid, "image_token_mismatch", str(err))
        return Prepared(tokens, ids, pixel_values, image_size)


def image_token_id(model: torch.nn.Module) -> int:
    cfg = model.config
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{type(model).__name__}.config has no image_token_id")


def special_ids(tokenizer: Any, image_id: int) -> np.ndarray:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("added_tokens_decoder",):
        for i, tok in (getattr(tokenizer, attr, None) or {}).items():
            if getattr(tok, "special", False):
                ids.add(int(i))
    ids.discard(image_id)
    return np.array(sorted(ids), dtype=np.int64)


# --- batching ----------------------------------------------------------------------------------------


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


def prepare_batches(
    samples: pl.DataFrame, vlm: LoadedVLM, cfg: ExtractionConfig, batch_size: int | None = None,
    *, answer_mask: bool = False,
) -> Iterator[dict[str, Any]]:
    """Model inputs for ``samples`` built exactly as extraction builds them (same rendering,
    processor call and truncation), as right-padded batches WITH ``attention_mask`` (marking the
    real tokens); samples extraction would skip are left out. For evaluations that re-run the
    model on extracted samples (e.g. the SAE's loss recovered).

    ``answer_mask``: also a bool ``[batch, T]`` ``"answer_mask"`` of the answer's tokens (all False
    where the processor gives no offsets); pop it before calling the model."""
    prep = _Preparer(vlm, cfg, ImageTokenMapper(vlm.model))
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


# --- the extraction -----------------------------------------------------------------------------------


def validate_layers(model: torch.nn.Module, layers: list[int]) -> list[int]:
    n = len(find_decoder_layers(model))
    if not layers:
        raise ValueError("layers: at least one decoder layer is required")
    if any(not isinstance(layer, int) or isinstance(layer, bool) for layer in layers):
        raise ValueError(f"layers: must be integers, got {layers}")
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layers: {bad} out of range; the model has {n} decoder layers (valid: 0..{n - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers: duplicates in {layers}")
    return sorted(layers)


def _clear(store: Store) -> None:
    for name in (ACTIVATIONS_DIR, store.TOKENS, "_progress"):
        store.rm(name)


def _load_progress(store: Store) -> dict[str, Any] | None:
    if not store.exists(PROGRESS):
        return None
    try:
        return store.read_json(PROGRESS)
    except Exception:  # noqa: BLE001 - a damaged record means starting over
        return None


def _d_model(model: torch.nn.Module) -> int:
    cfg = model.config
    return int(getattr(getattr(cfg, "text_config", cfg), "hidden_size"))


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


def _complete_and_intact(store: Store, progress: dict[str, Any], layers: list[int]) -> bool:
    import zarr

    if not progress.get("complete") or not store.exists(store.TOKENS):
        return False
    for layer in layers:
        name = store.activations_name(layer)
        if not store.exists(name):
            return False
        try:
            arr = zarr.open_array(store=store.zarr_store(name, read_only=True), mode="r")
        except Exception:  # noqa: BLE001
            return False
        if arr.shape[0] != progress["n_rows"]:
            return False
    return True


def _commit_chunk(store: Store, progress: dict[str, Any]) -> None:
    """Record progress (the last step of a chunk's commit; tests inject crashes here)."""
    store.write_json(progress, PROGRESS)


def _batches(rows: list[tuple[int, dict]], size: int) -> Iterator[list[tuple[int, dict]]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def extract_activations(
    samples: pl.DataFrame,
    vlm: LoadedVLM,
    layers: list[int],
    store: Store,
    cfg: ExtractionConfig,
    progress: bool = True,
    batch_size: int | None = None,
) -> ExtractionResult:
    """Extract the residual stream after ``layers`` for every sample; see the module docstring.

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
    prep = _Preparer(vlm, cfg, mapper)
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


def _prefetched(pool: ThreadPoolExecutor, fn: Any, items: list[Any], ahead: int = 1) -> Iterator[Any]:
    """``fn(item)`` for each item, in order, computed on ``pool`` up to ``ahead`` items early."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _counts(df: pl.DataFrame, col: str) -> dict[str, int]:
    if not df.height:
        return {}
    vc = df.group_by(col).len()
    return {str(k): int(v) for k, v in zip(vc[col].to_list(), vc["len"].to_list()) if k is not None}


def _raise_all_failed(totals: dict[str, Any], n: int) -> None:
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(totals["skipped"].items())) or "none recorded"
    ex = "; ".join(e for v in totals["examples"].values() for e in v[:1])
    raise ExtractionError(
        f"no activations extracted: all {n} samples were skipped ({reasons})" + (f"; e.g. {ex}" if ex else "")
    )


__all__ = [
    "ExtractionError",
    "ExtractionResult",
    "auto_batch_size",
    "resolve_batch_size",
    "extract_activations",
    "extraction_fingerprint",
    "prepare_batches",
    "validate_layers",
]
