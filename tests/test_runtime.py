"""CPU threads per process (msae.runtime): the auto rule, what wins, torch really set, no code version touched."""

from __future__ import annotations

import argparse
import logging
from types import SimpleNamespace

import dagster as dg
import pytest
import torch

from msae import runtime
from msae.config import ConfigError, RuntimeConfig, parse_config
from msae.runtime import (
    apply_threads, bench_threads, concurrency_from_run_config, executor_concurrency, plan_threads, threads_option,
)

NO_ENV: dict[str, str] = {}


@pytest.fixture
def restore_torch_threads():
    """apply_threads changes process-wide state: put torch's count (and the module's memo) back."""
    before, applied = torch.get_num_threads(), runtime._applied
    yield
    torch.set_num_threads(before)
    runtime._applied = applied


def test_auto_divides_the_cores_among_steps_side_by_side():
    assert plan_threads(RuntimeConfig(), environ=NO_ENV, cores=16).threads == 16  # one step at a time: all
    assert plan_threads(RuntimeConfig(step_concurrency=4), environ=NO_ENV, cores=16).threads == 4
    assert plan_threads(RuntimeConfig(step_concurrency=3), environ=NO_ENV, cores=16).threads == 5  # floor
    assert plan_threads(RuntimeConfig(step_concurrency=8), environ=NO_ENV, cores=2).threads == 1  # never 0
    env = {"MSAE_STEP_CONCURRENCY": "2"}
    plan = plan_threads(RuntimeConfig(), environ=env, cores=16)
    assert (plan.threads, plan.interop_threads) == (8, 8)
    assert "16 core(s) / 2 step(s)" in plan.reason and "MSAE_STEP_CONCURRENCY" in plan.reason
    # the executor's count is used only when neither the config nor the environment says
    assert plan_threads(RuntimeConfig(), step_concurrency=4, environ=NO_ENV, cores=16).threads == 4
    assert plan_threads(RuntimeConfig(), step_concurrency=4, environ=env, cores=16).threads == 8
    assert plan_threads(RuntimeConfig(step_concurrency=1), step_concurrency=4, environ=env, cores=16).threads == 16


def test_cores_come_from_the_affinity_else_the_cpu_count(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    assert runtime.available_cores() == 3  # taskset / a cgroup cpuset, not the machine's 64
    assert plan_threads(RuntimeConfig(), environ=NO_ENV).threads == 3
    monkeypatch.delattr(runtime.os, "sched_getaffinity", raising=False)  # macOS / Windows
    assert runtime.available_cores() == 64
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: None)
    assert runtime.available_cores() == 1


def test_what_wins_explicit_then_environment_then_auto(caplog):
    assert plan_threads(RuntimeConfig(threads=3), environ={"OMP_NUM_THREADS": "7"}, cores=16).threads == 3
    plan = plan_threads(RuntimeConfig(), environ={"OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "5"}, cores=16)
    assert (plan.threads, plan.reason) == (7, "OMP_NUM_THREADS")
    assert plan_threads(RuntimeConfig(), environ={"MKL_NUM_THREADS": "5"}, cores=16).threads == 5
    assert plan_threads(RuntimeConfig(), environ={"OMP_NUM_THREADS": "4,2"}, cores=16).threads == 4  # nested
    # the user's variable beats the step-concurrency rule too
    assert plan_threads(RuntimeConfig(step_concurrency=8), environ={"OMP_NUM_THREADS": "6"}, cores=16).threads == 6
    with caplog.at_level(logging.WARNING, logger="msae.runtime"):
        assert plan_threads(RuntimeConfig(), environ={"OMP_NUM_THREADS": "0"}, cores=16).threads == 16
        assert plan_threads(RuntimeConfig(), environ={"MSAE_STEP_CONCURRENCY": "two"}, cores=16).threads == 16
    assert "OMP_NUM_THREADS='0' is not a positive whole number; ignored" in caplog.text
    assert "MSAE_STEP_CONCURRENCY='two'" in caplog.text
    plan = plan_threads(RuntimeConfig(threads=4, interop_threads=1), environ=NO_ENV, cores=16)
    assert (plan.threads, plan.interop_threads) == (4, 1)


def test_executor_concurrency_from_the_dagster_run():
    in_process = {"execution": {"config": {"in_process": {}}}}
    assert concurrency_from_run_config("multi_or_in_process_executor", in_process, 9) == 1  # the CLI driver
    assert concurrency_from_run_config("execute_in_process_executor", {}, 9) == 1  # dg.materialize
    multi = {"execution": {"config": {"multiprocess": {"max_concurrent": 3}}}}
    assert concurrency_from_run_config("multi_or_in_process_executor", multi, 9) == 3
    assert concurrency_from_run_config("multi_or_in_process_executor", multi, 2) == 2  # at most the steps
    assert concurrency_from_run_config("multiprocess", {"execution": {"config": {"max_concurrent": 5}}}, 9) == 5
    default = concurrency_from_run_config("multi_or_in_process_executor", {}, 10_000)  # the UI: multiprocess
    assert default == runtime.os.cpu_count()
    assert concurrency_from_run_config("k8s_job_executor", {}, 9) is None
    assert executor_concurrency(SimpleNamespace(log=None)) is None  # not a Dagster context: never raises


def test_a_real_dagster_step_sees_its_executor():
    seen: list[int | None] = []

    @dg.asset
    def probe(context) -> None:  # (no annotation: this module has postponed annotations)
        seen.append(executor_concurrency(context))

    assert dg.materialize([probe]).success
    assert seen == [1]


def test_apply_threads_sets_torch_and_is_idempotent(monkeypatch, restore_torch_threads, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("MSAE_STEP_CONCURRENCY", raising=False)
    runtime._applied = None
    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO, logger="msae.runtime"):
        assert apply_threads(RuntimeConfig(threads=3)) == 3
        assert torch.get_num_threads() == 3
        assert apply_threads(RuntimeConfig(threads=3)) == 3
    assert caplog.text.count("torch threads: 3 (runtime.threads)") == 1  # logged once
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert apply_threads(RuntimeConfig()) == 2 and torch.get_num_threads() == 2


def test_apply_threads_takes_a_whole_config_and_survives_a_started_interop_pool(
        tiny_config_data, monkeypatch, restore_torch_threads, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cfg = parse_config({**tiny_config_data, "runtime": {"threads": 2, "interop_threads": 1}})
    monkeypatch.setattr(torch, "get_num_interop_threads", lambda: 4)

    def started(n: int) -> None:
        raise RuntimeError("Error: cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", started)
    runtime._applied = None
    with caplog.at_level(logging.INFO, logger="msae.runtime"):
        assert apply_threads(cfg) == 2
    assert torch.get_num_threads() == 2
    assert "inter-op pool left at 4 (already started)" in caplog.text


def test_apply_threads_without_a_config_reads_the_process_config(monkeypatch, restore_torch_threads, tmp_path):
    bad = tmp_path / "missing.yaml"
    monkeypatch.setenv("MSAE_CONFIG", str(bad))
    monkeypatch.setattr(runtime, "_process_runtime", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert apply_threads() == 1  # an unreadable config: the defaults (a speed setting never fails a stage)
    assert runtime._process_runtime == RuntimeConfig()


@pytest.mark.parametrize("value", [0, -1, 2.0, True, "4", "many"])
def test_runtime_config_refuses_what_is_not_a_count(tiny_config_data, value):
    for field in ("threads", "interop_threads", "step_concurrency"):
        with pytest.raises(ConfigError) as err:
            parse_config({**tiny_config_data, "runtime": {field: value}})
        text = str(err.value)
        assert f"runtime.{field}: " in text and "must be a whole number >= 1 or 'auto'" in text
        assert f"(got {value!r})" in text and text.count("\n") == 1  # one line, not one per union member


def test_runtime_config_accepts_counts_and_auto_and_forbids_typos(tiny_config_data):
    cfg = parse_config(tiny_config_data)
    assert cfg.runtime == RuntimeConfig(threads="auto", interop_threads="auto", step_concurrency="auto")
    cfg = parse_config({**tiny_config_data, "runtime": {"threads": 4, "step_concurrency": "auto"}})
    assert cfg.runtime.threads == 4
    with pytest.raises(ConfigError, match=r"runtime\.thread: unknown key"):
        parse_config({**tiny_config_data, "runtime": {"thread": 4}})


def test_changing_runtime_changes_no_code_version(tiny_config_data):
    from msae_assets.definitions import build_definitions

    def versions(data: dict) -> dict:
        defs = build_definitions(parse_config(data))
        return {k: v for a in defs.assets if isinstance(a, dg.AssetsDefinition)
                for k, v in a.code_versions_by_key.items()}

    base = versions(tiny_config_data)
    other = versions({**tiny_config_data, "runtime": {"threads": 1, "interop_threads": 1, "step_concurrency": 4}})
    assert len(base) >= 8 and other == base
    changed = versions({**tiny_config_data, "latents": {"cards": 2}})  # the comparison can see a change
    assert changed != base


def test_benchmark_threads_option(monkeypatch, restore_torch_threads):
    assert threads_option("auto") == "auto" and threads_option("3") == 3
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole number >= 1 or 'auto'"):
            threads_option(bad)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert bench_threads("auto") == 1 and torch.get_num_threads() == 1  # the same rule as the assets
    assert bench_threads(2) == 2 and torch.get_num_threads() == 2
