"""CPU threads per process: one SAE training step's throughput alone and with two processes side by side,
at torch's default thread count and at msae's setting (:mod:`msae.runtime`).

The workload is the `sae` stage's inner step on a synthetic batch: a TopK ``SparseCoder`` forward
(with AuxK on a quarter of the latents marked dead), backward, decoder-gradient projection, Adam
step, decoder renormalisation — the loop of :func:`msae.sae.train.train_sae` without the data stream.
Each case runs in fresh processes (so "default" really is torch's own default, without
OMP_NUM_THREADS/MKL_NUM_THREADS): (a) one process, default threads; (b) one process, the setting;
(c) two processes at once, default threads; (d) two at once, the setting (``auto`` sees
``MSAE_STEP_CONCURRENCY=2``, as a driver running two steps side by side would set). Side-by-side
processes start their timed window together and run for the same wall time, so they compete for the
whole window; each reports completed steps / seconds.

    .venv/bin/python benchmarks/bench_threads.py [--threads auto|N] [--window 12] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msae.runtime import CONCURRENCY_ENV, THREAD_ENV_VARS, THREADS_HELP, available_cores, threads_option  # noqa: E402

SECTION = "## CPU threads per process"


# --- one process -----------------------------------------------------------------------------------
def child(args: argparse.Namespace) -> None:
    """Build the SAE, warm up, say ready, wait for "go" on stdin, then step for ``window`` seconds."""
    import torch

    from msae.config import RuntimeConfig
    from msae.runtime import apply_threads
    from msae.sae.model import SparseCoder

    if args.child == "set":
        apply_threads(RuntimeConfig(threads=args.threads))
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, args.d, generator=gen)
    model = SparseCoder(args.d, args.width, args.k, "topk", seed=args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dead = torch.zeros(args.width, dtype=torch.bool)
    dead[: args.width // 4] = True

    def step() -> None:
        out = model(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        model.remove_parallel_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.normalize_decoder()

    for _ in range(args.warmup):
        step()
    info = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
    print(json.dumps({"ready": True, **info}), flush=True)
    sys.stdin.readline()  # the parent's "go": side-by-side processes start together
    t0 = time.perf_counter()
    steps, last = 0, t0
    while last - t0 < args.window:
        step()
        steps, last = steps + 1, time.perf_counter()
    print(json.dumps({"steps": steps, "seconds": last - t0, **info}), flush=True)


# --- the cases --------------------------------------------------------------------------------------
def run_case(args: argparse.Namespace, mode: str, n_procs: int) -> list[dict]:
    """``n_procs`` fresh processes in ``mode`` (default / set), timed over the same window."""
    env = {k: v for k, v in os.environ.items() if k not in (*THREAD_ENV_VARS, CONCURRENCY_ENV)}
    if mode == "set" and n_procs > 1:
        env[CONCURRENCY_ENV] = str(n_procs)
    cmd = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads), "--window", str(args.window),
           "--d", str(args.d), "--width", str(args.width), "--k", str(args.k), "--batch", str(args.batch),
           "--warmup", str(args.warmup), "--seed", str(args.seed)]
    with tempfile.TemporaryFile("w+") as err:
        procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                 for _ in range(n_procs)]
        try:
            for p in procs:
                line = p.stdout.readline()
                if not line:
                    err.seek(0)
                    raise RuntimeError(f"{mode} x{n_procs}: a process ended before it was ready:\n{err.read()[-3000:]}")
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            results = [json.loads(p.communicate(timeout=args.window * 20 + 120)[0].strip().splitlines()[-1])
                       for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return results


def ms_per_step(results: list[dict]) -> float:
    """Mean over the processes of their milliseconds per step."""
    return sum(1000 * r["seconds"] / r["steps"] for r in results) / len(results)


def steps_per_s(results: list[dict]) -> float:
    """The machine's throughput: all processes' steps per second together."""
    return sum(r["steps"] / r["seconds"] for r in results)


def section_text(args: argparse.Namespace, cases: dict[str, list[dict]], load: tuple[float, float],
                 total: float) -> str:
    import torch

    labels = {"a": "(a) alone, torch default", "b": "(b) alone, msae setting",
              "c": "(c) 2 side by side, torch default", "d": "(d) 2 side by side, msae setting"}
    rows = ["| case | threads / process | ms per step (mean of processes) | steps/s, all processes |",
            "|---|---|---|---|"]
    for key, label in labels.items():
        r = cases[key]
        rows.append(f"| {label} | {r[0]['threads']} | {ms_per_step(r):.1f} | {steps_per_s(r):.1f} |")
    a, b, c, d = (ms_per_step(cases[k]) for k in "abcd")
    ratios = (f"c/a = {c / a:.2f} (default threads: slowdown of a step when two run side by side), "
              f"d/b = {d / b:.2f} (the same with msae's setting), c/d = {c / d:.2f} (side by side: time per step "
              f"at the default ÷ at the setting), b/a = {b / a:.2f} (alone: the setting's cost, 1 = none).")
    if cases["a"][0]["threads"] == cases["b"][0]["threads"]:
        ratios += (f" Alone, the setting and torch's default are the same {cases['a'][0]['threads']} thread(s) here, "
                   "so (a) and (b) ran the same thing: their difference is the shared machine's noise, a measure "
                   "of how far single figures in this section can be trusted.")
    cmd = ".venv/bin/python benchmarks/bench_threads.py --write" + (
        f" --threads {args.threads}" if args.threads != "auto" else "") + (
        f" --window {args.window:g}" if args.window != 12 else "")
    return f"""{SECTION}

`{cmd}` — {dt.date.today()}, {platform.machine()}, {available_cores()} cores available to the process ({os.cpu_count()} on the machine), torch {torch.__version__}, whole run {total:.0f} s. **The machine is shared and was busy** (load average {load[0]:.1f} before, {load[1]:.1f} after the run): absolute times move from run to run; the ratios compare cases measured in the same run, and within (c) and (d) the two processes ran over the same window, side by side.

Workload: the `sae` stage's training step on a synthetic batch — TopK `SparseCoder` d {args.d}, width {args.width}, k {args.k}, batch {args.batch} rows, AuxK on a quarter of the latents, backward, decoder-gradient projection, Adam, decoder renormalisation — repeated for a {args.window:g} s window after {args.warmup} warm-up steps, in fresh processes without OMP_NUM_THREADS/MKL_NUM_THREADS. "torch default" = the thread count torch picks itself; "msae setting" = `--threads {args.threads}` through `msae.runtime.apply_threads` (auto: the cores available ÷ the steps at once, here `{CONCURRENCY_ENV}=2` in (d), as a driver running two steps side by side sets it).

{chr(10).join(rows)}

{ratios}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=threads_option, default="auto", help=f"the setting of (b) and (d): {THREADS_HELP}")
    ap.add_argument("--window", type=float, default=12.0, help="seconds each case is timed for")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help=f"replace/append '{SECTION}' in benchmarks/RESULTS.md")
    ap.add_argument("--child", choices=["default", "set"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    cases: dict[str, list[dict]] = {}
    for key, mode, n in (("a", "default", 1), ("b", "set", 1), ("c", "default", 2), ("d", "set", 2)):
        cases[key] = run_case(args, mode, n)
        print(f"({key}) {mode:7s} x{n}: {cases[key][0]['threads']} thread(s)/process, "
              f"{ms_per_step(cases[key]):.1f} ms/step, {steps_per_s(cases[key]):.1f} steps/s in all", flush=True)
    text = section_text(args, cases, (load_before, os.getloadavg()[0]), time.perf_counter() - t_start)
    print()
    print(text)
    if args.write:
        from results_file import write_section

        write_section(text)
        print("(written to benchmarks/RESULTS.md)")


if __name__ == "__main__":
    main()
