"""Killed runs and killed drivers (reliability items 1 and 2), reproduced with real processes.

1. A run killed with SIGKILL while its step holds the only slot of a pool stays STARTED and
   blocks every later run of that pool ("Step blocked by limit for pool vlm") until someone
   deletes it. The driver's reaper must fail it and release the slot with no manual step.
2. Killing the driver must end the Dagster process it started (else it keeps writing the store).

Every wait is bounded (a blocked run would otherwise wait forever); no bound asserts speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from msae_assets.run_health import (
    DRIVER_PID_ENV, HOST_TAG, PID_TAG, process_alive, process_state, reap_dead_runs, run_process_gone)

PROJECT = Path(__file__).resolve().parents[1]
DAGSTER_YAML = """
storage:
  sqlite:
    base_dir:
      env: DAGSTER_HOME
telemetry:
  enabled: false
concurrency:
  pools:
    granularity: op
    default_limit: 1
"""
DEFS = textwrap.dedent('''
    import os, time
    from pathlib import Path
    import dagster as dg
    from msae_assets.run_health import start_driver_watchdog, tag_run_process

    MARK = Path(os.environ["MARK_DIR"])

    @dg.asset(pool="vlm")
    def slow(context):
        tag_run_process(context)
        (MARK / f"slow-{os.getpid()}").write_text("started")
        time.sleep(float(os.environ.get("SLOW_S", "600")))

    @dg.asset(pool="vlm")
    def quick(context):
        tag_run_process(context)
        (MARK / "quick").write_text("done")

    start_driver_watchdog(poll_s=0.2)  # as msae_assets.definitions does
    defs = dg.Definitions(assets=[slow, quick])
''')
IN_PROCESS = '{"execution": {"config": {"in_process": {}}}}'


def _wait_for(predicate, what: str, bound_s: float = 120.0) -> None:
    end = time.monotonic() + bound_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting ({bound_s:g} s) for {what}")
        time.sleep(0.2)


@pytest.fixture()
def home(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text(DAGSTER_YAML)
    (tmp_path / "marks").mkdir()
    (tmp_path / "defs.py").write_text(DEFS)
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "home"), "MARK_DIR": str(tmp_path / "marks"),
           "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop(DRIVER_PID_ENV, None)
    return env


def _materialize(env: dict[str, str], tmp_path: Path, asset: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(tmp_path / "defs.py"),
           "--select", asset, "--config-json", IN_PROCESS]
    return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_slow_run(env: dict[str, str], tmp_path: Path) -> None:
    """Start `slow` (it takes the vlm slot) and SIGKILL its process mid-step."""
    proc = _materialize(env, tmp_path, "slow")
    try:
        _wait_for(lambda: any((tmp_path / "marks").glob("slow-*")), "the slow step to start")
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_killed_run_is_failed_and_its_pool_slot_released(home, tmp_path, monkeypatch):
    _kill_slow_run(home, tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", home["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        [stuck] = instance.get_run_records()
        assert stuck.dagster_run.status == dg.DagsterRunStatus.STARTED  # what kill -9 leaves
        assert stuck.dagster_run.tags[HOST_TAG] and stuck.dagster_run.tags[PID_TAG].isdigit()
        assert instance.event_log_storage.get_concurrency_run_ids() == {stuck.dagster_run.run_id}

        reaped = reap_dead_runs(instance)

        assert [r.run_id for r in reaped] == [stuck.dagster_run.run_id]
        assert instance.get_run_by_id(stuck.dagster_run.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.event_log_storage.get_concurrency_run_ids() == set()
        assert reap_dead_runs(instance) == []  # nothing left to do: a second call changes nothing

    # a later run of the same pool is no longer blocked
    quick = _materialize(home, tmp_path, "quick")
    try:
        rc = quick.wait(timeout=180)
    except subprocess.TimeoutExpired:
        quick.kill()
        raise AssertionError("the next run of pool vlm is still blocked after the reaper") from None
    assert rc == 0, quick.stderr.read().decode()[-2000:]
    assert (tmp_path / "marks" / "quick").read_text() == "done"


def test_live_runs_and_other_hosts_runs_are_left_alone(home, tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", home["DAGSTER_HOME"])
    env = {**home, "SLOW_S": "600"}
    proc = _materialize(env, tmp_path, "slow")
    try:
        _wait_for(lambda: any((tmp_path / "marks").glob("slow-*")), "the slow step to start")
        with dg.DagsterInstance.get() as instance:
            assert reap_dead_runs(instance) == []  # its process is alive
            [live] = instance.get_run_records()
            assert live.dagster_run.status == dg.DagsterRunStatus.STARTED
            # the same run seen as another machine's: never judged from here, even if "dead"
            instance.add_run_tags(live.dagster_run.run_id, {HOST_TAG: "another-host"})
            assert reap_dead_runs(instance, gone=lambda pid, started: True) == []
            assert instance.get_run_by_id(live.dagster_run.run_id).status == dg.DagsterRunStatus.STARTED
    finally:
        proc.kill()
        proc.wait(timeout=60)


def test_a_reused_pid_does_not_keep_a_dead_run_alive():
    me = os.getpid()
    assert not run_process_gone(me, time.time())  # alive, and began before it was seen in a run
    assert not run_process_gone(me, None)
    if Path("/proc/self/stat").exists():
        assert run_process_gone(me, time.time() - 3600)  # began after the run saw this pid: reused
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    assert not process_alive(dead.pid) and run_process_gone(dead.pid, None)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a zombie")
def test_a_zombie_counts_as_gone():
    """kill -9 of the driver and its CLI child leaves the child a zombie until an init reaps it (in
    a container, maybe never): the next call must still see the run's process as gone."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 60
        while process_state(child.pid) != "Z":  # exited, not waited for: a zombie of this process
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.05)
        os.kill(child.pid, 0)  # the pid still exists...
        assert not process_alive(child.pid) and run_process_gone(child.pid, None)  # ...but is gone
    finally:
        child.wait(timeout=60)


DRIVER = textwrap.dedent('''
    import sys
    from msae_assets.materialize import run_child
    sys.exit(run_child(sys.argv[1:]))
''')


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_driver_ends_its_dagster_run(home, tmp_path, monkeypatch, how):
    cmd = [sys.executable, "-m", "dagster", "asset", "materialize", "-f", str(tmp_path / "defs.py"),
           "--select", "slow", "--config-json", IN_PROCESS]
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, *cmd], env=home, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks = tmp_path / "marks"
    child = None
    try:
        _wait_for(lambda: any(marks.glob("slow-*")), "the slow step to start")
        child = int(next(marks.glob("slow-*")).name.split("-")[1])
        driver.send_signal(how)
        driver.wait(timeout=60)
        _wait_for(lambda: not _running(child), "the Dagster process to end after its driver", bound_s=90)
    finally:
        if driver.poll() is None:
            driver.kill()
        if child is not None and _running(child):
            os.kill(child, signal.SIGKILL)
    monkeypatch.setenv("DAGSTER_HOME", home["DAGSTER_HOME"])
    with dg.DagsterInstance.get() as instance:
        [run] = instance.get_run_records()
        # the run ended itself (no reaper needed) and released its slot: nothing writes any more
        assert run.dagster_run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
        assert instance.event_log_storage.get_concurrency_run_ids() == set()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an ended child of a dead parent may linger until reaped)."""
    if not process_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
