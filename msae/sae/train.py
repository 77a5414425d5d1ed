"""Train one SAE on a zarr activation array, streaming, resumable, CPU or GPU.

Recipe (Gao et al. 2024; EleutherAI sparsify):

* rows: the modality ``cfg.train_on`` from ``tokens.parquet``, special and template tokens out by
  default, and never the held-out samples (``cfg.eval_fraction``, see :func:`heldout_mask`);
* inputs multiplied by one scalar ``scale`` so that E||x||² = d_model (estimated on
  ``cfg.init_sample_tokens`` rows); the returned model has the scale folded in and takes raw
  activations (:meth:`SparseCoder.fold_input_scale`), ``TrainResult.scale`` records it;
* ``b_dec`` starts at the geometric median (or mean) of that sample;
* Adam, lr ``cfg.lr`` or ``2e-4 / sqrt(width / 2**14)``, linear warm-up then linear/cosine decay;
  loss = FVU + ``auxk_coef`` · AuxK; after each step the decoder gradient's component along each
  row is removed before the update and the rows are renormalised after it;
* ``token_budget // batch_size`` steps; a checkpoint (model, optimizer, stream position, dead-latent
  counters, log) every ``cfg.checkpoint_every`` steps and at the end, from which a rerun resumes —
  the resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from msae.config import SAEConfig, config_hash
from msae.runtime import ProgressReport
from msae.sae.model import SparseCoder
from msae.sae.stream import ActivationStream, heldout_mask, modality_mask, sample_rows
from msae.store import tmp_name

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainResult:
    model: SparseCoder
    """Trained SAE taking raw activations (the normalisation scale is folded in), in eval mode."""
    log: pl.DataFrame
    """One row per log window: step, tokens, lr, loss, fvu, auxk, l0, dead_fraction."""
    scale: float
    """Inputs were multiplied by this during training (E||scale·x||² = d_model)."""
    n_steps: int
    n_tokens: int
    resumed_from_step: int
    """0 for a fresh run, else the checkpoint step it resumed from."""
    n_train_rows: int

    def metadata(self) -> dict[str, Any]:
        """What :func:`msae.sae.formats.save_sae` stores beside the weights."""
        last = self.log.tail(1).to_dicts()[0] if self.log.height else {}
        return {"activation_scale": self.scale, "train_steps": self.n_steps, "train_tokens": self.n_tokens,
                "train_rows": self.n_train_rows, "final_train_fvu": last.get("fvu"),
                "final_dead_fraction": last.get("dead_fraction")}


def default_lr(width: int) -> float:
    """Gao et al. / sparsify: 2e-4 at 16,384 latents, scaled by 1/sqrt(width / 16,384)."""
    return 2e-4 / math.sqrt(width / 2**14)


def lr_at(step: int, total: int, base: float, warmup_fraction: float, schedule: str) -> float:
    warmup = max(1, round(warmup_fraction * total))
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * (1 - progress)


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, starting from the mean."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * max(1.0, float(m.norm())):
            return new
        m = new
    return m


def train_rows(tokens: pl.DataFrame, cfg: SAEConfig) -> np.ndarray:
    """Row indices the SAE trains on (modality selection minus held-out samples)."""
    keep = modality_mask(tokens, cfg.train_on, include_special=cfg.include_special,
                         include_template=cfg.include_template)
    keep &= ~heldout_mask(tokens, cfg.eval_fraction, cfg.seed)
    return np.flatnonzero(keep)


# --- checkpoints ----------------------------------------------------------------------------------
# Settings that do not change the trained weights (a checkpoint stays valid when they change).
_NOT_TRAINING = {"source", "pretrained", "hookpoint_template", "checkpoint_every", "eval_tokens", "dense_threshold",
                 "loss_samples", "loss_tokens", "check_max_fvu", "check_max_dead_fraction"}


def _fingerprint(cfg: SAEConfig, width: int, shape: tuple[int, ...], n_tokens: int,
                 data_version: str | None = None) -> str:
    training = cfg.model_dump(mode="json", exclude=_NOT_TRAINING)
    data = {"width": width, "shape": list(shape), "tokens": n_tokens, "v": CHECKPOINT_VERSION}
    if data_version is not None:
        data["data_version"] = data_version
    return config_hash(training, data)


def _latest(ckpt_dir: Path) -> Path | None:
    marker = ckpt_dir / "LATEST"
    if not marker.is_file():
        return None
    path = ckpt_dir / marker.read_text().strip()
    return path if (path / "state.json").is_file() else None


def _save_checkpoint(ckpt_dir: Path, step: int, model: SparseCoder, opt: torch.optim.Optimizer,
                     since_fired: torch.Tensor, state: dict[str, Any]) -> None:
    """Write ``step-<n>/`` beside the old ones, then point LATEST at it, then drop the old ones."""
    name = f"step-{step:09d}"
    for stale in ckpt_dir.glob(f".{name}.*tmp"):  # left by a killed run (the stage lock admits one writer)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_dir.glob("LATEST.*tmp"):
        stale.unlink(missing_ok=True)
    tmp = Path(tmp_name(str(ckpt_dir / f".{name}")))
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "sae.safetensors"))
    save_file({"since_fired": since_fired.cpu()}, str(tmp / "counters.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    final = ckpt_dir / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    marker = Path(tmp_name(str(ckpt_dir / "LATEST")))
    marker.write_text(name)
    os.replace(marker, ckpt_dir / "LATEST")
    for old in ckpt_dir.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(path: Path, model: SparseCoder, opt: torch.optim.Optimizer, device: str):
    model.load_state_dict(load_file(str(path / "sae.safetensors"), device=str(device)))
    opt.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    since_fired = load_file(str(path / "counters.safetensors"), device=str(device))["since_fired"]
    return since_fired, json.loads((path / "state.json").read_text())


# --- training -------------------------------------------------------------------------------------
def train_sae(
    array: Any,
    tokens: pl.DataFrame,
    cfg: SAEConfig,
    width: int,
    checkpoint_dir: str | None = None,
    device: str = "cpu",
    *,
    progress: bool = True,
    log_every: int | None = None,
    max_steps: int | None = None,
    prefetch: bool = True,
    data_version: str | None = None,
    report: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a ``cfg.architecture`` SAE with ``width`` latents on rows of ``array`` (zarr or numpy).

    ``checkpoint_dir`` (local folder): resume from its latest checkpoint when it was written for
    the same config, width and data; otherwise start afresh (with a warning if one was there).
    ``data_version``: the activations' identity (their manifest's data version). Without it "the
    same data" means only the same array shape and token count, so a layer re-extracted from
    retrained weights would resume the old model's SAE; the pipeline always passes it.
    ``max_steps`` stops early (after a checkpoint) while keeping the schedule of the full budget —
    an interruption on purpose, for tests and time-sliced jobs.
    ``report``: where a progress line goes at every tenth of the steps (:class:`msae.runtime.ProgressReport`;
    the asset passes its Dagster logger, which sees no tqdm bar).
    """
    if tokens.height != array.shape[0]:
        raise ValueError(f"tokens.parquet has {tokens.height} rows but the activation array has "
                         f"{array.shape[0]}; they must describe the same rows")
    d = int(array.shape[1])
    total_steps = cfg.token_budget // cfg.batch_size
    if total_steps < 1:
        raise ValueError(f"sae.token_budget ({cfg.token_budget}) is smaller than one batch ({cfg.batch_size})")
    rows = train_rows(tokens, cfg)
    stream = ActivationStream(array, rows, batch_size=cfg.batch_size, buffer_rows=cfg.buffer_rows,
                              seed=cfg.seed, prefetch=prefetch)
    log_every = log_every or max(1, min(100, total_steps // 20))
    dead_after = cfg.dead_after_tokens or max(1, min(10_000_000, cfg.token_budget // 10))
    base_lr = cfg.lr or default_lr(width)

    model = SparseCoder(d, width, cfg.k, cfg.architecture, seed=cfg.seed, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=base_lr, fused=True)
    since_fired = torch.zeros(width, dtype=torch.long, device=device)
    fingerprint = _fingerprint(cfg, width, tuple(array.shape), tokens.height, data_version)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else None
    log: list[dict[str, float]] = []
    acc_names = ("loss", "fvu", "auxk", "l0")
    acc = torch.zeros(len(acc_names), dtype=torch.float64, device=device)  # window sums, no per-step sync
    acc_n = 0
    start = 0
    state: dict[str, Any] | None = None
    if ckpt_dir is not None and (path := _latest(ckpt_dir)) is not None:
        probe = json.loads((path / "state.json").read_text())
        if probe.get("fingerprint") == fingerprint:
            since_fired, state = _load_checkpoint(path, model, opt, device)
        else:
            warnings.warn(f"ignoring checkpoint {path}: written for another config/width/data", stacklevel=2)
    if state is not None:
        start, scale = state["step"], state["scale"]
        model.threshold = state["threshold"]
        log, acc_n = state["log"], state["acc_n"]
        acc = torch.tensor(state["acc"], dtype=torch.float64, device=device)
    else:
        sample = torch.from_numpy(sample_rows(array, rows, cfg.init_sample_tokens, cfg.seed))
        scale = math.sqrt(d / float(sample.pow(2).sum(1).mean().clamp_min(1e-12)))
        sample = sample * scale
        b0 = geometric_median(sample) if cfg.b_dec_init == "geometric_median" else sample.mean(0)
        with torch.no_grad():
            model.b_dec.copy_(b0.to(device))

    cuda = str(device).startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    end = total_steps if max_steps is None else min(total_steps, start + max_steps)
    pbar = tqdm(total=total_steps, initial=start, disable=not progress, desc=f"SAE w={width}", unit="step")
    lines = ProgressReport(report, f"SAE width {width}: step", total_steps, start) if report else None
    model.train()
    batches = stream.batches(start)

    def checkpoint(step: int) -> None:
        if ckpt_dir is not None:
            _save_checkpoint(ckpt_dir, step, model, opt, since_fired, {
                "step": step, "scale": scale, "threshold": model.threshold, "log": log,
                "acc": acc.tolist(), "acc_n": acc_n,
                "fingerprint": fingerprint, "version": CHECKPOINT_VERSION})

    try:
        for step in range(start, end):
            x = next(batches).to(device, non_blocking=True) * scale
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total_steps, base_lr, cfg.lr_warmup_fraction, cfg.lr_schedule)
            dead = since_fired > dead_after if cfg.auxk_coef > 0 else None
            with autocast:
                out = model(x, dead_mask=dead, auxk_k=cfg.auxk_k)
            loss = out.fvu + cfg.auxk_coef * out.auxk_loss
            loss.backward()
            model.remove_parallel_grad()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.normalize_decoder()
            with torch.no_grad():
                fired = torch.zeros(width, dtype=torch.bool, device=device)
                fired[out.latent_indices[out.latent_acts > 0]] = True
                since_fired += x.shape[0]
                since_fired[fired] = 0
                l0 = (out.latent_acts > 0).sum() / x.shape[0]
                acc += torch.stack([loss.detach(), out.fvu.detach(), out.auxk_loss.detach(), l0]).double()
                acc_n += 1
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                means = (acc / max(acc_n, 1)).tolist()
                row = {"step": done, "tokens": done * cfg.batch_size, "lr": opt.param_groups[0]["lr"],
                       **dict(zip(acc_names, means)),
                       "dead_fraction": float((since_fired > dead_after).float().mean())}
                log.append(row)
                pbar.set_postfix(fvu=f"{row['fvu']:.3f}", dead=f"{row['dead_fraction']:.2f}")
                acc.zero_()
                acc_n = 0
            pbar.update()
            if lines is not None:
                lines.update(done, lambda: f"fvu {log[-1]['fvu']:.4f}, dead {log[-1]['dead_fraction']:.2f}" if log else "")
            if done % cfg.checkpoint_every == 0 or done == end:
                checkpoint(done)
    finally:
        pbar.close()
        batches.close()

    schema = {k: pl.Float64 for k in ("lr", "loss", "fvu", "auxk", "l0", "dead_fraction")}
    log_df = pl.DataFrame(log, schema={"step": pl.Int64, "tokens": pl.Int64, **schema})
    trained = model.fold_input_scale(scale).eval()
    return TrainResult(model=trained, log=log_df, scale=scale, n_steps=end, n_tokens=end * cfg.batch_size,
                       resumed_from_step=start, n_train_rows=len(rows))
