"""Runs whose process is gone: failed, and their concurrency-pool slots released, with no manual step.

Why this exists: a run killed with SIGKILL (or by the OOM killer) never writes its end event, so
Dagster keeps it STARTED and its step keeps the only slot of its pool (`gpu`); every later run then
waits forever ("Step blocked by limit for pool gpu"). Dagster's run monitoring cannot see this
with the default run launcher (it has no run-worker health check), and the CLI has no daemon.
So every driver call (`make demo`, `msae materialize`) first looks at the unfinished runs of the
instance and fails those whose process no longer exists — through the instance's public methods.

How a run's process is known: each msae asset tags its run with the host and pid that execute it
(:func:`tag_run_process`); a run without those tags (killed before its first asset began) is
judged by the pids of its own event log, but only on a local SQLite instance, where every run
was executed on this machine. A run tagged by another host is never touched (a shared Postgres
instance is for the machines that own their runs).

Also here, for the driver's children: :func:`start_driver_watchdog` makes a process started by
the driver end itself when the driver is gone, so killing the driver never leaves a worker
committing into the store behind the user's back.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import dagster as dg

log = logging.getLogger(__name__)

HOST_TAG = "msae/host"
PID_TAG = "msae/pid"
PID_SEEN_TAG = "msae/pid_seen"
"""When (epoch seconds) the tagged pid was seen executing the run: a process that began later is
another one that got the pid since."""
DRIVER_PID_ENV = "MSAE_DRIVER_PID"
"""Set by the driver for the Dagster CLI processes it starts; read by :func:`start_driver_watchdog`."""

UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine and has not ended (one of another
    user counts). A zombie has ended: killed together with its parent, a run's process stays one
    until an init reaps it, which in a container may be never."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_state(pid) not in ("Z", "X")


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, D, Z, …); None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of ``pid`` from /proc, to tell a reused pid from the run's own;
    None where /proc is not there (the pid check alone is then used)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/stat", "rb") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_process_gone(pid: int, seen: float | None) -> bool:
    """The run's process is gone: no such pid, or the pid now belongs to a process that began
    after ``seen``, when the run's process was known to hold it (a pid reused since)."""
    if not process_alive(pid):
        return True
    began = process_start_time(pid)
    return began is not None and seen is not None and began > seen + 1.0


def tag_run_process(context: dg.AssetExecutionContext) -> None:
    """Record in the run's tags which host and pid execute it (first asset of the run only)."""
    try:
        run = context.run
        if run.tags.get(HOST_TAG) == socket.gethostname() and run.tags.get(PID_TAG) == str(os.getpid()):
            return
        context.instance.add_run_tags(context.run_id, {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
                                                       PID_SEEN_TAG: f"{time.time():.3f}"})
    except Exception as err:  # a tag is a help for later recovery, never a reason to fail the stage
        log.warning("could not tag run %s with its process: %s", getattr(context, "run_id", "?"), err)


@dataclass(frozen=True)
class ReapedRun:
    run_id: str
    job_name: str
    status: str
    pids: tuple[int, ...]


def _is_local_sqlite(instance: dg.DagsterInstance) -> bool:
    return "sqlite" in type(instance.run_storage).__name__.lower()


def _event_pids(instance: dg.DagsterInstance, run_id: str) -> dict[int, float]:
    """pid → the time of its first event in the run's log (the process existed then)."""
    pids: dict[int, float] = {}
    for e in instance.all_logs(run_id):
        if e.dagster_event is not None and e.dagster_event.pid is not None:
            pids.setdefault(e.dagster_event.pid, e.timestamp)
    return pids


def _run_pids(instance: dg.DagsterInstance, run: dg.DagsterRun, local_instance: bool) -> dict[int, float] | None:
    """pid → when it was seen executing ``run``, for the run's processes on this host; None when
    that cannot be told from here."""
    host = run.tags.get(HOST_TAG)
    if host is not None and host != socket.gethostname():
        return None
    if host is None and not local_instance:
        return None
    pids = _event_pids(instance, run.run_id)
    if run.tags.get(PID_TAG, "").isdigit():
        try:
            seen = float(run.tags.get(PID_SEEN_TAG, ""))
        except ValueError:
            seen = None
        pids[int(run.tags[PID_TAG])] = seen  # type: ignore[assignment]
    return pids or None


def reap_dead_runs(instance: dg.DagsterInstance,
                   gone: Callable[[int, float | None], bool] = run_process_gone) -> list[ReapedRun]:
    """Fail every unfinished run whose processes are all gone and free its pool slots; also free
    slots still held by runs that already finished. Returns the runs failed here."""
    local_instance = _is_local_sqlite(instance)
    reaped: list[ReapedRun] = []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=UNFINISHED)):
        run = record.dagster_run
        pids = _run_pids(instance, run, local_instance)
        if not pids or not all(gone(pid, seen) for pid, seen in pids.items()):
            continue
        instance.report_run_failed(
            run, message=f"msae: the process of this run ({', '.join(map(str, sorted(pids)))}) no longer "
            "exists (killed, e.g. kill -9 or out of memory); marked failed so that its pool slots are released")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        reaped.append(ReapedRun(run.run_id, run.job_name, run.status.value, tuple(sorted(pids))))
        log.warning("run %s (%s) had no live process %s: marked failed, pool slots released",
                    run.run_id, run.status.value, sorted(pids))
    _free_slots_of_finished_runs(instance)
    return reaped


def _free_slots_of_finished_runs(instance: dg.DagsterInstance) -> None:
    """Slots (and queued slot claims) of runs that ended without releasing them."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return
    for record in instance.get_run_records(filters=dg.RunsFilter(run_ids=list(holders), statuses=FINISHED)):
        storage.free_concurrency_slots_for_run(record.dagster_run.run_id)


def format_reaped(reaped: Iterable[ReapedRun]) -> list[str]:
    return [f"run {r.run_id} ({r.status}, pids {', '.join(map(str, r.pids))}) was dead: marked failed, "
            "pool slots released" for r in reaped]


# --- the driver's children ---------------------------------------------------------------------
_watchdog_started = False


def start_driver_watchdog(poll_s: float = 1.0, grace_s: float = 20.0) -> bool:
    """In a process started by the driver (``MSAE_DRIVER_PID`` set): once the driver is gone,
    SIGTERM this process (Dagster fails the run cleanly and frees its slots), then SIGKILL it
    after ``grace_s`` if it is still there. Returns whether a watchdog runs."""
    global _watchdog_started
    raw = os.environ.get(DRIVER_PID_ENV, "")
    if _watchdog_started or not raw.isdigit() or int(raw) == os.getpid():
        return _watchdog_started
    driver = int(raw)

    def watch() -> None:
        while process_alive(driver):
            time.sleep(poll_s)
        log.error("the msae driver (pid %d) is gone: stopping this process (pid %d)", driver, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="msae-driver-watchdog", daemon=True).start()
    _watchdog_started = True
    return True


def main() -> int:
    """`python -m msae_assets.run_health`: reap the instance in DAGSTER_HOME once (for UI users)."""
    with dg.DagsterInstance.get() as instance:
        lines = format_reaped(reap_dead_runs(instance))
    print("\n".join(lines) or "no dead runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
