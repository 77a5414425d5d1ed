"""Our SAE trainer vs EleutherAI sparsify's, side by side, on the same activations.

    .venv/bin/python benchmarks/bench_sae.py                 # planted d=512 set, prints markdown
    .venv/bin/python benchmarks/bench_sae.py --write         # also (re)writes "## SAE training" in RESULTS.md
    .venv/bin/python benchmarks/bench_sae.py --profile       # where our trainer's time goes
    .venv/bin/python benchmarks/bench_sae.py --sets embedded # one set only (prints; --write needs both)
    .venv/bin/python benchmarks/bench_sae.py --sets embedded --profile   # the embedded set's profile
    .venv/bin/python benchmarks/bench_sae.py --device cuda --rows 1000000 --budget 4000000   # GPU variant

Same rows (our train split), same width, k, batch (tokens/step), token budget, AuxK weight, dead
window, warm-up share and Adam lr; FVU is measured by one function (msae.sae.evaluate) on the same
held-out samples. sparsify's ``Trainer`` needs a model to hook: a frozen ``nn.Embedding`` holding
the activations, fed shuffled row ids, stands in — it gets its data from RAM while ours streams
from the zarr array on disk. sparsify is run with Adam (like ours) and with its default
(schedule-free signSGD).

SAELens (``sae-lens``) pulls 94 packages (transformer-lens, transformers, wandb, plotly, …), so it
lives in its own venv and runs as a subprocess: ``--saelens-python PATH`` (default
``/tmp/saelens-venv/bin/python`` when it exists; ``--saelens-python ''`` skips it). The rows are
saved to .npy and ``benchmarks/saelens_runner.py`` trains a ``TopKTrainingSAE`` with SAELens's own
``SAETrainer.fit()`` on an in-memory batch iterator (same rows, width, k, lr, schedule, batch, budget,
AuxK weight, dead window, thread count); the SAE it saves is evaluated here by the same function.
Set that venv up with::

    python3 -m venv /tmp/saelens-venv && /tmp/saelens-venv/bin/pip install torch==2.13.0 && \
        /tmp/saelens-venv/bin/pip install sae-lens
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msae.config import SAEConfig  # noqa: E402
from msae.runtime import THREADS_HELP, bench_threads, threads_option  # noqa: E402
from msae.sae.evaluate import evaluate_sae, heldout_rows  # noqa: E402
from msae.sae.formats import load_sae  # noqa: E402
from msae.sae.model import SparseCoder  # noqa: E402
from msae.sae.planted import feature_recovery, make_planted, write_zarr  # noqa: E402
from msae.sae.train import default_lr, train_rows, train_sae  # noqa: E402
from results_file import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


DEVICE = "cpu"  # set from --device in main()
THREADS = 1  # set from --threads in main(); passed on to the SAELens subprocess
DEFAULT_SAELENS_PYTHON = "/tmp/saelens-venv/bin/python"
SAELENS_RUNNER = Path(__file__).resolve().parent / "saelens_runner.py"


def _sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(arr, tokens, cfg, width):
    t = time.perf_counter()
    res = train_sae(arr, tokens, cfg, width, device=DEVICE, progress=False)
    _sync()
    return res.model, time.perf_counter() - t, res


def run_sparsify(arr, tokens, cfg, width, optimizer: str, seq_len: int = 256):
    """sparsify.Trainer on the same rows, via a frozen embedding that returns row ``i`` for id ``i``."""
    from sparsify import SaeConfig, TrainConfig, Trainer
    from transformers import PretrainedConfig, PreTrainedModel

    rows = train_rows(tokens, cfg)
    table = torch.from_numpy(np.asarray(arr[:]).astype(np.float32))  # sparsify gets RAM, not zarr

    class LookupConfig(PretrainedConfig):
        model_type = "msae_row_lookup"

    class RowLookup(PreTrainedModel):
        config_class = LookupConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding.from_pretrained(table, freeze=True)

        def forward(self, input_ids, **_):
            return self.embed(input_ids)

    model = RowLookup(LookupConfig()).to(DEVICE)
    seqs_per_step = cfg.batch_size // seq_len
    steps = cfg.token_budget // cfg.batch_size
    order = []
    for epoch in range(int(np.ceil(steps * cfg.batch_size / (len(rows) // seq_len * seq_len))) + 1):
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(rows)
        order.append(perm[: len(perm) // seq_len * seq_len])
    ids = torch.from_numpy(np.concatenate(order)).view(-1, seq_len)[: steps * seqs_per_step]
    dataset = [{"input_ids": row} for row in ids]
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(
            SaeConfig(num_latents=width, k=cfg.k), batch_size=seqs_per_step, optimizer=optimizer,
            lr=cfg.lr, lr_warmup_steps=max(1, round(cfg.lr_warmup_fraction * steps)),
            auxk_alpha=cfg.auxk_coef, dead_feature_threshold=cfg.dead_after_tokens or cfg.token_budget // 10,
            hookpoints=["embed"], save_every=10**9, log_to_wandb=False, save_dir=tmp, run_name="bench",
            init_seeds=[cfg.seed])
        trainer = Trainer(tcfg, dataset, model)
        t = time.perf_counter()
        trainer.fit()
        _sync()
        elapsed = time.perf_counter() - t
        sae = load_sae(Path(tmp) / "bench" / "embed")
    return sae, elapsed


def saelens_inputs(arr, tokens, cfg, folder: Path) -> None:
    """What saelens_runner.py reads: all rows (float32), our train rows, the held-out rows we evaluate."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "acts.npy", np.ascontiguousarray(np.asarray(arr[:], dtype=np.float32)))
    np.save(folder / "train_rows.npy", train_rows(tokens, cfg).astype(np.int64))
    np.save(folder / "eval_rows.npy", np.sort(heldout_rows(tokens, cfg))[:cfg.eval_tokens].astype(np.int64))


def load_saelens_topk(folder: Path) -> SparseCoder:
    """A TopK SAE saved by SAELens's ``save_inference_model`` as a SparseCoder.

    SAELens v6 trains TopK SAEs with ``rescale_acts_by_decoder_norm`` (acts × ||W_dec row||, decoder
    rows divided by it) and folds the norms into the saved weights, yet keeps the flag in cfg.json;
    folding again is then a no-op, and it keeps this exact for unfolded weights too."""
    from safetensors.torch import load_file

    scfg = json.loads((folder / "cfg.json").read_text())
    if scfg.get("architecture") != "topk" or scfg.get("normalize_activations") not in (None, "none") \
            or not scfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{folder}: unexpected SAELens config {scfg}")
    st = {n: t.float() for n, t in load_file(str(folder / "sae_weights.safetensors")).items()}
    w_enc, b_enc, w_dec, b_dec = st["W_enc"], st["b_enc"], st["W_dec"], st["b_dec"]
    if scfg.get("rescale_acts_by_decoder_norm"):
        norm = w_dec.norm(dim=1)
        w_enc, b_enc, w_dec = w_enc * norm[None], b_enc * norm, w_dec / norm[:, None]
    d_in, width = w_enc.shape
    sae = SparseCoder(d_in, width, int(scfg["k"]), "topk", init=False, device="meta")
    sae.load_state_dict({"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": w_dec,
                         "b_dec": b_dec}, assign=True)
    return sae.eval()


def run_saelens(python: str, data: Path, cfg, width):
    """SAELens's SAETrainer in its own venv (benchmarks/saelens_runner.py); its ``fit()`` is timed there."""
    steps = cfg.token_budget // cfg.batch_size
    dead_tokens = cfg.dead_after_tokens or max(1, min(10_000_000, cfg.token_budget // 10))
    with tempfile.TemporaryDirectory() as out:
        cmd = [python, str(SAELENS_RUNNER), "--data", str(data), "--out", out, "--width", str(width),
               "--k", str(cfg.k), "--lr", repr(cfg.lr or default_lr(width)), "--batch", str(cfg.batch_size),
               "--budget", str(cfg.token_budget),
               "--warmup-steps", str(max(1, round(cfg.lr_warmup_fraction * steps))),
               "--dead-window-steps", str(max(1, dead_tokens // cfg.batch_size)),
               "--auxk-coef", repr(cfg.auxk_coef),
               "--norm-batches", str(max(1, cfg.init_sample_tokens // cfg.batch_size)),
               "--seed", str(cfg.seed), "--threads", str(THREADS), "--device", DEVICE]
        env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(THREADS)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"saelens_runner.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        sae = load_saelens_topk(Path(out))
    return sae, info["seconds"], info


def bench(name, arr, tokens, cfg, width, truth=None, optimizers=("adam", "signum"), repeats=2,
          saelens_python: str | None = None):
    """Each trainer ``repeats`` times, interleaved (A B C A B C), keeping each one's fastest time:
    the machine is shared, so interleaving spreads background load evenly."""
    print(f"== {name}: {arr.shape[0]:,} rows × d={arr.shape[1]}, width={width}, k={cfg.k}, "
          f"budget={cfg.token_budget:,} tokens, batch={cfg.batch_size}", flush=True)
    labels = ["msae (Adam)"] + ["sparsify (Adam)" if o == "adam" else "sparsify (default: signum, its lr)"
                                for o in optimizers]
    sl_label = "sae-lens (Adam)"
    if saelens_python:
        labels.append(sl_label)
    models, times = {}, {label: [] for label in labels}
    sl_info: dict = {}
    with tempfile.TemporaryDirectory() as sl_tmp:
        if saelens_python:
            saelens_inputs(arr, tokens, cfg, Path(sl_tmp))
        for rep in range(repeats):
            sae, t, _ = run_ours(arr, tokens, cfg, width)
            models.setdefault(labels[0], sae)
            times[labels[0]].append(t)
            for label, opt in zip(labels[1:], optimizers):
                scfg = cfg if opt == "adam" else cfg.model_copy(update={"lr": None})
                sae, t = run_sparsify(arr, tokens, scfg, width, opt)
                models.setdefault(label, sae)
                times[label].append(t)
            if saelens_python:
                sae, t, info = run_saelens(saelens_python, Path(sl_tmp), cfg, width)
                models.setdefault(sl_label, sae)
                sl_info = sl_info or info
                times[sl_label].append(t)
            print(f"   repeat {rep}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    t_ours = min(times[labels[0]])
    results = [(label, models[label], min(times[label])) for label in labels]
    tokens_trained = (cfg.token_budget // cfg.batch_size) * cfg.batch_size
    lr = f"lr {cfg.lr:g}" if cfg.lr else "default lr"
    lines = [f"**{name}** — {arr.shape[0]:,} rows × d={arr.shape[1]}, width {width}, k {cfg.k}, "
             f"{tokens_trained:,} training tokens, {cfg.batch_size} tokens/step, {lr}; wall time = fastest of "
             f"{repeats} interleaved runs; FVU on held-out samples (same rows for all).", "",
             "| trainer | wall s | tokens/s | held-out FVU | FVU image | FVU text | dead | "
             + ("mean max cos | " if truth is not None else "") + "ratio | FVU ÷ msae's |",
             "|---|---|---|---|---|---|---|" + ("---|" if truth is not None else "") + "---|---|"]
    fvu_ours = None
    for label, sae, t in results:
        ev = evaluate_sae(sae.to(DEVICE), arr, tokens, cfg=cfg, device=DEVICE)
        fvu_ours = fvu_ours if fvu_ours is not None else ev.fvu
        rec = f"{feature_recovery(sae.W_dec.detach(), truth).mean_max_cos:.3f} | " if truth is not None else ""
        lines.append(f"| {label} | {t:.1f} | {tokens_trained / t:,.0f} | {ev.fvu:.4f} | {ev.fvu_image:.4f} | "
                     f"{ev.fvu_text:.4f} | {ev.dead_fraction:.3f} | {rec}{t / t_ours:.2f} | {ev.fvu / fvu_ours:.2f} |")
        if label == sl_label:
            sl_info["fvu_here"] = ev.fvu
    if sl_info:
        lines += ["", f"sae-lens {sl_info['sae_lens']} (torch {sl_info['torch']}, {sl_info['threads']} thread(s)): "
                  f"held-out FVU by its own forward {sl_info['heldout_fvu']:.4f} (the table's, via msae's "
                  f"evaluate_sae on the converted weights: {sl_info['fvu_here']:.4f}); {sl_info['steps']} steps, "
                  f"lr {sl_info['lr_first_last'][0]:.3g} → peak {sl_info['lr_peak']:.3g} → "
                  f"{sl_info['lr_first_last'][1]:.3g}, plus {sl_info['norm_estimate_tokens']:,} tokens drawn for its "
                  "norm estimate inside the timed fit()."]
    return "\n".join(lines)


def profile_ours(arr, tokens, cfg, width) -> str:
    # a 2-step run first: torch's one-time lazy imports (torch._dynamo by the first Adam, ~1 s) stay out
    train_sae(arr, tokens, cfg, width, progress=False, max_steps=2)
    prof = cProfile.Profile()
    prof.enable()
    train_sae(arr, tokens, cfg, width, progress=False)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--active", type=float, default=16)
    ap.add_argument("--lr", type=float, default=4e-3, help="Adam lr for both (0: the width-scaled default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--budget", type=int, default=307_200)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--threads", type=threads_option, default="auto", help=THREADS_HELP)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU variant for a lent device)")
    ap.add_argument("--sets", default="planted,embedded",
                    help="comma-separated sets to run: planted, embedded (--write needs both)")
    ap.add_argument("--embedded-dir", default=str(ROOT / "outputs/embedded"),
                    help="the embedded profile's output folder (activations/layer=1.zarr, tokens.parquet)")
    ap.add_argument("--saelens-python", default=None,
                    help=f"Python with sae-lens installed (default {DEFAULT_SAELENS_PYTHON} if it exists; '' skips)")
    args = ap.parse_args()
    sets = {s.strip() for s in args.sets.split(",") if s.strip()}
    if not sets or sets - {"planted", "embedded"}:
        ap.error(f"--sets {args.sets!r}: choose from planted, embedded")
    if args.write and sets != {"planted", "embedded"}:
        ap.error("--write rewrites the whole section, so it needs --sets planted,embedded")
    global DEVICE, THREADS
    args.threads = bench_threads(args.threads)
    DEVICE, THREADS = args.device, args.threads
    saelens_python = args.saelens_python
    if saelens_python is None:
        saelens_python = DEFAULT_SAELENS_PYTHON if Path(DEFAULT_SAELENS_PYTHON).exists() else ""
        if not saelens_python:
            print(f"note: {DEFAULT_SAELENS_PYTHON} not found, SAELens is skipped (see this file's docstring "
                  "to set up its venv, or pass --saelens-python)", flush=True)
    elif saelens_python and not Path(saelens_python).exists():
        ap.error(f"--saelens-python {saelens_python}: no such file")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    cfg = SAEConfig(k=args.k, token_budget=args.budget, batch_size=args.batch, seed=0, lr=args.lr or None)
    sections = []
    if "planted" in sets:
        with tempfile.TemporaryDirectory() as tmp:
            data = make_planted(args.rows, args.d, args.features, active=args.active, rows_per_sample=256,
                                noise=0.02, offset=4.0, seed=0)
            arr = write_zarr(str(Path(tmp) / "planted.zarr"), data.activations, chunk_rows=4096)
            if args.profile:
                print(profile_ours(arr, data.tokens, cfg, args.width))
                return
            sections.append(bench("planted", arr, data.tokens, cfg, args.width, data.truth, repeats=args.repeats,
                                  saelens_python=saelens_python))
    if "embedded" in sets:
        emb_dir = Path(args.embedded_dir)
        emb = emb_dir / "activations/layer=1.zarr"
        if emb.exists() and (emb_dir / "tokens.parquet").exists():
            import polars as pl
            import zarr

            earr = zarr.open_array(str(emb), mode="r")
            etok = pl.read_parquet(emb_dir / "tokens.parquet")
            # the embedded profile's SAE settings (k 8, width 512, explicit lr), the same for both trainers
            ecfg = SAEConfig(k=8, token_budget=args.budget, batch_size=args.batch, seed=0, lr=args.lr or None)
            if args.profile:
                print(profile_ours(earr, etok, ecfg, 512))
                return
            sections.append(bench("embedded layer 1", earr, etok, ecfg, 512, repeats=args.repeats,
                                  saelens_python=saelens_python))
        else:
            shown = emb.relative_to(ROOT) if emb.is_relative_to(ROOT) else emb
            sections.append(f"(embedded default activations absent: `{shown}` not extracted yet, so the embedded "
                            "set is not measured.)")
    total = time.perf_counter() - t0
    threads = (f" --threads {args.threads}" if args.threads != 1 else "") + (
        f" --device {args.device}" if args.device != "cpu" else "")
    header = (f"## SAE training\n\n`.venv/bin/python benchmarks/bench_sae.py{threads} --write` — {dt.date.today()}, "
              f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs, torch {torch.__version__}, "
              f"{args.threads} thread(s) (torch.set_num_threads), device {args.device}, whole run {total:.0f} s. The Adam rows: "
              f"{cfg.lr_warmup_fraction:.0%} warm-up then linear decay to 0, AuxK 1/32, same rows in the same "
              "shuffled-stream spirit (ours from zarr, sparsify's and SAELens's from RAM); sparsify's default optimizer "
              "(schedule-free signSGD at its own width-scaled lr) as a third row"
              + (" and SAELens's own `SAETrainer` (a separate venv, `benchmarks/saelens_runner.py`, same thread "
                 "count) as a fourth" if saelens_python else "; SAELens skipped (no `--saelens-python`)")
              + ". ratio = msae tokens/s ÷ that trainer's tokens/s (> 1: msae faster); FVU ÷ msae's: that "
              "trainer's held-out FVU ÷ msae's (> 1: msae reconstructs better).\n")
    text = header + "\n" + "\n\n".join(sections) + "\n\n" + NOTES
    print(text)
    if args.write:
        write_section(text)


NOTES = """Where the time goes (`--profile`, 100 steps at width 4096, d 512, k 32, 1 thread, 2026-11-29): the
encoder's dense forward matmul ([1024 × 512] · [512 × 4096]) is ~45 % of msae's step, top-k ~12 %,
autograd + the sparse backward ~11 %, zarr reads in the prefetch thread hardly show. The difference
to sparsify is the encoder's weight gradient: sparsify materialises the [batch·k, d] products and
`index_add`s them (≈33 ms a step here), msae does one sparse [width × batch] · [batch × d] matmul
(≈2.5 ms); fused Adam saves a little more. Learning rate: both Adam runs get lr 4e-3 — the
width-scaled default (2e-4/sqrt(width/16384) = 4e-4 at width 4096, tuned for runs of millions of
tokens) leaves FVU at ≈0.61 after 200k tokens on this set, vs ≈0.10 at 4e-3. msae's AuxK also
trains the encoder (sparsify's fused encoder passes no AuxK gradient to it), which is the likely
reason for its lower dead fraction.

SAELens (sae-lens 6.54.12, its own venv: it brings 94 packages — transformer-lens, transformers 5,
wandb, plotly, statsmodels, … — so it stays out of msae's) is driven by `benchmarks/saelens_runner.py`:
a `TopKTrainingSAE` (its defaults: `rescale_acts_by_decoder_norm`, decoder rows initialised at norm
0.1, W_enc = W_decᵀ, b_dec = 0) trained by SAELens's own `SAETrainer.fit()` — Adam, its
`get_lr_scheduler` set to the same warm-up + linear decay to 0, grad-norm clipping at 1, its
dead-latent counter (30 steps = msae's token_budget/10 tokens) and AuxK (k_aux = d/2, weight 1/32
like msae and sparsify; SAELens's own default is 1.0), `normalize_activations =
"expected_average_only_in"` estimated on 16 batches (msae's 16,384-token sample) and folded in at the
end — fed by an in-memory iterator of shuffled row batches in place of its `ActivationsStore` over a
HookedTransformer (its trainer accepts any `Iterator[Tensor]`). Only `fit()` is timed (imports,
loading the .npy and building the SAE are not). The SAE it saves (`save_inference_model`, decoder
norms folded) is converted to a SparseCoder and evaluated like the others; the runner's own FVU
(SAELens forward, float64 sums) matches `evaluate_sae` to 4 decimals. Speed: SAELens's TopK keeps a
dense [batch × width] activation matrix, decodes with a dense matmul and backpropagates densely
through the encoder, so at width 4096 each step costs ~5× msae's; at width 512 the gap is small.
Quality on the planted set: SAELens v6's trainer has no b_dec initialisation (b_dec starts at 0,
msae starts it at the geometric median), and this set sits on a common offset of norm 4.0 (mean
row norm 5.8): most latents die in the first steps and AuxK at 1/32 does not revive them. A
100-step side run (same settings, 2026-11-29) gave FVU 0.71 / 3,904 of 4,096 latents dead on the
raw rows, 0.75 / 3,771 with AuxK weight 1.0, and 0.29 / 2 dead on the same rows mean-centred — the
offset, not the AuxK weight, is the cause. On the embedded activations, where that does not bite,
SAELens ends at a lower FVU than msae and sparsify.
"""




if __name__ == "__main__":
    main()
