"""How good is an SAE: reconstruction on held-out samples, sparsity, dead/dense latents, and the
next-token loss it costs when spliced into the model.

* :func:`evaluate_sae` — on rows of *held-out samples* (:func:`msae.sae.stream.heldout_mask`, the
  same split training leaves out), image and text tokens: FVU on all / image / text tokens
  (FVU = Σ||x − x̂||² / Σ||x − mean(x)||², the mean taken within the subset), L0, the share of
  latents that never fire on those tokens (dead) and that fire on more than ``dense_threshold`` of
  them (dense).
* :func:`loss_recovered` — run the causal LM / VLM three times on the same inputs: clean, with the
  SAE reconstruction replacing the output of decoder layer ``layer``, and with that output zeroed;
  recovered = (L_zero − L_sae) / (L_zero − L_clean).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from msae.config import SAEConfig
from msae.sae.model import SparseCoder
from msae.sae.stream import heldout_mask, modality_mask, read_rows


@dataclass(frozen=True)
class EvalResult:
    n_tokens: int
    n_image: int
    n_text: int
    fvu: float
    fvu_image: float
    fvu_text: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    fire_rate: np.ndarray
    """[num_latents] share of evaluated tokens on which each latent fired."""

    def metrics(self) -> dict[str, float | int]:
        """Everything but the per-latent rates (for msae.json / Dagster metadata)."""
        d = asdict(self)
        d.pop("fire_rate")
        return d


def heldout_rows(tokens: pl.DataFrame, cfg: SAEConfig) -> np.ndarray:
    """Image and text rows of the held-out samples (special/template excluded as in training)."""
    keep = modality_mask(tokens, "both", include_special=cfg.include_special,
                         include_template=cfg.include_template)
    return np.flatnonzero(keep & heldout_mask(tokens, cfg.eval_fraction, cfg.seed))


@torch.no_grad()
def evaluate_sae(
    sae: SparseCoder,
    array: Any,
    tokens: pl.DataFrame,
    rows: np.ndarray | None = None,
    *,
    cfg: SAEConfig | None = None,
    max_tokens: int | None = None,
    dense_threshold: float | None = None,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
) -> EvalResult:
    """Evaluate ``sae`` (raw activation units) on ``rows`` (default: :func:`heldout_rows`).

    ``max_tokens`` (default ``cfg.eval_tokens``) keeps the first rows in row order.
    """
    cfg = cfg or SAEConfig()
    rows = heldout_rows(tokens, cfg) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("no rows to evaluate on (no held-out samples? raise sae.eval_fraction)")
    max_tokens = max_tokens or cfg.eval_tokens
    dense_threshold = dense_threshold if dense_threshold is not None else cfg.dense_threshold
    rows = np.sort(rows)[:max_tokens]
    device = device or sae.device
    mod = tokens["modality"].to_numpy()[rows]
    groups = {"all": np.ones(len(rows), bool), "image": mod == "image", "text": mod == "text"}
    d = int(array.shape[1])
    n = {g: 0 for g in groups}
    sum_x = {g: torch.zeros(d, dtype=torch.float64) for g in groups}
    sum_sq = {g: 0.0 for g in groups}
    sum_err = {g: 0.0 for g in groups}
    fires = torch.zeros(sae.num_latents, dtype=torch.long)
    l0 = 0
    was_training = sae.training
    sae.eval()
    try:
        unit = max(batch_size, 1)
        for lo in range(0, len(rows), unit * 8):  # read in slabs, encode in batches
            slab_rows = rows[lo:lo + unit * 8]
            slab = read_rows(array, slab_rows)
            for blo in range(0, len(slab), unit):
                x = torch.from_numpy(slab[blo:blo + unit].astype(np.float32)).to(device)
                out = sae(x)
                on = out.latent_acts > 0
                l0 += int(on.sum())
                fires += torch.bincount(out.latent_indices[on].cpu(), minlength=sae.num_latents)
                err = (x.double() - out.reconstruction.double()).pow(2).sum(1).cpu()
                xd = x.double().cpu()
                for g, mask in groups.items():
                    m = torch.from_numpy(mask[lo + blo: lo + blo + len(x)])
                    if not bool(m.any()):
                        continue
                    n[g] += int(m.sum())
                    sum_x[g] += xd[m].sum(0)
                    sum_sq[g] += float(xd[m].pow(2).sum())
                    sum_err[g] += float(err[m].sum())
    finally:
        sae.train(was_training)

    def fvu(g: str) -> float:
        if n[g] == 0:
            return float("nan")
        total = sum_sq[g] - float(sum_x[g].pow(2).sum()) / n[g]
        return sum_err[g] / total if total > 0 else float("nan")

    rate = (fires.double() / len(rows)).numpy()
    return EvalResult(
        n_tokens=len(rows), n_image=n["image"], n_text=n["text"],
        fvu=fvu("all"), fvu_image=fvu("image"), fvu_text=fvu("text"),
        l0=l0 / len(rows), dead_fraction=float((rate == 0).mean()),
        dense_fraction=float((rate > dense_threshold).mean()), fire_rate=rate,
    )


# --- loss recovered ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossRecovered:
    clean: float
    with_sae: float
    zero_ablated: float
    recovered: float
    """(zero_ablated - with_sae) / (zero_ablated - clean): 1 = the SAE costs nothing, 0 = as bad as zero."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (also inside a LLaVA-style VLM, not the vision tower's)."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    n_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers"
                  and (n_layers is None or len(m) == n_layers)]
    preferred = [c for c in candidates if "language_model" in c[0]] or \
                [c for c in candidates if "vision" not in c[0] and "visual" not in c[0]]
    if len(preferred) != 1:
        raise ValueError(f"cannot tell the decoder layers apart: {[c[0] for c in candidates]}")
    return preferred[0][1]


@contextmanager
def replace_output(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, ``module``'s hidden-state output ``h`` is replaced by ``fn(h)``."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _loss(model: nn.Module, inputs: Mapping[str, Any]) -> float:
    return float(model(**inputs).loss)


@torch.no_grad()
def loss_recovered(model: nn.Module, inputs: Mapping[str, Any], layer: int, sae: SparseCoder) -> LossRecovered:
    """Next-token loss clean / with ``sae`` spliced in after decoder layer ``layer`` / zero-ablated.

    ``inputs`` are the keyword arguments of the model's forward (``input_ids``, ``attention_mask``,
    and for a VLM ``pixel_values``, ``image_sizes``); ``labels`` defaults to ``input_ids`` with
    padding and image placeholder tokens set to -100. Only non-padding positions are replaced.
    ``sae`` takes raw activations.
    """
    inputs = dict(inputs)
    mask = inputs.get("attention_mask")
    if "labels" not in inputs:
        labels = inputs["input_ids"].clone()
        if mask is not None:
            labels[mask == 0] = -100
        config = getattr(model, "config", None)
        image_token = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        if image_token is not None:  # image placeholders are not text to predict
            labels[labels == image_token] = -100
        inputs["labels"] = labels
    target = decoder_layers(model)[layer]

    def splice(make: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def fn(h: Tensor) -> Tensor:
            new = make(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
            if mask is None:
                return new
            keep = (mask != 0).to(h.device).unsqueeze(-1)
            return torch.where(keep, new, h)
        return fn

    clean = _loss(model, inputs)
    with replace_output(target, splice(lambda x: sae(x.to(sae.device, sae.dtype)).reconstruction.to(x.device))):
        with_sae = _loss(model, inputs)
    with replace_output(target, splice(torch.zeros_like)):
        zero = _loss(model, inputs)
    denom = zero - clean
    recovered = (zero - with_sae) / denom if denom != 0 else float("nan")
    return LossRecovered(clean, with_sae, zero, recovered)
