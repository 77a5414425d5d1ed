"""The checkpoint re-run end to end, as a user runs it: `dagster dev` (webserver + daemon) on
loopback, a new checkpoint folder, and the runs the daemon launches read back through GraphQL.

The sensor's logic has unit tests (tests/test_sensor.py) that call its tick directly; this one
checks what those cannot: that the daemon ticks the sensor, launches the waves in graph order,
tags every run with the checkpoint, and that the runs succeed. Everything it starts runs in its
own session and is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from msae.config import PROJECT_ROOT

RUNS_QUERY = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs { results { runId status startTime endTime tags { key value } assetSelection { path } } }
  }
}
"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
STARTUP_S = 600   # generous bounds: a busy 2-core machine is slow, not wrong; they only stop a hang
RERUN_S = 1800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graphql(port: int, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    assert "errors" not in out, out
    return out["data"]


def _wait(what: str, check, limit_s: float, log: Path, every_s: float = 2.0):
    """Poll ``check`` until it returns something truthy; fail with the log's tail after ``limit_s``."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            got = check()
        except OSError:  # the webserver is not listening yet
            got = None
        if got:
            return got
        time.sleep(every_s)
    pytest.fail(f"{what} not within {limit_s} s; dagster dev log:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to dagster dev's whole session (webserver, daemon, code servers, run workers)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in the session
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
def test_daemon_reruns_the_pipeline_in_waves_for_a_new_checkpoint(tiny_config_data, tiny_vlm_dir, tmp_path):
    from msae.config import parse_config
    from msae_assets.definitions import build_definitions
    from msae_assets.sensors import UNIT_TAG, WAVE_TAG, rerun_waves

    watched = tmp_path / "checkpoints"
    watched.mkdir()
    data = {**tiny_config_data, "checkpoints": {"watch": "folder", "location": str(watched), "settle_s": 0,
                                                "interval_s": 5, "enabled": True}}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    defs = build_definitions(parse_config(data))
    waves = rerun_waves(defs.get_repository_def().assets_defs_by_key)
    expected = {(i, u.name) for i, wave in enumerate(waves) for u in wave}

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "MSAE_CONFIG": str(cfg_path), "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("MSAE_STORE", None)
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).with_name("dagster")
    # the dataset exists before any checkpoint does (the re-run starts at `activations`)
    first = subprocess.run([str(dagster), "asset", "materialize", "-m", "msae_assets.definitions", "--select",
                            "vqa_samples"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    with open(log, "w") as out:
        proc = subprocess.Popen([str(dagster), "dev", "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", "127.0.0.1",
                                 "-p", str(port)], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait("the webserver", lambda: _graphql(port, "{ version }").get("version"), STARTUP_S, log)
        # a trainer writes a new checkpoint (here: a copy of the tiny VLM, under its own name)
        shutil.copytree(tiny_vlm_dir, watched / "checkpoint-100")
        tag = {"key": "msae/checkpoint", "value": "checkpoint-100"}

        def runs() -> list[dict]:
            got = _graphql(port, RUNS_QUERY, {"filter": {"tags": [tag]}})["runsOrError"]
            assert got["__typename"] == "Runs", got
            return got["results"]

        def all_done() -> list[dict] | None:
            rs = runs()
            if any(r["status"] in {"FAILURE", "CANCELED"} for r in rs):
                return rs  # stop waiting: the assertions below say which
            return rs if len(rs) == len(expected) and all(r["status"] in TERMINAL for r in rs) else None

        done = _wait(f"{len(expected)} re-run runs", all_done, RERUN_S, log, every_s=5.0)
    finally:
        _stop(proc)

    def tags(run: dict) -> dict[str, str]:
        return {t["key"]: t["value"] for t in run["tags"]}

    assert [r["status"] for r in done] == ["SUCCESS"] * len(done), [(tags(r).get(UNIT_TAG), r["status"]) for r in done]
    got = {(int(tags(r)[WAVE_TAG]), tags(r)[UNIT_TAG]) for r in done}
    assert got == expected  # one run per unit of every wave, nothing more
    for r in done:  # pinned: every run names the checkpoint it used
        t = tags(r)
        assert t["msae/checkpoint_path"] == str(watched / "checkpoint-100") and t["msae/checkpoint_version"]
    # graph order: a wave starts only after every run of the previous one ended
    by_wave: dict[int, list[dict]] = {}
    for r in done:
        by_wave.setdefault(int(tags(r)[WAVE_TAG]), []).append(r)
    for w in range(1, len(waves)):
        assert min(r["startTime"] for r in by_wave[w]) >= max(r["endTime"] for r in by_wave[w - 1])
    first = {tuple(k["path"]) for r in by_wave[0] for k in r["assetSelection"]}
    assert first == {("activations",)}
    last = {tuple(k["path"]) for r in by_wave[len(waves) - 1] for k in r["assetSelection"]}
    assert ("report",) in last
