"""Materialize the whole pipeline in Dagster: one call per partition group, in graph order.

Every selected asset of one Dagster run must share one partitions definition, so the unpartitioned
assets go first, then each per-layer stage over its full key range in one run (its backfill policy
is single-run), then the layer × width stages (`sae` and what follows it) one `layer|width` call
per key, so that every key gets its own metadata and check results, then the unpartitioned
`report`. Used by `make demo` and `.ci/run`.

Each call is one Dagster run on the project's instance. By default it runs in this process through
the public ``dagster.materialize`` (same assets, resources, tags and partition range as the CLI,
without paying a Python start-up and a definitions load per call); ``--cli`` runs each call as a
``dagster asset materialize`` child process instead, which `.ci/run` uses so that CI exercises the
command users type.

Before each call the driver asks which of its stages have anything to do
(:mod:`msae_assets.uptodate`: the stage's manifest and this instance's latest materialization);
a call with nothing to do is skipped and a call with some is narrowed to those stages and what
follows them, so a no-op re-run starts no Dagster run. ``--all`` makes every call as it is.

Before the first call, runs left unfinished by a killed process are failed and their pool slots
released (:mod:`msae_assets.run_health`), so a resume after kill -9 needs no manual step. SIGTERM
ends an in-process run as an interrupt (Dagster marks it failed); with ``--cli`` SIGINT/SIGTERM are
passed on to the child, and its watchdog stops it if the driver is killed outright.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from msae.config import PROJECT_ROOT, MsaeConfig, load_config

if TYPE_CHECKING:
    import dagster as dg

    from msae_assets.uptodate import CallPlan

MODULE = "msae_assets.definitions"
PER_SAE_STAGES = ("sae", "latent_stats", "concepts", "concept_scores", "controls")
FINAL_STAGES = ("report",)
INFO_LOGGING: dict = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
"""Only INFO and above from Dagster's console logger (its DEBUG events — a line per step event — go
to the instance's event log, which the UI shows); the run config of the quiet in-process calls."""
IN_PROCESS = json.dumps({"execution": {"config": {"in_process": {}}}})
QUIET = json.dumps({**json.loads(IN_PROCESS), **INFO_LOGGING})
"""The CLI calls' run config: the in-process executor and :data:`INFO_LOGGING`."""
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
"""The run tags that make one run cover a partition range (what ``--partition-range`` sets; the
documented way to launch a single-run backfill from code)."""


@dataclass(frozen=True)
class Call:
    """One materialization the driver makes: stages sharing one partitions definition, and the
    partition (or per-layer range) they run for."""

    stages: tuple[str, ...]
    partition: str | None = None
    partition_range: tuple[str, str] | None = None

    @property
    def label(self) -> str:
        """What the call materializes, for the progress line: "1|512 sae,latent_stats,…"."""
        where = self.partition or ("...".join(self.partition_range) if self.partition_range else None)
        return f"{where} {','.join(self.stages)}" if where else ",".join(self.stages)

    def keys(self, cfg: MsaeConfig) -> list[str | None]:
        """The Dagster partition keys it covers: None when unpartitioned, every layer for the range."""
        if self.partition is not None:
            return [self.partition]
        if self.partition_range is not None:
            return [str(layer) for layer in cfg.layers]
        return [None]

    def narrowed(self, stages: tuple[str, ...]) -> Call:
        """The same call selecting only ``stages``."""
        return replace(self, stages=tuple(stages))

    def tags(self) -> dict[str, str]:
        return {RANGE_START_TAG: self.partition_range[0], RANGE_END_TAG: self.partition_range[1]} \
            if self.partition_range else {}

    def cli_command(self, run_config: str = QUIET) -> list[str]:
        """The ``dagster asset materialize`` command making this call."""
        cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-m", MODULE, "--config-json", run_config,
               "--select", ",".join(self.stages)]
        if self.partition is not None:
            cmd += ["--partition", self.partition]
        if self.partition_range is not None:
            cmd += ["--partition-range", "...".join(self.partition_range)]
        return cmd


def materialize_calls(cfg: MsaeConfig, stages: tuple[str, ...] | None = None) -> list[Call]:
    """The calls, in graph order, that materialize every asset and partition.

    ``stages``: the asset names defined (default: every stage this project has)."""
    stages = stages or (*PER_SAE_STAGES, *FINAL_STAGES)
    # `sae` is multi-partitioned: a range run would record one materialization (one metadata set)
    # for every key of the range, so each layer|width key gets its own call.
    per_sae = tuple(s for s in PER_SAE_STAGES if s in stages)
    final = tuple(s for s in FINAL_STAGES if s in stages)
    return [
        Call(("vqa_samples",)),
        Call(("activations",), partition_range=(str(cfg.layers[0]), str(cfg.layers[-1]))),
        *(Call(per_sae, partition=f"{layer}|{width}") for layer in cfg.layers for width in cfg.widths),
        *([Call(final)] if final else []),
    ]


def materialize_commands(cfg: MsaeConfig, stages: tuple[str, ...] | None = None,
                         run_config: str = QUIET) -> list[list[str]]:
    """The CLI calls, in graph order, that materialize every asset and partition (``--cli``).

    ``run_config``: the ``--config-json`` of every call (in-process executor — one process per call
    instead of one per step, each importing torch and loading its models again, and no two steps
    oversubscribing the CPU side by side; :data:`QUIET` or :data:`IN_PROCESS`)."""
    return [call.cli_command(run_config) for call in materialize_calls(cfg, stages)]


def ensure_dagster_home() -> str:
    """DAGSTER_HOME must be absolute and exist, else the CLI uses a throw-away instance."""
    home = os.environ.get("DAGSTER_HOME") or str(PROJECT_ROOT / ".dagster")
    home = str(Path(home).resolve())
    Path(home).mkdir(parents=True, exist_ok=True)
    if not (Path(home) / "dagster.yaml").exists() and (PROJECT_ROOT / "dagster.yaml").exists():
        (Path(home) / "dagster.yaml").write_text((PROJECT_ROOT / "dagster.yaml").read_text())
    os.environ["DAGSTER_HOME"] = home
    return home


def reap_instance(instance: dg.DagsterInstance) -> None:
    """Fail the runs of this instance that a killed process left STARTED (they hold pool slots)."""
    from msae_assets.run_health import format_reaped, reap_dead_runs

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


def stage_outcomes(call: Call, instance: dg.DagsterInstance) -> str:
    """"sae computed · latent_stats reused · …" from the latest materialization of each selected
    asset (and partition) in the instance; empty where the instance has none."""
    import dagster as dg

    parts = []
    for name in call.stages:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(name),
                                  asset_partitions=[call.partition] if call.partition else None), limit=1).records
        meta = records[0].asset_materialization.metadata if records and records[0].asset_materialization else {}
        reused = meta.get("reused")
        value = getattr(reused, "value", reused)
        parts.append(f"{name} {'reused' if value is True else 'computed' if value is False else 'done'}")
    return " · ".join(parts)


def run_in_process(call: Call, defs: dg.Definitions, instance: dg.DagsterInstance, log_path: Path | None,
                   verbose: bool) -> bool:
    """Make one call in this process (``dagster.materialize`` on the project's definitions, into the
    instance of DAGSTER_HOME): no process start, no second import of torch or the models' code.
    Output goes to ``log_path`` (default: ours). Returns whether the run succeeded; SIGTERM ends
    it as Ctrl-C does, so Dagster records it failed and frees its pool slots."""
    import dagster as dg

    run_config = {} if verbose else INFO_LOGGING

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with ExitStack() as stack:
            if log_path is not None:
                log = stack.enter_context(open(log_path, "a"))
                stack.enter_context(redirect_stdout(log))
                stack.enter_context(redirect_stderr(log))
            result = dg.materialize(list(defs.assets or ()), run_config=run_config, instance=instance,
                                    resources=dict(defs.resources or {}), partition_key=call.partition,
                                    raise_on_error=False, tags=call.tags(), selection=list(call.stages))
            return result.success
    finally:
        signal.signal(signal.SIGTERM, previous)


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

    def plan(self, call: Call, instance: dg.DagsterInstance) -> CallPlan:
        from msae_assets.uptodate import plan_call

        return plan_call(self.store, instance, self.plans, list(call.stages), call.keys(self.cfg))


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


def shown_command(call: Call, run_config: str, cli: bool) -> str:
    """The call as a person reads it: its CLI command, or the in-process run and its tags."""
    if cli:
        return " ".join(call.cli_command(run_config)[1:]).replace(run_config, f"'{run_config}'")
    return f"dagster.materialize {call.label}" + (f" tags {call.tags()}" if call.tags() else "")


def make_call(call: Call, label: str, defs: dg.Definitions, instance: dg.DagsterInstance, run_config: str,
              log_path: Path | None, cli: bool, verbose: bool) -> int:
    """Make one call (a CLI child with ``cli``, else in this process) and print its line; on a
    failure print the tail of its log. Returns its exit status."""
    shown = shown_command(call, run_config, cli)
    if verbose:
        print("+", shown, flush=True)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(f"+ {shown}\n")
    t0 = time.perf_counter()
    if cli:
        rc = run_child(call.cli_command(run_config), log_path)
    else:
        rc = 0 if run_in_process(call, defs, instance, log_path, verbose) else 1
    took = f"{time.perf_counter() - t0:.0f} s"
    if rc != 0:
        if log_path is not None:
            print("".join(log_path.read_text().splitlines(keepends=True)[-60:]), file=sys.stderr)
        print(f"{label}: {call.label} failed (exit {rc}) after {took}" + (f"; its log: {log_path}" if log_path else ""),
              file=sys.stderr)
        return rc
    print(f"{label}: {call.label} … {stage_outcomes(call, instance)} ({took})", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dry-run", action="store_true", help="print the calls (as CLI commands) only")
    parser.add_argument("--all", action="store_true",
                        help="make every call, also those whose stages are all up to date (each stage then "
                        "reuses its manifest and records a new materialization)")
    parser.add_argument("--cli", action="store_true",
                        help="make each call with `dagster asset materialize` in its own process (as CI does) "
                        "instead of in this process")
    parser.add_argument("--verbose", action="store_true",
                        help="stream Dagster's output at DEBUG level (default: a line per call; each call's "
                        "INFO log goes to a file under $DAGSTER_HOME/msae_logs/)")
    args = parser.parse_args(argv)
    import warnings

    import dagster as dg

    warnings.filterwarnings("ignore", message=".*is currently in beta")  # Dagster's notes on its own API
    cfg = load_config()
    home = ensure_dagster_home()
    from msae_assets.definitions import defs  # built from the same config (MSAE_CONFIG / MSAE_PROFILE)

    defined = tuple(a.key.to_user_string() for a in defs.assets)
    run_config = IN_PROCESS if args.verbose else QUIET
    calls = materialize_calls(cfg, defined)
    logs = Path(home) / "msae_logs" / time.strftime("%Y%m%d-%H%M%S")
    judge = None if args.dry_run or args.all else CallJudge(cfg)
    skipped = 0
    # one instance for the whole driver: opening one checks the storage's schema (~0.15 s each)
    with dg.DagsterInstance.get() as instance:
        if not args.dry_run:
            reap_instance(instance)
        for i, call in enumerate(calls, 1):
            if judge is not None:
                t0 = time.perf_counter()
                plan = judge.plan(call, instance)
                if plan.skip:
                    skipped += 1
                    print(f"call {i} of {len(calls)}: {call.label} … up to date, skipped "
                          f"({time.perf_counter() - t0:.1f} s)", flush=True)
                    continue
                call = call.narrowed(plan.selected)
                if args.verbose:
                    print("  to do:", "; ".join(f"{k}: {v}" for k, v in plan.reasons.items()), flush=True)
            if args.dry_run:
                print("+", shown_command(call, run_config, cli=True), flush=True)
                continue
            rc = make_call(call, f"call {i} of {len(calls)}", defs, instance, run_config,
                           None if args.verbose else logs / f"{i:02d}.log", cli=args.cli, verbose=args.verbose)
            if rc != 0:
                return rc
    if args.dry_run:
        return 0
    if skipped == len(calls):
        print("\nEverything was up to date: no Dagster run started (--all makes every call).")
    print(f"\nDone. Outputs under: {cfg.store}\nDagster instance (history, UI): {home}"
          + ("" if args.verbose else f"\nLogs of this call: {logs}"))
    print("\n".join(outputs_summary(cfg)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
