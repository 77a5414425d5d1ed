"""The `sae` stage without Dagster: train (or load) one SAE for a layer × width, evaluate it, save it.

    fit_sae(cfg, store, layer, width, vlm) -> SaeStageResult

* ``sae.source: train`` — train on ``<store>/activations/layer=<L>.zarr`` (rows described by
  ``tokens.parquet``) with resumable checkpoints in ``<store>/sae/layer=<L>/width=<W>/_checkpoints``
  (local stores; a rerun after an interruption, or after a change that does not touch training such
  as ``eval_tokens`` or ``loss_samples``, resumes from the last one instead of starting over);
* ``sae.source: pretrained`` — load ``sae.pretrained`` at hookpoint ``sae.hookpoint_template``; its
  number of latents must equal the partition's width;
* evaluate on the held-out samples' tokens (:func:`msae.sae.evaluate.evaluate_sae`) and, given a
  loaded VLM and ``sae.loss_samples > 0``, the next-token loss recovered on that many held-out
  samples, whose inputs are rebuilt exactly as extraction built them;
* save to ``<store>/sae/layer=<L>/width=<W>/`` in sparsify's layout (``msae.json`` holds the metrics)
  plus ``train_log.parquet`` (the loss/FVU curve).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl

from msae.config import MsaeConfig
from msae.sae.evaluate import EvalResult, LossRecovered, evaluate_sae, loss_recovered
from msae.sae.formats import SPARSIFY_WEIGHTS, load_pretrained, save_sae
from msae.sae.model import SparseCoder
from msae.sae.stream import heldout_mask
from msae.store import Store

TRAIN_LOG = "train_log.parquet"
CHECKPOINTS = "_checkpoints"


@dataclass(frozen=True)
class SaeStageResult:
    layer: int
    width: int
    source: str
    path: str
    """URL of the SAE folder (sparsify layout)."""
    eval: EvalResult
    loss: LossRecovered | None
    """None when no VLM was given or ``sae.loss_samples`` is 0."""
    loss_samples: int
    log: pl.DataFrame
    """Training log (empty for a pretrained SAE): step, tokens, lr, loss, fvu, auxk, l0, dead_fraction."""
    train: dict[str, Any] = field(default_factory=dict)
    data_version: str = ""
    """Hash of the saved weights: identical weights → identical version."""

    def metrics(self) -> dict[str, Any]:
        """Flat, JSON-able numbers (msae.json, manifests, Dagster metadata)."""
        e = self.eval
        out: dict[str, Any] = {
            "fvu": e.fvu, "fvu_image": e.fvu_image, "fvu_text": e.fvu_text, "l0": e.l0,
            "dead_fraction": e.dead_fraction, "dense_fraction": e.dense_fraction,
            "eval_tokens": e.n_tokens, "eval_image_tokens": e.n_image, "eval_text_tokens": e.n_text,
        }
        if self.loss is not None:
            out |= {"loss_clean": self.loss.clean, "loss_with_sae": self.loss.with_sae,
                    "loss_zero_ablated": self.loss.zero_ablated, "loss_recovered": self.loss.recovered,
                    "loss_samples": self.loss_samples}
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in out.items()}


class _Float32Rows:
    """Row access to a zarr array stored as bfloat16 bits (uint16), returning float32."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.chunks = array, array.shape, array.chunks
        self.shards = getattr(array, "shards", None)
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, idx: Any) -> np.ndarray:
        from msae.extract.writer import to_float32

        return to_float32(self.array[idx], "bfloat16")


def open_layer(store: Store, layer: int) -> Any:
    """The layer's activation array (read-only; bfloat16 storage read as float32)."""
    import zarr

    name = store.activations_name(layer)
    if not store.exists(name):
        raise FileNotFoundError(f"no activations for layer {layer} in {store.root} ({name}); "
                                "materialize `activations` first")
    arr = zarr.open_array(store=store.zarr_store(name, read_only=True), mode="r")
    return _Float32Rows(arr) if arr.attrs.get("msae_dtype") == "bfloat16" else arr


def sae_device(cfg: MsaeConfig) -> str:
    from msae.vlm.load import resolve_device

    return str(resolve_device(cfg.model.device))


def _load_pretrained(cfg: MsaeConfig, layer: int, width: int, d_model: int, device: str) -> SparseCoder:
    if not cfg.sae.pretrained:
        raise ValueError("sae.source is 'pretrained' but sae.pretrained is not set (a folder or HF repo)")
    hookpoint = cfg.sae.hookpoint_template.format(layer=layer)
    sae = load_pretrained(cfg.sae.pretrained, hookpoint, device=device, local_files_only=cfg.model.local_files_only)
    if sae.num_latents != width:
        raise ValueError(f"sae.pretrained {cfg.sae.pretrained!r} [{hookpoint}] has {sae.num_latents} latents but "
                         f"this partition's width is {width}: set `widths: [{sae.num_latents}]` in the config")
    if sae.d_in != d_model:
        raise ValueError(f"sae.pretrained {cfg.sae.pretrained!r} [{hookpoint}] reads d_in={sae.d_in} but layer "
                         f"{layer}'s activations have d_model={d_model}: wrong model or layer?")
    return sae.float().eval()


def loss_samples_table(store: Store, tokens: pl.DataFrame, cfg: MsaeConfig) -> pl.DataFrame:
    """The first ``sae.loss_samples`` held-out samples (the same split evaluation uses)."""
    from msae.data.samples import read_samples

    held = tokens.filter(pl.Series(heldout_mask(tokens, cfg.sae.eval_fraction, cfg.sae.seed)))
    ids = held["sample_id"].cast(pl.Utf8).unique(maintain_order=True).head(cfg.sae.loss_samples).to_list()
    samples = read_samples(store)
    return samples.filter(pl.col("sample_id").cast(pl.Utf8).is_in(ids))


def batched_loss_recovered(vlm: Any, samples: pl.DataFrame, cfg: MsaeConfig, layer: int,
                           sae: SparseCoder) -> LossRecovered | None:
    """Loss recovered over ``samples`` in the VLM's batches, weighted by predicted tokens
    (``sae.loss_tokens``: every text token, or the answer's only)."""
    from msae.extract.extractor import image_token_id, prepare_batches

    image_tok = image_token_id(vlm.model)
    answers_only = cfg.sae.loss_tokens == "answer"
    sums, total = np.zeros(3), 0
    from msae.data.images import ImageLimits

    for inputs in prepare_batches(samples, vlm, cfg.extraction, answer_mask=answers_only,
                                  image_limits=ImageLimits.from_config(cfg.dataset)):
        counted = inputs["attention_mask"].bool() & (inputs["input_ids"] != image_tok)
        if answers_only:
            counted &= inputs.pop("answer_mask")
        inputs["labels"] = inputs["input_ids"].masked_fill(~counted, -100)
        n = int(counted[:, 1:].sum())  # the first token of a row is never predicted
        if n == 0:
            continue
        r = loss_recovered(vlm.model, inputs, layer, sae)
        sums += n * np.array([r.clean, r.with_sae, r.zero_ablated])
        total += n
    if total == 0:
        return None
    clean, with_sae, zero = (sums / total).tolist()
    denom = zero - clean
    return LossRecovered(clean, with_sae, zero, (zero - with_sae) / denom if denom != 0 else float("nan"))


def fit_sae(
    cfg: MsaeConfig, store: Store, layer: int, width: int, vlm: Any | None = None, *,
    device: str | None = None, progress: bool = False, report: Callable[[str], None] | None = None,
) -> SaeStageResult:
    """Train or load the SAE for ``layer`` × ``width``, evaluate it and save it (module doc)."""
    from msae.sae.train import default_lr, train_sae

    scfg = cfg.sae
    device = device or sae_device(cfg)
    array = open_layer(store, layer)
    tokens = store.read_parquet(store.TOKENS)
    folder = store.sae_name(layer, width)
    log, train_meta = pl.DataFrame(), {}
    if scfg.source == "train":
        ckpt = store.path(folder, CHECKPOINTS) if store.is_local else None
        from msae.manifest import load_manifest

        extracted = load_manifest(store, "activations", str(layer))  # None: extracted outside the pipeline
        trained = train_sae(array, tokens, scfg, width, ckpt, device, progress=progress, report=report,
                            data_version=extracted.data_version if extracted is not None else None)
        sae, log, train_meta = trained.model, trained.log, trained.metadata()
        train_meta["resumed_from_step"] = trained.resumed_from_step
        train_meta["lr"] = scfg.lr or default_lr(width)
    else:
        sae = _load_pretrained(cfg, layer, width, int(array.shape[1]), device)
    ev = evaluate_sae(sae, array, tokens, cfg=scfg, device=device)
    loss = None
    n_loss = 0
    if vlm is not None and scfg.loss_samples > 0:
        samples = loss_samples_table(store, tokens, cfg)
        n_loss = samples.height
        loss = batched_loss_recovered(vlm, samples, cfg, layer, sae) if n_loss else None
    result = SaeStageResult(layer, width, scfg.source, store.url(folder), ev, loss, n_loss, log, train_meta)
    meta = {"layer": layer, "width": width, "source": scfg.source, "k": sae.k,
            "sae_config": scfg.model_dump(mode="json"), **train_meta, **result.metrics()}
    save_sae(sae, store.url(folder), meta)
    if log.height:
        store.write_parquet(log, folder, TRAIN_LOG)
    version = hashlib.sha256(store.read_bytes(folder, SPARSIFY_WEIGHTS)).hexdigest()[:16]
    return replace(result, data_version=version)


def training_curve_png(log: pl.DataFrame, title: str = "") -> bytes | None:
    """FVU and dead fraction against training tokens, as PNG bytes (None for an empty log)."""
    if log.height == 0:
        return None
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(5, 2.8), dpi=100)
    ax = fig.add_subplot()
    ax.plot(log["tokens"], log["fvu"], label="train FVU")
    ax.plot(log["tokens"], log["dead_fraction"], label="dead fraction", linestyle="--")
    ax.set_xlabel("training tokens")
    ax.set_ylim(0, max(1.0, float(log["fvu"].max() or 0)))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


__all__ = ["SaeStageResult", "batched_loss_recovered", "fit_sae", "loss_samples_table", "open_layer",
           "training_curve_png"]
