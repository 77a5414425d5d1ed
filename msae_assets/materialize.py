"""Materialize the whole pipeline with the Dagster CLI: one call per partition group, in graph order.

`dagster asset materialize` needs every selected asset to share one partitions definition, so the
unpartitioned assets go first, then each per-layer stage over its full key range in one run (its
backfill policy is single-run), then the layer × width stages (`sae` and what follows it) one
`--partition "<layer>|<width>"` call per key, so that every key gets its own metadata and check
results, then the unpartitioned `report`. Used by `make demo` and `.ci/run`.

Before the first call, runs left unfinished by a killed process are failed and their pool slots
released (:mod:`msae_assets.run_health`), so a resume after kill -9 needs no manual step. The
Dagster processes started here end when this driver ends, however it ends: SIGINT/SIGTERM are
passed on to them, and their watchdog stops them if the driver is killed outright.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from msae.config import PROJECT_ROOT, MsaeConfig, load_config

MODULE = "msae_assets.definitions"
PER_SAE_STAGES = ("sae", "latent_stats", "concepts", "concept_scores", "controls")
FINAL_STAGES = ("report",)
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


def materialize_commands(cfg: MsaeConfig, stages: tuple[str, ...] | None = None) -> list[list[str]]:
    """The CLI calls, in graph order, that materialize every asset and partition.

    ``stages``: the asset names defined (default: every stage this project has)."""
    stages = stages or (*PER_SAE_STAGES, *FINAL_STAGES)
    # in-process executor: one process per call instead of one per step (each would import torch
    # and load its models again), and no two steps oversubscribing the CPU side by side
    base = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", MODULE, "--config-json", IN_PROCESS,
            "--select"]
    layer_range = f"{cfg.layers[0]}...{cfg.layers[-1]}"
    # `sae` is multi-partitioned: a CLI range run would record one materialization (one metadata
    # set) for every key of the range, so each layer|width key gets its own call.
    per_sae = ",".join(s for s in PER_SAE_STAGES if s in stages)
    final = ",".join(s for s in FINAL_STAGES if s in stages)
    return [
        [*base, "vqa_samples"],
        [*base, "activations", "--partition-range", layer_range],
        *([*base, per_sae, "--partition", f"{layer}|{width}"] for layer in cfg.layers for width in cfg.widths),
        *([[*base, final]] if final else []),
    ]


def ensure_dagster_home() -> str:
    """DAGSTER_HOME must be absolute and exist, else the CLI uses a throw-away instance."""
    home = os.environ.get("DAGSTER_HOME") or str(PROJECT_ROOT / ".dagster")
    home = str(Path(home).resolve())
    Path(home).mkdir(parents=True, exist_ok=True)
    if not (Path(home) / "dagster.yaml").exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        (Path(home) / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    os.environ["DAGSTER_HOME"] = home
    return home


def reap_instance() -> None:
    """Fail the runs of this instance that a killed process left STARTED (they hold pool slots)."""
    import dagster as dg

    from msae_assets.run_health import format_reaped, reap_dead_runs

    with dg.DagsterInstance.get() as instance:
        for line in format_reaped(reap_dead_runs(instance)):
            print(line, flush=True)


def run_child(cmd: list[str]) -> int:
    """Run one Dagster CLI call that ends with this driver: it gets our pid (its watchdog stops it
    if we are killed) and the SIGINT/SIGTERM we receive; returns its exit status."""
    from msae_assets.run_health import DRIVER_PID_ENV

    child = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, DRIVER_PID_ENV: str(os.getpid())})

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:  # we are leaving for another reason (an exception): do not orphan it
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    cfg = load_config()
    home = ensure_dagster_home()
    from msae_assets.definitions import build_definitions

    defined = tuple(a.key.to_user_string() for a in build_definitions(cfg).assets)
    if not args.dry_run:
        reap_instance()
    for cmd in materialize_commands(cfg, defined):
        print("+", " ".join(cmd[1:]).replace(IN_PROCESS, f"'{IN_PROCESS}'"), flush=True)
        if not args.dry_run:
            rc = run_child(cmd)
            if rc != 0:
                print(f"materialize failed (exit {rc}) at: {' '.join(cmd[3:])}", file=sys.stderr)
                return rc
    if args.dry_run:
        return 0
    print(f"\nDone. Outputs under: {cfg.store}\nDagster instance (history, UI): {home}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
