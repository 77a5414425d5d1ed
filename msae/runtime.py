"""CPU threads per process: torch's default (every core) oversubscribes a machine whose steps run side by side.

Measured on a shared 2-core box: two processes at torch's default thread count ran an SAE step
10-14x slower than at one thread each (``benchmarks/bench_threads.py``). Every asset therefore
calls :func:`apply_threads` first, and every benchmark takes ``--threads`` (:func:`bench_threads`).

What wins (``runtime`` config section, :class:`msae.config.RuntimeConfig`):

* threads: an explicit ``runtime.threads`` number; else ``OMP_NUM_THREADS`` (then
  ``MKL_NUM_THREADS``) when set to a positive whole number; else the cores this process may use
  (its CPU affinity, else ``os.cpu_count()``) divided by the step concurrency, at least 1;
* step concurrency: an explicit ``runtime.step_concurrency``; else ``MSAE_STEP_CONCURRENCY``;
  else what the Dagster run's executor allows (:func:`executor_concurrency`); else 1.

Nothing here imports Dagster: the run's executor is read from the step context duck-typed.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from msae.config import MsaeConfig, RuntimeConfig

log = logging.getLogger("msae.runtime")

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CONCURRENCY_ENV = "MSAE_STEP_CONCURRENCY"
IN_PROCESS_EXECUTORS = {"in_process", "execute_in_process_executor"}
MULTI_OR_IN_PROCESS = "multi_or_in_process_executor"


@dataclass(frozen=True)
class ThreadPlan:
    """The thread counts for this process and why (the reason is logged and printed by benchmarks)."""

    threads: int
    interop_threads: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroup cpusets) where the OS has one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _positive_int(text: str | None, name: str) -> int | None:
    """A positive whole number from an environment variable; anything else is ignored (with a warning)."""
    if text is None or not text.strip():
        return None
    first = text.split(",")[0].strip()  # OpenMP allows a nested list, "4,2": the outer level is ours
    if first.isdigit() and int(first) >= 1:
        return int(first)
    log.warning("%s=%r is not a positive whole number; ignored", name, text)
    return None


def env_threads(environ: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """``OMP_NUM_THREADS`` (then ``MKL_NUM_THREADS``) when the user set one: (count, variable)."""
    environ = os.environ if environ is None else environ
    for name in THREAD_ENV_VARS:
        n = _positive_int(environ.get(name), name)
        if n is not None:
            return n, name
    return None


def executor_concurrency(context: Any) -> int | None:
    """How many steps the Dagster run behind ``context`` may run at once, or None when unknown.

    ``in_process`` (the project's CLI driver, ``dg.materialize``): 1. ``multiprocess`` (the default
    executor of a run launched without run config, e.g. from the UI): its ``max_concurrent`` (by default
    the CPU count), at most the run's steps. Other executors, or a context that is not a Dagster one: None.
    """
    try:
        run = context.run
        name = context.job_def.executor_def.name
        steps = run.step_keys_to_execute
        n_steps = len(steps) if steps is not None else len(context.job_def.nodes)
        return concurrency_from_run_config(name, run.run_config or {}, n_steps)
    except Exception as err:  # noqa: BLE001 - a fake or unusual context: fall back to the other sources
        log.debug("executor concurrency unknown (%s)", err)
        return None


def concurrency_from_run_config(executor: str, run_config: Mapping[str, Any], n_steps: int | None) -> int | None:
    """Steps at once for executor ``executor`` under ``run_config`` (see :func:`executor_concurrency`)."""
    if executor in IN_PROCESS_EXECUTORS:
        return 1
    execution = (run_config.get("execution") or {}).get("config") or {}
    if executor == MULTI_OR_IN_PROCESS:
        if "in_process" in execution:
            return 1
        execution = execution.get("multiprocess") or {}
    elif executor != "multiprocess":
        return None
    limit = execution.get("max_concurrent") or os.cpu_count() or 1  # Dagster: None or 0 means the CPU count
    return max(1, min(int(limit), n_steps) if n_steps else int(limit))


def plan_threads(runtime: RuntimeConfig | None = None, *, step_concurrency: int | None = None,
                 environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadPlan:
    """The thread counts the rules in this module's docstring give; changes nothing.

    ``step_concurrency``: what the caller knows of steps side by side (e.g. :func:`executor_concurrency`),
    used when neither ``runtime.step_concurrency`` nor ``MSAE_STEP_CONCURRENCY`` says."""
    from msae.config import RuntimeConfig

    runtime = runtime or RuntimeConfig()
    environ = os.environ if environ is None else environ
    if runtime.threads != "auto":
        threads, reason = int(runtime.threads), "runtime.threads"
    elif (env := env_threads(environ)) is not None:
        threads, reason = env[0], env[1]
    else:
        cores = cores or available_cores()
        if runtime.step_concurrency != "auto":
            steps, source = int(runtime.step_concurrency), "runtime.step_concurrency"
        elif (n := _positive_int(environ.get(CONCURRENCY_ENV), CONCURRENCY_ENV)) is not None:
            steps, source = n, CONCURRENCY_ENV
        elif step_concurrency is not None:
            steps, source = max(1, step_concurrency), "the Dagster executor"
        else:
            steps, source = 1, "one step at a time"
        threads = max(1, cores // steps)
        reason = f"auto: {cores} core(s) / {steps} step(s) at once ({source})"
    interop = threads if runtime.interop_threads == "auto" else int(runtime.interop_threads)
    return ThreadPlan(threads, interop, reason)


_applied: ThreadPlan | None = None
_process_runtime: RuntimeConfig | None = None


def process_runtime() -> RuntimeConfig:
    """The ``runtime`` section of the config this process runs (``MSAE_CONFIG`` / ``MSAE_PROFILE``, as the
    Dagster code location loads it), read once; the defaults if it cannot be read (logged)."""
    global _process_runtime
    if _process_runtime is None:
        from msae.config import RuntimeConfig, load_config

        try:
            _process_runtime = load_config().runtime
        except Exception as err:  # noqa: BLE001 - threads are a speed setting: never fail a stage over them
            log.warning("runtime settings: could not read the config (%s); using the defaults", err)
            _process_runtime = RuntimeConfig()
    return _process_runtime


def apply_threads(cfg: MsaeConfig | RuntimeConfig | None = None, *, step_concurrency: int | None = None) -> int:
    """Set torch's thread counts for this process from ``cfg`` (a whole config or its ``runtime``
    section; None: :func:`process_runtime`) and return the intra-op count.

    Idempotent and cheap: a repeat call with the same outcome changes and logs nothing. The inter-op
    pool can only be sized before torch's first parallel work; after that it is left alone.
    """
    global _applied
    from msae.config import MsaeConfig

    runtime = cfg.runtime if isinstance(cfg, MsaeConfig) else cfg if cfg is not None else process_runtime()
    plan = plan_threads(runtime, step_concurrency=step_concurrency)
    if "torch" not in sys.modules:
        # not imported yet (a stage that only reuses its outputs never imports it): torch's thread
        # pools read these when it is imported, and a step that does nothing stays cheap
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(plan.threads)
        if _applied != plan:
            log.info("torch threads: %d (%s), set for when torch is imported", plan.threads, plan.reason)
            _applied = plan
        return plan.threads
    import torch
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    interop_note = ""
    if torch.get_num_interop_threads() != plan.interop_threads:
        try:
            torch.set_num_interop_threads(plan.interop_threads)
        except RuntimeError:  # torch: "cannot set number of interop threads after parallel work has started"
            interop_note = f"; inter-op pool left at {torch.get_num_interop_threads()} (already started)"
    if _applied != plan:
        log.info("torch threads: %d (%s), inter-op %d%s", plan.threads, plan.reason,
                 torch.get_num_interop_threads(), interop_note)
        _applied = plan
    return plan.threads


def threads_option(text: str) -> int | str:
    """argparse ``type`` of the benchmarks' ``--threads``: a whole number >= 1, or ``auto``."""
    import argparse

    if text == "auto":
        return text
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"--threads must be a whole number >= 1 or 'auto', not {text!r}")


THREADS_HELP = ("torch CPU threads: a whole number, or auto (the assets' rule: OMP_NUM_THREADS when set, else the "
                "cores this process may use / MSAE_STEP_CONCURRENCY)")


def bench_threads(value: int | str = "auto") -> int:
    """A benchmark's ``--threads``: apply it (``auto``: the rule the assets use), print it, return the count."""
    from msae.config import RuntimeConfig

    runtime = RuntimeConfig(threads=value)
    threads = apply_threads(runtime)
    print(f"torch threads: {threads} ({plan_threads(runtime).reason})", flush=True)
    return threads


class ProgressReport:
    """Log lines for a long loop's progress, one at each ``every`` of its total (and at the end).

    Why: tqdm bars are drawn for a terminal; a Dagster step's log — the UI's, the driver's per-call
    files — never sees them, so SAE training and the latent-stats pass ran silent for many minutes
    on a busy machine. ``emit`` is where the line goes (an asset passes its Dagster logger's
    ``info``). It only reads the loop's counters, never changes what the loop computes."""

    def __init__(self, emit: Callable[[str], None], label: str, total: int, start: int = 0, every: float = 0.1,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], not {every}")
        self.emit, self.label, self.total, self.start, self.every, self.clock = emit, label, total, start, every, clock
        self._t0 = clock()
        self._next = self._boundary_after(start)

    def _boundary_after(self, done: int) -> int:
        """The first multiple of ``every`` × total above ``done`` (in items, at least done + 1)."""
        step = self.every * self.total
        k = int(done / step) + 1 if step > 0 else 1
        return min(self.total, max(done + 1, math.ceil(k * step - 1e-9)))

    def update(self, done: int, detail: Callable[[], str] | None = None) -> None:
        """``done`` of ``total`` finished; emits when it crossed the next boundary. ``detail`` (called
        only then) adds to the line, e.g. the latest loss."""
        if self.total <= 0 or done < self._next:
            return
        elapsed = self.clock() - self._t0
        new = done - self.start
        left = elapsed * (self.total - done) / new if new > 0 else float("nan")
        extra = detail() if detail is not None else ""
        self.emit(f"{self.label} {done}/{self.total} ({100 * done / self.total:.0f} %), {elapsed:.0f} s"
                  + (f", ~{left:.0f} s left" if done < self.total else "") + (f", {extra}" if extra else ""))
        self._next = self._boundary_after(done) if done < self.total else self.total + 1
