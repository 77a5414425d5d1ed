"""kill -9 inside every stage, resume each time: are the outputs those of an uninterrupted run?

`python benchmarks/bench_kill_chain.py [--write]` (≈ 25 min on 2 cores), embedded default:

1. reference: the driver (`python -m msae_assets.materialize`, as `make demo`) from nothing;
2. chain: into the same store path (the reference moved aside) and a new Dagster instance, the
   driver's whole process group is SIGKILLed a few seconds into each stage in turn (`vqa_samples`
   … `report`), each time followed by a plain call of the driver — no manual step — until one
   call finishes;
3. every output file of the two stores is compared byte for byte; JSON files that differ are
   compared again without their timing keys (seconds, throughput, how much was resumed).

Printed, and with `--write` the "Kill chain" section of benchmarks/RESULTS.md: the calls, how many
runs the instance holds by status, whether any pool slot is still held, and the comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from msae.config import PROJECT_ROOT  # noqa: E402

SECTION = "## Kill chain"
STAGES = ("vqa_samples", "activations", "sae", "latent_stats", "concepts", "concept_scores", "controls", "report")
SCRATCH = ("_manifests", "_locks", "_progress", "_checkpoints", "_cache")
TIMING = re.compile(r"seconds|_s$|per_s|resumed|elapsed|time")
DRIVER = [sys.executable, "-m", "msae_assets.materialize", "--verbose"]


def _env(store: Path, home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MSAE_STORE": str(store), "DAGSTER_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MSAE_CONFIG", None)
    return env


def run_killed(env: dict[str, str], log: Path, stage: str, delay_s: float) -> str:
    """One driver call, SIGKILLed (process group) ``delay_s`` after ``stage`` starts. Says what the
    kill hit: the stage itself, what came after it (the stage was quicker), or nothing (the call ended)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(DRIVER, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    marker = f'Started execution of step "{stage}"'
    while proc.poll() is None and marker not in log.read_text(errors="replace"):
        time.sleep(0.3)
    time.sleep(delay_s)
    if proc.poll() is not None:
        return f"{stage}: the call ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    text = log.read_text(errors="replace")
    done = f'Finished execution of step "{stage}"' in text[text.index(marker):]
    return f"SIGKILL after {stage} finished (in what followed it)" if done else f"SIGKILL during {stage}"


def digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not any(part in SCRATCH for part in rel.split("/")) and not rel.endswith(".tmp"):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if not TIMING.search(k)}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def compare(ref: Path, chain: Path) -> dict:
    a, b = digests(ref), digests(chain)
    differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    timing_only, real = [], []
    for rel in differing:
        if rel in a and rel in b and rel.endswith(".json"):
            if _without_timing(json.loads((ref / rel).read_text())) == _without_timing(json.loads((chain / rel).read_text())):
                timing_only.append(rel)
                continue
        real.append(rel)
    return {"files": len(a), "files_chain": len(b), "identical": len(a) - len(differing),
            "timing_only": timing_only, "differ": real}


def instance_state(home: Path) -> tuple[Counter, set]:
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        statuses = Counter(r.dagster_run.status.value for r in instance.get_run_records())
        return statuses, instance.event_log_storage.get_concurrency_run_ids()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="replace the section in benchmarks/RESULTS.md")
    parser.add_argument("--delay", type=float, default=1.0, help="seconds into a stage before the kill")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="msae-kill-chain-"))
    store = root / "store"
    t0 = time.perf_counter()
    rc = subprocess.call(DRIVER, cwd=PROJECT_ROOT, env=_env(store, root / "home_ref"),
                         stdout=open(root / "ref.log", "w"), stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"reference run failed (exit {rc}); see {root / 'ref.log'}")
    ref_wall = time.perf_counter() - t0
    store.rename(root / "ref_store")

    env = _env(store, root / "home_chain")
    calls = []
    for i, stage in enumerate(STAGES):
        hit = run_killed(env, root / f"chain{i}.log", stage, args.delay)
        reaped = (root / f"chain{i}.log").read_text(errors="replace").count("was dead: marked failed")
        calls.append(f"call {i + 1}: {hit} (dead runs failed at its start: {reaped})")
    final_log = root / "final.log"
    rc = subprocess.call(DRIVER, cwd=PROJECT_ROOT, env=env, stdout=open(final_log, "w"), stderr=subprocess.STDOUT)
    reaped = final_log.read_text(errors="replace").count("was dead: marked failed")
    calls.append(f"call {len(STAGES) + 1}: plain, exit {rc} (dead runs failed at its start: {reaped})")
    if rc != 0:
        raise SystemExit(f"the final call failed (exit {rc}); see {final_log}")
    statuses, held = instance_state(root / "home_chain")
    result = compare(root / "ref_store", store)

    lines = [SECTION, "",
             f"Embedded default, {time.strftime('%Y-%m-%d')} (`benchmarks/bench_kill_chain.py`, kill {args.delay:g} s "
             f"into each stage; reference run {ref_wall:.0f} s). The driver's process group is SIGKILLed inside "
             "each stage in turn, then called again as it is, with no manual step:", "",
             *[f"- {c}" for c in calls], "",
             f"Runs in the chain's instance: {dict(sorted(statuses.items()))}; pool slots still held: {len(held)}.", "",
             f"Output files: {result['files']} (reference) vs {result['files_chain']} (chain); byte-identical "
             f"{result['identical']}; differing only in timing keys {len(result['timing_only'])} "
             f"({', '.join(result['timing_only']) or '—'}); differing otherwise {len(result['differ'])} "
             f"({', '.join(result['differ']) or '—'})."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(text)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if not result["differ"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
