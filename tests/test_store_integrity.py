"""The output store's reliability: one writer per stage output (a lock naming its holder), unique
temporary names for atomic writes, and checksums of stage outputs verified on reuse and downstream."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from msae.manifest import fingerprint, load_manifest, manifest_name, upstream_version
from msae.store import Store

REPO = Path(__file__).resolve().parents[1]
SAE_PART = "layer=0/width=16"


class _Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str) -> None:
        self.lines.append(msg)


class _Context:
    """What run_stage uses of a Dagster context."""

    def __init__(self, run_id: str = "test-run") -> None:
        self.run_id = run_id
        self.log = _Log()


def _run_stage(store: Store, stage: str, compute, partition: str | None = None, version: str = "c1"):
    from msae_assets.stage import run_stage

    return run_stage(_Context(), store, stage, version, {}, compute, partition=partition)


def _flip(path: Path, n: int = 16) -> None:
    """Invert ``n`` bytes in the middle of a file, in place (size unchanged)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- one writer per stage output --------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from msae.store import Store
    from msae_assets.stage import run_stage

    class Log:
        def info(self, msg):
            print(msg, flush=True)

    class Ctx:
        run_id = "run-holder"
        log = Log()

    def compute():
        print("COMPUTING", flush=True)
        time.sleep(120)
        return "v-holder", {}

    run_stage(Ctx(), Store(sys.argv[1]), "sae", "c1", {}, compute, partition=sys.argv[2])
""")


def _start_holder(root: str, partition: str) -> subprocess.Popen:
    """A process computing sae[partition] (it sleeps inside compute), returned once it computes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, partition], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=str(REPO))
    seen: list[str] = []
    computing = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == "COMPUTING":
                computing.set()

    threading.Thread(target=read, daemon=True).start()
    if not computing.wait(timeout=120):
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(f"holder never started computing: {''.join(seen)}")
    return proc


def test_second_writer_fails_at_once_naming_the_holder_then_resumes_after_kill9(tmp_path):
    root = str(tmp_path / "store")
    store = Store(root)
    holder = _start_holder(root, SAE_PART)
    calls = []
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:
            _run_stage(store, "sae", lambda: calls.append(1) or ("v-second", {}), partition=SAE_PART)
        assert time.monotonic() - t0 < 20  # timeout 0: no waiting for the holder (which sleeps 120 s)
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and "run-holder" in msg and f"sae[{SAE_PART}]" in msg
        assert "Wait for it to finish" in msg
        assert calls == []  # the second writer never computed
        # another partition of the same stage is another output: written side by side
        other = _run_stage(store, "sae", lambda: ("v-512", {}), partition="layer=0/width=512")
        assert other.data_version == "v-512"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the OS dropped the killed holder's lock: the next writer acquires at once and computes
    t0 = time.monotonic()
    m = _run_stage(store, "sae", lambda: calls.append(1) or ("v-after", {}), partition=SAE_PART)
    assert time.monotonic() - t0 < 20
    assert calls == [1] and m.data_version == "v-after" and m.metadata["reused"] is False
    assert not store.exists("_locks/sae/layer=0/width=16.holder.json")  # removed on release


def test_lock_granularity_and_non_local_stores(tmp_path, caplog):
    from msae.store_lock import StoreLockedError, lock_name, stage_lock

    store = Store(str(tmp_path / "store"))
    # activations: every layer is extracted in one pass into one tokens.parquet, so one lock for all
    assert lock_name("activations", "0") == lock_name("activations", "2")
    assert lock_name("sae", "layer=1/width=256") != lock_name("sae", "layer=1/width=512")
    with stage_lock(store, "activations", "0", run_id="r1"):
        holder = json.loads((tmp_path / "store" / "_locks" / "activations.holder.json").read_text())
        assert holder["pid"] == os.getpid() and holder["run_id"] == "r1" and holder["stage"] == "activations"
        with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}.*tokens.parquet|tokens.parquet.*pid"):
            with stage_lock(store, "activations", "2"):
                pass
        with stage_lock(store, "sae", "layer=0/width=16"):
            pass
    with stage_lock(store, "activations", "2"):  # released on exit
        pass
    # memory:// has no OS lock: one warning, then the stage runs (and its checksums still work)
    mem = Store("memory://msae-lock-test")
    with caplog.at_level("WARNING", logger="msae.store_lock"):
        def compute():
            mem.write_bytes(b"p", "concepts", SAE_PART, "proposals.parquet")
            return "v", {}

        for version in ("c1", "c2"):  # two computes, each "locked"
            m = _run_stage(mem, "concepts", compute, partition=SAE_PART, version=version)
    assert sum("no OS lock" in r.getMessage() for r in caplog.records) == 1
    assert set(m.outputs) == {"concepts/layer=0/width=16/proposals.parquet"}
    mem.rm("")


def test_concurrent_write_bytes_of_one_target_never_collide(tmp_path):
    store = Store(str(tmp_path / "store"))
    payloads = [bytes([i]) * (256 << 10) for i in range(2)]
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for _ in range(150):
                store.write_bytes(payloads[i], "tokens.parquet")
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert (tmp_path / "store" / "tokens.parquet").read_bytes() in payloads  # one whole write, never a mix
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["tokens.parquet"]  # no temp file left


def test_failed_token_table_concat_leaves_no_temp_file(tmp_path):
    from msae.extract.token_map import TOKEN_SCHEMA
    from msae.extract.writer import concat_parts, part_name

    store = Store(str(tmp_path / "store"))
    store.write_parquet(pl.DataFrame(schema=TOKEN_SCHEMA), part_name(0))
    with pytest.raises(FileNotFoundError):  # part 1 is missing (another writer removed _progress/)
        concat_parts(store, [0, 1], TOKEN_SCHEMA, store.TOKENS)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["_progress"]


# --- checksums of stage outputs -----------------------------------------------------------------------
def _stats_stage(store: Store, calls: list, values: np.ndarray):
    folder = f"latents/{SAE_PART}"

    def compute():
        calls.append(1)
        store.write_parquet(pl.DataFrame({"latent": np.arange(len(values)), "freq": values}), folder, "stats.parquet")
        store.write_json({"n": len(values)}, folder, "summary.json")
        store.write_bytes(b"scratch", folder, "_progress", "pass1.npz")  # resumable scratch: not an output
        return "v1", {"n": len(values)}

    return _run_stage(store, "latent_stats", compute, partition=SAE_PART)


def test_flipped_bytes_in_an_output_fail_the_downstream_read_naming_file_and_stage(tmp_path):
    store = Store(str(tmp_path / "store"))
    calls: list = []
    values = np.linspace(0, 1, 4096)
    _stats_stage(store, calls, values)
    assert upstream_version(store, "latent_stats", SAE_PART) == "v1"
    stats = tmp_path / "store" / "latents" / SAE_PART / "stats.parquet"
    expected = hashlib.sha256(stats.read_bytes()).hexdigest()
    _flip(stats)
    with pytest.raises(RuntimeError) as err:
        upstream_version(store, "latent_stats", SAE_PART)
    msg = str(err.value)
    assert f"latents/{SAE_PART}/stats.parquet" in msg and f"latent_stats[{SAE_PART}]" in msg
    assert expected[:12] in msg and hashlib.sha256(stats.read_bytes()).hexdigest()[:12] in msg
    assert "--partition '0|16'" in msg  # what to re-run
    recorded = load_manifest(store, "latent_stats", SAE_PART).outputs  # scratch (_progress/) is no output
    assert set(recorded) == {f"latents/{SAE_PART}/stats.parquet", f"latents/{SAE_PART}/summary.json"}
    # re-running the upstream sees the damage and recomputes; then the downstream read passes
    m = _stats_stage(store, calls, values)
    assert calls == [1, 1] and m.metadata["reused"] is False
    assert upstream_version(store, "latent_stats", SAE_PART) == "v1"


def test_deleted_or_changed_output_recomputes_instead_of_reusing(tmp_path):
    store = Store(str(tmp_path / "store"))
    calls: list = []
    values = np.arange(64, dtype=np.float64)
    assert _stats_stage(store, calls, values).metadata["reused"] is False
    assert _stats_stage(store, calls, values).metadata["reused"] is True
    assert calls == [1]
    (tmp_path / "store" / "latents" / SAE_PART / "summary.json").unlink()
    assert _stats_stage(store, calls, values).metadata["reused"] is False
    assert calls == [1, 1]
    assert (tmp_path / "store" / "latents" / SAE_PART / "summary.json").exists()
    # scratch is not an output: removing it changes nothing
    (tmp_path / "store" / "latents" / SAE_PART / "_progress" / "pass1.npz").unlink()
    assert _stats_stage(store, calls, values).metadata["reused"] is True
    assert calls == [1, 1]


def _activations(store: Store, rows: int = 64, d: int = 8, chunk: int = 16) -> np.ndarray:
    """A layer-0 activation array of several equally shaped chunks, its token table and manifest
    (as the activations asset records them)."""
    import zarr

    from msae.manifest import Manifest, save_manifest

    data = np.arange(rows * d, dtype=np.float16).reshape(rows, d)
    arr = zarr.create_array(store=store.zarr_store(store.activations_name(0)), shape=data.shape,
                            chunks=(chunk, d), dtype=data.dtype, overwrite=True)
    arr[:] = data
    store.write_parquet(pl.DataFrame({"row": np.arange(rows)}), store.TOKENS)
    store.write_json({"complete": True, "n_rows": rows}, "_progress", "extraction.json")
    save_manifest(store, Manifest("activations", fingerprint("a1"), "act-v1", {"layer": 0, "rows": rows}), "0")
    return data


def test_swapped_zarr_chunks_are_detected(tmp_path):
    import zarr

    store = Store(str(tmp_path / "store"))
    data = _activations(store)
    layer = tmp_path / "store" / "activations" / "layer=0.zarr"
    a, b = layer / "c" / "0" / "0", layer / "c" / "1" / "0"
    tmp = layer / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    # zarr itself reads the swapped chunks without complaint: rows 0-15 now hold rows 16-31
    read = zarr.open_array(store=store.zarr_store(store.activations_name(0), read_only=True), mode="r")[:]
    assert np.array_equal(read[:16], data[16:32])
    with pytest.raises(RuntimeError) as err:
        upstream_version(store, "activations", "0")
    msg = str(err.value)
    assert "activations/layer=0.zarr/c/0/0" in msg and "activations/layer=0.zarr/c/1/0" in msg
    assert "activations[0]" in msg and "--select activations --partition '0'" in msg


def test_corrupt_zarr_chunk_is_named_and_damaged_activations_start_over(tmp_path):
    store = Store(str(tmp_path / "store"))
    _activations(store)
    chunk = tmp_path / "store" / "activations" / "layer=0.zarr" / "c" / "2" / "0"
    chunk.write_bytes(b"\x00" * 7)
    with pytest.raises(RuntimeError, match=r"activations/layer=0\.zarr/c/2/0 changed \(sha256 expected [0-9a-f]{12}"):
        upstream_version(store, "activations", "0")
    from msae.manifest import check_manifest, reset_if_damaged

    m, why = check_manifest(store, "activations", fingerprint("a1"), "0")
    assert m is None and "activations/layer=0.zarr/c/2/0" in why
    # the extractor reuses arrays its progress record calls complete: the record goes, so it starts over
    assert reset_if_damaged(store, "activations", ["0"]) == ["_progress/extraction.json"]
    assert not store.exists("_progress", "extraction.json")


def test_manifest_without_checksums_still_loads_and_is_accepted_with_a_warning(tmp_path, caplog):
    from msae.manifest import check_manifest

    store = Store(str(tmp_path / "store"))
    store.write_bytes(b"old", "sae", SAE_PART, "sae.safetensors")
    store.write_json({"stage": "sae", "fingerprint": fingerprint("c1"), "data_version": "old-v", "metadata": {}},
                     manifest_name("sae", SAE_PART))  # written before checksums existed
    with caplog.at_level("WARNING", logger="msae.integrity"):
        assert upstream_version(store, "sae", SAE_PART) == "old-v"
        m, why = check_manifest(store, "sae", fingerprint("c1"), SAE_PART)
    assert m is not None and m.outputs is None and "unverified" in why
    assert any("predates output checksums" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_real_stage_output_damage_is_caught_downstream_and_recomputed(tiny_config_data):
    """`vqa_samples` through Dagster: a flipped byte in samples.parquet stops `activations` from
    reading it, and materializing `vqa_samples` again recomputes instead of reusing."""
    import dagster as dg

    from msae.config import parse_config
    from msae_assets.definitions import build_definitions

    cfg = parse_config(tiny_config_data)
    defs = build_definitions(cfg)
    asset = next(a for a in defs.assets if a.key.to_user_string() == "vqa_samples")
    store = Store(cfg.store)
    with dg.instance_for_test() as instance:
        def materialize() -> dict:
            result = dg.materialize([asset], instance=instance, resources=defs.resources)
            assert result.success
            return {k: v.value for k, v in result.asset_materializations_for_node("vqa_samples")[-1].metadata.items()}

        assert materialize()["reused"] is False
        version = upstream_version(store, "vqa_samples")
        _flip(Path(store.path(store.SAMPLES)))
        with pytest.raises(RuntimeError, match=r"upstream stage vqa_samples .*samples\.parquet changed"):
            upstream_version(store, "vqa_samples")
        recorded = load_manifest(store, "vqa_samples").outputs
        assert "samples.parquet" in recorded and any(p.startswith("world/") for p in recorded)
        assert materialize()["reused"] is False
        assert upstream_version(store, "vqa_samples") == version  # same samples, same data version
        assert materialize()["reused"] is True
