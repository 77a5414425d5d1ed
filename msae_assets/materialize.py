"""Materialize the whole pipeline with the Dagster CLI: one call per partition group, in graph order.

`dagster asset materialize` needs every selected asset to share one partitions definition, so the
unpartitioned assets go first, then each per-layer stage over its full key range in one run (its
backfill policy is single-run), then the layer × width stages (`sae` and what follows it) one
`--partition "<layer>|<width>"` call per key, so that every key gets its own metadata and check
results, then the unpartitioned `report`. Used by `make demo` and `.ci/run`.

Before each call the driver asks which of its stages have anything to do
(:mod:`msae_assets.uptodate`: the stage's manifest and this instance's latest materialization);
a call with nothing to do is skipped and a call with some is narrowed to those stages and what
follows them, so a no-op re-run starts no Dagster process. ``--all`` makes every call as it is.

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
import time
from pathlib import Path
from typing import TYPE_CHECKING

from msae.config import PROJECT_ROOT, MsaeConfig, load_config

if TYPE_CHECKING:
    from msae_assets.uptodate import CallPlan

MODULE = "msae_assets.definitions"
PER_SAE_STAGES = ("sae", "latent_stats", "concepts", "concept_scores", "controls")
FINAL_STAGES = ("report",)
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'
QUIET = '{"execution": {"config": {"in_process": {}}}, "loggers": {"console": {"config": {"log_level": "INFO"}}}}'
"""The default run config: in-process, and only INFO and above from Dagster's console logger (its
DEBUG events — a line per step event — go to the instance's event log, which the UI shows)."""


def materialize_commands(cfg: MsaeConfig, stages: tuple[str, ...] | None = None,
                         run_config: str = QUIET) -> list[list[str]]:
    """The CLI calls, in graph order, that materialize every asset and partition.

    ``stages``: the asset names defined (default: every stage this project has); ``run_config``:
    the ``--config-json`` of every call (in-process; :data:`QUIET` or :data:`IN_PROCESS`)."""
    stages = stages or (*PER_SAE_STAGES, *FINAL_STAGES)
    # in-process executor: one process per call instead of one per step (each would import torch
    # and load its models again), and no two steps oversubscribing the CPU side by side
    base = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", MODULE, "--config-json", run_config,
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


def run_child(cmd: list[str], log_path: Path | None = None) -> int:
    """Run one Dagster CLI call that ends with this driver: it gets our pid (its watchdog stops it
    if we are killed) and the SIGINT/SIGTERM we receive; returns its exit status. ``log_path``:
    where its output goes (default: our own stdout/stderr)."""
    from msae_assets.run_health import DRIVER_PID_ENV

    log = open(log_path, "w") if log_path is not None else None  # noqa: SIM115 - closed below
    child = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env={**os.environ, DRIVER_PID_ENV: str(os.getpid())},
                             stdout=log, stderr=subprocess.STDOUT if log is not None else None)

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
        if log is not None:
            log.close()


def call_label(cmd: list[str]) -> str:
    """What one CLI call materializes, for the progress line: "1|512 sae,latent_stats,…"."""
    selected = cmd[cmd.index("--select") + 1]
    for flag in ("--partition", "--partition-range"):
        if flag in cmd:
            return f"{cmd[cmd.index(flag) + 1]} {selected}"
    return selected


def call_targets(cmd: list[str], cfg: MsaeConfig) -> tuple[list[str], list[str | None]]:
    """(the stages a call selects, in order; the Dagster partition keys it covers: None when
    unpartitioned, every layer for the per-layer range)."""
    stages = cmd[cmd.index("--select") + 1].split(",")
    if "--partition" in cmd:
        return stages, [cmd[cmd.index("--partition") + 1]]
    if "--partition-range" in cmd:
        return stages, [str(layer) for layer in cfg.layers]
    return stages, [None]


def with_selection(cmd: list[str], stages: tuple[str, ...]) -> list[str]:
    """The same call selecting only ``stages``."""
    i = cmd.index("--select") + 1
    return [*cmd[:i], ",".join(stages), *cmd[i + 1:]]


def stage_outcomes(cmd: list[str]) -> str:
    """"sae computed · latent_stats reused · …" from the latest materialization of each selected
    asset (and partition) in the instance; empty where the instance has none."""
    import dagster as dg

    selected = cmd[cmd.index("--select") + 1].split(",")
    partition = cmd[cmd.index("--partition") + 1] if "--partition" in cmd else None
    parts = []
    with dg.DagsterInstance.get() as instance:
        for name in selected:
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(name),
                                      asset_partitions=[partition] if partition else None), limit=1).records
            meta = records[0].asset_materialization.metadata if records and records[0].asset_materialization else {}
            reused = meta.get("reused")
            value = getattr(reused, "value", reused)
            parts.append(f"{name} {'reused' if value is True else 'computed' if value is False else 'done'}")
    return " · ".join(parts)


class CallJudge:
    """Decides, call by call, what is left to do (:func:`msae_assets.uptodate.plan_call`)."""

    def __init__(self, cfg: MsaeConfig) -> None:
        from msae.store import Store
        from msae_assets.uptodate import stage_plans
        from msae_resources.vlm import VLMResource

        self.cfg = cfg
        self.store = Store(cfg.store)
        # a run that no sensor pinned loads the newest checkpoint: so does this judge (looked up once)
        self.plans = stage_plans(cfg, VLMResource.from_config(cfg.model, cfg.checkpoints).checkpoint)

    def plan(self, cmd: list[str]) -> CallPlan:
        import dagster as dg

        from msae_assets.uptodate import plan_call

        stages, keys = call_targets(cmd, self.cfg)
        with dg.DagsterInstance.get() as instance:  # the CLI's runs write to it between our questions
            return plan_call(self.store, instance, self.plans, stages, keys)


def outputs_summary(cfg: MsaeConfig) -> list[str]:
    """The lines a person reads first: where the report and the latent browsers are."""
    from msae.latents.evidence import latents_dir
    from msae.report.build import REPORT
    from msae.store import Store

    store = Store(cfg.store)
    lines = [f"Report: {store.url(REPORT, 'index.html')}", "Latent index files:"]
    for layer in cfg.layers:
        for width in cfg.widths:
            if store.exists(latents_dir(layer, width), "index.html"):
                lines.append(f"  {store.url(latents_dir(layer, width), 'index.html')}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--all", action="store_true",
                        help="make every call, also those whose stages are all up to date (each stage then "
                        "reuses its manifest and records a new materialization)")
    parser.add_argument("--verbose", action="store_true",
                        help="stream Dagster's output at DEBUG level (default: a line per call; each call's "
                        "INFO log goes to a file under $DAGSTER_HOME/msae_logs/)")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*is currently in beta")  # Dagster's notes on its own API
    cfg = load_config()
    home = ensure_dagster_home()
    from msae_assets.definitions import build_definitions

    defined = tuple(a.key.to_user_string() for a in build_definitions(cfg).assets)
    if not args.dry_run:
        reap_instance()
    run_config = IN_PROCESS if args.verbose else QUIET
    commands = materialize_commands(cfg, defined, run_config)
    logs = Path(home) / "msae_logs" / time.strftime("%Y%m%d-%H%M%S")
    judge = None if args.dry_run or args.all else CallJudge(cfg)
    skipped = 0
    for i, cmd in enumerate(commands, 1):
        if judge is not None:
            t0 = time.perf_counter()
            plan = judge.plan(cmd)
            if plan.skip:
                skipped += 1
                print(f"call {i} of {len(commands)}: {call_label(cmd)} … up to date, skipped "
                      f"({time.perf_counter() - t0:.1f} s)", flush=True)
                continue
            cmd = with_selection(cmd, plan.selected)
            if args.verbose:
                print("  to do:", "; ".join(f"{k}: {v}" for k, v in plan.reasons.items()), flush=True)
        label = f"call {i} of {len(commands)}: {call_label(cmd)}"
        shown = " ".join(cmd[1:]).replace(run_config, f"'{run_config}'")
        if args.dry_run or args.verbose:
            print("+", shown, flush=True)
        if args.dry_run:
            continue
        log_path = None if args.verbose else logs / f"{i:02d}.log"
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text(f"+ {shown}\n")
        t0 = time.perf_counter()
        rc = run_child(cmd, log_path)
        took = f"{time.perf_counter() - t0:.0f} s"
        if rc != 0:
            if log_path is not None:
                print("".join(log_path.read_text().splitlines(keepends=True)[-60:]), file=sys.stderr)
            print(f"{label} failed (exit {rc}) after {took}" + (f"; its log: {log_path}" if log_path else ""),
                  file=sys.stderr)
            return rc
        print(f"{label} … {stage_outcomes(cmd)} ({took})", flush=True)
    if args.dry_run:
        return 0
    if skipped == len(commands):
        print("\nEverything was up to date: no Dagster run started (--all makes every call).")
    print(f"\nDone. Outputs under: {cfg.store}\nDagster instance (history, UI): {home}"
          + ("" if args.verbose else f"\nLogs of this call: {logs}"))
    print("\n".join(outputs_summary(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
