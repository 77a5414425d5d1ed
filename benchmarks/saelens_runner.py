"""Train a SAELens TopK SAE on activation rows saved by bench_sae.py; print one JSON line.

Runs under a separate Python that has ``sae-lens`` installed (not msae's venv: sae-lens pulls
transformer-lens, transformers, wandb, … which msae does not need)::

    /tmp/saelens-venv/bin/python benchmarks/saelens_runner.py --data DIR --out DIR --width 4096 --k 32 ...

``DIR`` holds ``acts.npy`` ([rows, d] float32), ``train_rows.npy`` (row ids to train on) and
``eval_rows.npy`` (held-out row ids). Training is SAELens's own: its ``TopKTrainingSAE`` (v6 API)
and its ``SAETrainer.fit()`` — Adam, its LR scheduler, grad-norm clipping at 1, its dead-latent
counter and AuxK loss, its activation-norm estimate folded into the weights at the end — fed by an
in-memory iterator of shuffled row batches instead of an ``ActivationsStore`` over a
HookedTransformer (``SAETrainer`` takes any ``Iterator[Tensor]`` as its data provider). Only
``fit()`` is timed. The trained SAE is written with SAELens's ``save_inference_model`` (decoder
norms folded) so the caller can evaluate it with its own code; the held-out FVU printed here is
computed with SAELens's forward: sum ||x - x̂||² / sum ||x - mean(x)||² in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np  # noqa: E402
import torch  # noqa: E402


class RowBatches(Iterator[torch.Tensor]):
    """Endless batches of ``table[rows]``, each epoch in a fresh permutation (seeded per epoch),
    whole batches only — the same order scheme bench_sae.py gives sparsify."""

    def __init__(self, table: torch.Tensor, rows: np.ndarray, batch: int, seed: int, on_batch=None):
        self.table, self.rows, self.batch, self.seed = table, rows, batch, seed
        self.epoch, self.pos, self.order = -1, 0, np.empty(0, dtype=np.int64)
        self.on_batch = on_batch

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch > len(self.order):
            self.epoch += 1
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.rows)
            self.order, self.pos = perm[: len(perm) // self.batch * self.batch], 0
        idx = torch.from_numpy(self.order[self.pos:self.pos + self.batch])
        self.pos += self.batch
        if self.on_batch is not None:
            self.on_batch()
        return self.table.index_select(0, idx)


@torch.no_grad()
def heldout_fvu(sae, table: torch.Tensor, rows: np.ndarray, device: str, batch: int = 4096) -> float:
    n, sum_x, sum_sq, sum_err = 0, torch.zeros(table.shape[1], dtype=torch.float64), 0.0, 0.0
    sae.eval()
    for lo in range(0, len(rows), batch):
        x = table.index_select(0, torch.from_numpy(rows[lo:lo + batch]))
        out = sae(x.to(device)).double().cpu()
        xd = x.double()
        n += len(xd)
        sum_x += xd.sum(0)
        sum_sq += float(xd.pow(2).sum())
        sum_err += float((xd - out).pow(2).sum())
    return sum_err / (sum_sq - float(sum_x.pow(2).sum()) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="folder for the trained SAE (SAELens inference layout)")
    ap.add_argument("--width", type=int, required=True)
    ap.add_argument("--k", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--budget", type=int, required=True, help="training tokens (whole batches are trained)")
    ap.add_argument("--warmup-steps", type=int, required=True)
    ap.add_argument("--dead-window-steps", type=int, required=True)
    ap.add_argument("--auxk-coef", type=float, required=True)
    ap.add_argument("--norm-batches", type=int, default=16, help="batches for SAELens's activation-norm estimate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import sae_lens
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    data = Path(args.data)
    table = torch.from_numpy(np.load(data / "acts.npy"))
    train_rows = np.load(data / "train_rows.npy")
    eval_rows = np.load(data / "eval_rows.npy")
    d_in = int(table.shape[1])
    steps = args.budget // args.batch

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(
        d_in=d_in, d_sae=args.width, k=args.k, aux_loss_coefficient=args.auxk_coef, dtype="float32",
        device=args.device, apply_b_dec_to_input=True, normalize_activations="expected_average_only_in",
    ))  # SAELens defaults otherwise: rescale_acts_by_decoder_norm=True, decoder_init_norm=0.1, b_dec = 0
    tcfg = SAETrainerConfig(
        total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr,
        lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=args.warmup_steps,
        lr_decay_steps=steps - args.warmup_steps,  # linear decay to 0 after the warm-up, as msae/sparsify
        adam_beta1=0.9, adam_beta2=0.999, device=args.device, autocast=False,
        dead_feature_window=args.dead_window_steps, feature_sampling_window=max(2000, steps + 1),
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False,
        logger=LoggingConfig(log_to_wandb=False), n_batches_for_norm_estimate=args.norm_batches,
    )
    lrs: list[float] = []
    trainer: SAETrainer | None = None

    def record_lr() -> None:  # called as each batch is drawn; norm-estimate batches come before training
        if trainer is not None and len(lrs) < steps + args.norm_batches:
            lrs.append(trainer.optimizer.param_groups[0]["lr"])

    batches = RowBatches(table, train_rows, args.batch, args.seed, on_batch=record_lr)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=batches)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    trained = trainer.fit()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    dead = int(trainer.dead_neurons.sum())
    fvu = heldout_fvu(trained, table, eval_rows, args.device)
    trained.save_inference_model(args.out)
    lr_train = lrs[args.norm_batches:]
    print(json.dumps({
        "sae_lens": sae_lens.__version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": elapsed, "steps": trainer.n_training_steps, "tokens": trainer.n_training_samples,
        "norm_estimate_tokens": args.norm_batches * args.batch, "heldout_fvu": fvu,
        "train_dead_latents": dead, "lr_first_last": [lr_train[0], lr_train[-1]] if lr_train else None,
        "lr_peak": max(lr_train) if lr_train else None, "out": str(args.out),
    }))


if __name__ == "__main__":
    main()
