"""What a re-run costs, as a fraction of a cold run: `python benchmarks/bench_rerun.py [--write]`.

In one run, into a temporary store and Dagster instance, with the embedded default:

1. cold: the whole pipeline from nothing (`python -m msae_assets.materialize`, as `make demo`);
2. no-op: the same call again (nothing changed);
3. template edit: one explainer prompt template changed (a copy of the templates with a line
   added to the masked visual one) — `concepts` and what reads it are stale;
4. threshold edit: `scores.visual_threshold` changed — only labelling and what reads it are stale.

Each is timed by wall clock and by the CPU time of the driver's children (their user + system
time: less sensitive to a shared machine than wall time). The cold run's *orchestration* is its
wall time outside the steps' bodies (each step's STEP_START → STEP_SUCCESS span in the Dagster
event log): process start, imports, the driver's up-to-date checks, run setup and teardown. Printed as fractions of the cold run;
`--write` replaces the "Re-runs" section of benchmarks/RESULTS.md. The design card's targets: a
no-op ≤ 5 % of a cold run, a template edit ≤ 10 %, a threshold edit ≤ 5 %, orchestration ≤ 10 %.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from msae.config import PROJECT_ROOT, load_config  # noqa: E402

SECTION = "## Re-runs"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_driver(env: dict[str, str], log: Path) -> tuple[float, float]:
    """One driver call; (wall seconds, children's CPU seconds). Raises if it fails."""
    cpu0, t0 = _children_cpu(), time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call([sys.executable, "-m", "msae_assets.materialize"], cwd=PROJECT_ROOT, env=env,
                             stdout=out, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if rc != 0:
        raise SystemExit(f"driver failed (exit {rc}); see {log}")
    return wall, cpu


def step_seconds(home: Path) -> tuple[float, int, int]:
    """(seconds inside step bodies, steps, runs) over every run of the instance at ``home``."""
    import dagster as dg

    starts: dict[tuple[str, str], float] = {}
    total, steps = 0.0, 0
    os.environ["DAGSTER_HOME"] = str(home)  # the project's dagster.yaml reads it
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_run_records()
        for record in runs:
            for e in instance.all_logs(record.dagster_run.run_id):
                event = e.dagster_event
                if event is None or event.step_key is None:
                    continue
                key = (record.dagster_run.run_id, event.step_key)
                if event.event_type_value == "STEP_START":
                    starts[key] = e.timestamp
                elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE") and key in starts:
                    total += e.timestamp - starts.pop(key)
                    steps += 1
    return total, steps, len(runs)


def write_config(data: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="msae-bench-rerun-"))
    base = load_config(profile="embedded").model_dump(mode="json")  # paths resolved: absolute
    base["store"] = str(root / "store")
    cfg_path = root / "config.yaml"
    write_config(base, cfg_path)
    env = {**os.environ, "MSAE_CONFIG": str(cfg_path), "DAGSTER_HOME": str(root / "home")}
    for key in ("MSAE_STORE", "MSAE_PROFILE"):
        env.pop(key, None)

    rows: list[tuple[str, float, float]] = []
    rows.append(("cold", *run_driver(env, root / "cold.log")))
    in_steps, n_steps, n_runs = step_seconds(root / "home")
    rows.append(("no-op", *run_driver(env, root / "noop.log")))

    templates = root / "templates"
    shutil.copytree(PROJECT_ROOT / "msae" / "explain" / "templates", templates)
    masked = templates / "visual_masked.txt"
    masked.write_text(masked.read_text() + "\nAnswer with the concept only.\n")
    write_config({**base, "explainer": {**base["explainer"], "prompt_dir": str(templates)}}, cfg_path)
    rows.append(("template edit", *run_driver(env, root / "template.log")))

    scores = {**base["scores"], "visual_threshold": round(base["scores"]["visual_threshold"] - 0.05, 4)}
    write_config({**base, "explainer": {**base["explainer"], "prompt_dir": str(templates)}, "scores": scores},
                 cfg_path)
    rows.append(("threshold edit", *run_driver(env, root / "threshold.log")))

    cold_wall, cold_cpu = rows[0][1], rows[0][2]
    lines = [SECTION, "",
             f"Embedded default, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs (a shared machine: the CPU "
             "column is the steadier one). Each row is one `python -m msae_assets.materialize` call after "
             "the change named; fractions are of the cold run measured in the same benchmark run "
             "(`benchmarks/bench_rerun.py`).", "",
             "| run | wall s | CPU s | wall / cold | CPU / cold |", "|---|---|---|---|---|"]
    for name, wall, cpu in rows:
        lines.append(f"| {name} | {wall:.0f} | {cpu:.0f} | {wall / cold_wall:.1%} | {cpu / cold_cpu:.1%} |")
    lines += ["", f"Orchestration of the cold run: {cold_wall - in_steps:.0f} s of {cold_wall:.0f} s wall "
              f"({(cold_wall - in_steps) / cold_wall:.1%}) outside the bodies of its {n_steps} steps "
              f"({n_runs} Dagster runs)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text)
    if args.keep:
        print(f"kept: {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
