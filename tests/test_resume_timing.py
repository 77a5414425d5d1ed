"""A resumed `latent_stats` pass reports the compute time of all its attempts, not only the last piece.

The pass's clock (``time.perf_counter`` as ``msae.latents.stats`` sees it) is replaced by a fake
one that advances 10 s per encoded batch, so the expected seconds are exact and nothing sleeps.
"""

from __future__ import annotations

import functools
import types

import dagster as dg
import numpy as np
import pytest

import msae.latents.stats as stats_mod
from msae.config import LatentsConfig, parse_config
from msae.latents.stats import compute_latent_stats
from msae.sae.model import SparseCoder
from msae_assets.definitions import build_definitions
from test_latent_stats import _token_table

STEP_S = 10.0


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock for the stats module only; ``encode_rows`` advances it by STEP_S and crashes on call
    ``crash_at`` (0: never)."""
    clock = {"t": 1000.0, "calls": 0, "crash_at": 0}
    monkeypatch.setattr(stats_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["t"]))
    real = stats_mod.encode_rows

    def encode(*a, **kw):
        clock["calls"] += 1
        if clock["calls"] == clock["crash_at"]:
            raise RuntimeError("simulated crash")
        clock["t"] += STEP_S
        return real(*a, **kw)

    monkeypatch.setattr(stats_mod, "encode_rows", encode)
    return clock


def test_resumed_pass_counts_the_interrupted_attempts_time(tmp_path, fake_clock):
    rng = np.random.default_rng(0)
    tokens = _token_table(12, rng)
    x = rng.normal(size=(tokens.height, 12)).astype(np.float32)
    sae = SparseCoder(12, 40, k=4)
    sae.reset_parameters(seed=3)
    cfg = LatentsConfig(top_k=3, batch_samples=2)  # 6 batches
    ckpt = str(tmp_path / "pass1.npz")
    run = functools.partial(compute_latent_stats, sae, x, tokens, cfg, checkpoint=ckpt, checkpoint_every=2,
                            fingerprint="f1")

    clean = compute_latent_stats(sae, x, tokens, cfg)  # no checkpoint: 6 batches in one go
    assert clean.summary["seconds"] == 6 * STEP_S

    # crash while encoding batch 5 (index 4): the checkpoint before it holds 4 batches = 40 s of work
    fake_clock["calls"], fake_clock["crash_at"] = 0, 5
    with pytest.raises(RuntimeError, match="simulated"):
        run()
    fake_clock["crash_at"] = 0
    resumed = run()
    s = resumed.summary
    assert s["seconds"] >= 4 * STEP_S  # at least what was spent before the interruption
    assert s["seconds"] == 6 * STEP_S  # 40 s before the interruption + 20 s now
    assert s["seconds_this_run"] == 2 * STEP_S  # only the last two batches ran now
    assert s["resumed_batches"] == 4
    assert clean.summary["seconds_this_run"] == clean.summary["seconds"] and clean.summary["resumed_batches"] == 0
    assert s["tokens_per_s"] == pytest.approx(tokens.height / (6 * STEP_S), abs=0.05)  # rounded to 0.1
    assert resumed.stats.equals(clean.stats)

    # a checkpoint written by older code (no elapsed time) still resumes, counting only this run
    with np.load(ckpt) as z:
        old = {k: z[k] for k in z.files if k != "elapsed_s"}
    np.savez(ckpt, **old)  # the final checkpoint: every batch done
    again = run()
    assert again.summary["resumed_batches"] == 6 and again.summary["seconds"] == again.summary["seconds_this_run"]


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets}


def test_latent_stats_asset_metadata_after_a_resume(tiny_config_data, fake_clock, monkeypatch):
    """Through Dagster: a materialization that crashes mid-pass, then one that resumes; the second's
    metadata carries the total seconds (both attempts) and this run's share."""

    data = {**tiny_config_data, "layers": [2], "widths": [16], "latents": {"cards": 2, "batch_samples": 1},
            "controls": {"random_sae": False, "dissection_oracle": False}}
    cfg = parse_config(data)
    defs = build_definitions(cfg)
    assets = _assets(defs)
    # the stage imports the pass when it runs (so a reused stage never imports torch): patch it there
    monkeypatch.setattr(stats_mod, "compute_latent_stats",
                        functools.partial(compute_latent_stats, checkpoint_every=2))

    def materialize(names, partition=None, *, ok=True):
        r = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                           partition_key=partition, selection=names, raise_on_error=False)
        assert r.success is ok
        return r

    with dg.instance_for_test() as instance:
        materialize(["vqa_samples"])
        materialize(["activations"], "2")
        materialize(["sae"], "2|16")
        fake_clock["calls"], fake_clock["crash_at"] = 0, 5  # checkpoint after 4 batches (40 s), crash in the 5th
        materialize(["latent_stats"], "2|16", ok=False)
        fake_clock["crash_at"] = 0
        r = materialize(["latent_stats"], "2|16")
    meta = {k: v.value for k, v in r.asset_materializations_for_node("latent_stats")[-1].metadata.items()}
    n_batches = meta["n_samples"]  # one sample per batch
    assert n_batches > 5 and meta["reused"] is False
    assert meta["seconds"] >= 4 * STEP_S  # the 40 s spent before the interruption count
    assert meta["seconds"] == n_batches * STEP_S
    assert meta["seconds_this_run"] == (n_batches - 4) * STEP_S and meta["resumed_batches"] == 4
    assert meta["tokens_per_s"] == pytest.approx(meta["n_tokens"] / (n_batches * STEP_S), abs=0.05)
