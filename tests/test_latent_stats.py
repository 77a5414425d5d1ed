"""The streaming latent-stats pass against a brute-force dense computation, and the paper's ranking rule."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from msae.config import LatentsConfig
from msae.latents.stats import compute_latent_stats, select_latents
from msae.sae.model import SparseCoder

GRID = 3  # 3×3 base grid


def _token_table(n_samples: int, rng: np.random.Generator) -> pl.DataFrame:
    """Samples laid out as the extractor writes them: template, base patches, a tile patch, text."""
    rows = []
    for s in range(n_samples):
        pos = 0

        def add(**kw):
            nonlocal pos
            rows.append({"sample_index": s, "sample_id": f"s{s}", "position": pos, "token": kw.get("token"),
                         "modality": kw["modality"], "view": kw.get("view"), "grid_row": kw.get("r"),
                         "grid_col": kw.get("c"), "role": kw.get("role")})
            pos += 1

        add(modality="special", token="<s>", role="template")
        add(modality="text", token="user", role="template")
        for r in range(GRID):
            for c in range(GRID):
                add(modality="image", view="base", r=r, c=c)
        add(modality="image", view="tile", r=0, c=0)
        add(modality="image", view="newline")
        for _ in range(int(rng.integers(2, 5))):
            add(modality="text", token=f"w{int(rng.integers(0, 9))}", role="question")
        add(modality="text", token="ans", role="answer")
    return pl.DataFrame(rows, schema={"sample_index": pl.Int32, "sample_id": pl.Utf8, "position": pl.Int32,
                                      "token": pl.Utf8, "modality": pl.Utf8, "view": pl.Utf8,
                                      "grid_row": pl.Int32, "grid_col": pl.Int32, "role": pl.Utf8})


def _dense_acts(sae: SparseCoder, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        enc = sae.encode(torch.from_numpy(x))
    dense = np.zeros((len(x), sae.num_latents), dtype=np.float32)
    np.put_along_axis(dense, enc.indices.numpy(), enc.values.numpy(), axis=1)
    return dense


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    tokens = _token_table(23, rng)
    x = rng.normal(size=(tokens.height, 12)).astype(np.float32)
    sae = SparseCoder(12, 40, k=4)
    sae.reset_parameters(seed=3)
    return tokens, x, sae, _dense_acts(sae, x)


def _brute_force(tokens: pl.DataFrame, dense: np.ndarray, ranking: str, top_k: int, fraction: float = 0.0):
    """Per sample and latent, the obvious loops (the reference approach)."""
    mod = tokens["modality"].to_numpy()
    base = (tokens["view"] == "base").fill_null(False).to_numpy()
    text_ok = (mod == "text") & (tokens["role"] != "template").fill_null(True).to_numpy()
    sidx = tokens["sample_index"].to_numpy()
    img_rank, txt_rank = {}, {}
    for lat in range(dense.shape[1]):
        img, txt = [], []
        for s in np.unique(sidx):
            a = dense[sidx == s, lat]
            b = a[base[sidx == s]]
            count, mean, mx = int((b > fraction * b.max()).sum()) if b.max() > 0 else 0, float(b.mean()), float(b.max())
            if count:
                key = {"active_patches": (count, mean), "max": (mx,), "mean": (mean,)}[ranking]
                img.append((key, int(s)))
            t = a[text_ok[sidx == s]]
            if (t > 0).any():
                txt.append(((float(t.max()),), int(s)))
        img_rank[lat] = [s for _, s in sorted(img, key=lambda e: (tuple(-v for v in e[0]), e[1]))[:top_k]]
        txt_rank[lat] = [s for _, s in sorted(txt, key=lambda e: (-e[0][0], e[1]))[:top_k]]
    return img_rank, txt_rank


@pytest.mark.parametrize("ranking", ["active_patches", "max", "mean"])
@pytest.mark.parametrize("batch_samples", [1, 4, 64])
def test_streaming_pass_matches_brute_force(world, ranking, batch_samples):
    tokens, x, sae, dense = world
    cfg = LatentsConfig(top_k=3, ranking=ranking, batch_samples=batch_samples)
    r = compute_latent_stats(sae, x, tokens, cfg)
    img_rank, txt_rank = _brute_force(tokens, dense, ranking, 3)

    mod = tokens["modality"].to_numpy()
    stats = r.stats.sort("latent")
    img, txt = dense[mod == "image"], dense[mod == "text"]
    np.testing.assert_array_equal(stats["fires_image"].to_numpy(), (img > 0).sum(0))
    np.testing.assert_array_equal(stats["fires_text"].to_numpy(), (txt > 0).sum(0))
    np.testing.assert_allclose(stats["mean_image"].to_numpy(), img.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["max_text"].to_numpy(), txt.max(0), rtol=1e-6)
    assert stats["dead"].to_list() == ((img > 0).sum(0) + (txt > 0).sum(0) == 0).tolist()

    top = r.top_examples
    for lat in stats.filter(pl.col("explained"))["latent"].to_list():
        got_img = top.filter((pl.col("latent") == lat) & (pl.col("modality") == "image")).sort("rank")
        got_txt = top.filter((pl.col("latent") == lat) & (pl.col("modality") == "text")).sort("rank")
        assert len(got_img) == len(img_rank[lat]) and len(got_txt) == len(txt_rank[lat])
        assert got_img["sample_index"].to_list() == img_rank[lat]
        assert got_txt["sample_index"].to_list() == txt_rank[lat]


def test_top_example_payload_is_exact(world):
    tokens, x, sae, dense = world
    r = compute_latent_stats(sae, x, tokens, LatentsConfig(top_k=2))
    sidx = tokens["sample_index"].to_numpy()
    for row in r.top_examples.iter_rows(named=True):
        mask = sidx == row["sample_index"]
        acts = dense[mask, row["latent"]]
        sub = tokens.filter(pl.col("sample_index") == row["sample_index"])
        if row["modality"] == "image":
            base = (sub["view"] == "base").fill_null(False).to_numpy()
            grid = np.zeros((GRID, GRID), np.float32)
            grid[sub["grid_row"].fill_null(0).to_numpy()[base], sub["grid_col"].fill_null(0).to_numpy()[base]] = acts[base]
            np.testing.assert_allclose(np.reshape(row["patch_activations"], (GRID, GRID)), grid, rtol=1e-6)
            assert row["active_count"] == int((grid > 0).sum())
            assert row["mean_activation"] == pytest.approx(grid.mean(), rel=1e-5)
            assert (row["grid_rows"], row["grid_cols"]) == (GRID, GRID)
            assert row["score"] == pytest.approx(row["active_count"] + grid.mean() / (1 + grid.mean()))
        else:
            text = (sub["modality"] == "text").to_numpy()
            assert row["text_positions"] == sub["position"].to_numpy()[text].tolist()
            np.testing.assert_allclose(row["text_activations"], acts[text], rtol=1e-6)
            eligible = text & (sub["role"] != "template").fill_null(True).to_numpy()
            peak = sub["position"].to_numpy()[np.argmax(np.where(eligible, acts, -np.inf))]
            assert row["peak_position"] == peak and row["score"] == pytest.approx(acts[eligible].max(), rel=1e-6)


def test_paper_ranking_prefers_more_patches_over_higher_mean():
    """Active-patches ranking: 3 weakly active patches beat 1 strongly active one; ties go to the mean."""
    tokens = _token_table(3, np.random.default_rng(1))
    sae = SparseCoder(2, 2, k=1)
    with torch.no_grad():  # latent 0 reads dimension 0, latent 1 dimension 1
        sae.encoder.weight.copy_(torch.eye(2)); sae.encoder.bias.zero_(); sae.b_dec.zero_()
        sae.W_dec.copy_(torch.eye(2))
    x = np.zeros((tokens.height, 2), np.float32)
    x[:, 1] = 0.001  # latent 1 wins top-1 where latent 0 is silent
    base = (tokens["view"] == "base").fill_null(False).to_numpy()
    sidx = tokens["sample_index"].to_numpy()
    rows = {s: np.flatnonzero(base & (sidx == s)) for s in range(3)}
    x[rows[0][:1], 0] = 100.0          # sample 0: one patch, huge
    x[rows[1][:3], 0] = 1.0            # sample 1: three patches, weak
    x[rows[2][:3], 0] = 2.0            # sample 2: three patches, stronger -> first
    r = compute_latent_stats(sae, x, tokens, LatentsConfig(top_k=3))
    got = r.top_examples.filter((pl.col("latent") == 0) & (pl.col("modality") == "image")).sort("rank")
    assert got["sample_index"].to_list() == [2, 1, 0]
    by_max = compute_latent_stats(sae, x, tokens, LatentsConfig(top_k=3, ranking="max")).top_examples
    assert by_max.filter((pl.col("latent") == 0) & (pl.col("modality") == "image")).sort("rank")[
        "sample_index"].to_list() == [0, 2, 1]


def test_selection_and_nonfinite_rows_are_counted(world):
    tokens, x, sae, _ = world
    assert select_latents(10, LatentsConfig(select="first", n=4)).tolist() == [True] * 4 + [False] * 6
    a = select_latents(100, LatentsConfig(select="sample", n=7, seed=5))
    assert a.sum() == 7 and (a == select_latents(100, LatentsConfig(select="sample", n=7, seed=5))).all()
    bad = x.copy()
    bad[5] = np.nan
    r = compute_latent_stats(sae, bad, tokens, LatentsConfig(select="first", n=5))
    assert r.summary["skipped_rows"] == 1
    assert set(r.top_examples["latent"].unique().to_list()) <= set(range(5))
    assert r.stats["selected"].sum() == 5


def test_row_count_mismatch_is_a_clear_error(world):
    tokens, x, sae, _ = world
    with pytest.raises(ValueError, match="different runs"):
        compute_latent_stats(sae, x[:-1], tokens, LatentsConfig())


def test_pass_resumes_from_checkpoint_bitwise(world, tmp_path, monkeypatch):
    """A crash after some batches, then a rerun: same result as one uninterrupted pass."""
    import msae.latents.stats as stats_mod

    tokens, x, sae, _ = world
    cfg = LatentsConfig(top_k=3, batch_samples=2)
    clean = compute_latent_stats(sae, x, tokens, cfg)
    ckpt = str(tmp_path / "pass1.npz")
    real = stats_mod.encode_rows
    calls = {"n": 0}

    def crashing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(*a, **kw)

    monkeypatch.setattr(stats_mod, "encode_rows", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        compute_latent_stats(sae, x, tokens, cfg, checkpoint=ckpt, checkpoint_every=2, fingerprint="f1")
    monkeypatch.setattr(stats_mod, "encode_rows", real)
    resumed = compute_latent_stats(sae, x, tokens, cfg, checkpoint=ckpt, checkpoint_every=2, fingerprint="f1")
    assert resumed.stats.equals(clean.stats)
    assert resumed.top_examples.equals(clean.top_examples)
    assert resumed.summary["n_text_tokens"] == clean.summary["n_text_tokens"]
    other = compute_latent_stats(sae, x, tokens, cfg, checkpoint=ckpt, fingerprint="other")  # ignored, not reused
    assert other.stats.equals(clean.stats)


def test_active_fraction_counts_only_strong_patches(world):
    """latents.active_fraction: a patch is active above that share of the sample's peak."""
    tokens, x, sae, dense = world
    r = compute_latent_stats(sae, x, tokens, LatentsConfig(top_k=3, active_fraction=0.5))
    img_rank, _ = _brute_force(tokens, dense, "active_patches", 3, fraction=0.5)
    top = r.top_examples.filter(pl.col("modality") == "image")
    for lat in r.stats.filter(pl.col("explained"))["latent"].to_list():
        assert top.filter(pl.col("latent") == lat).sort("rank")["sample_index"].to_list() == img_rank[lat]
    for row in top.iter_rows(named=True):
        acts = np.array(row["patch_activations"])
        assert row["active_threshold"] == pytest.approx(0.5 * acts.max(), rel=1e-6)
        assert row["active_count"] == int((acts > 0.5 * acts.max()).sum())


def test_progress_lines_report_every_tenth_without_changing_the_pass(world):
    """The asset's progress lines (msae.runtime.ProgressReport): one per tenth of the batches, the
    last at 100 %, and the same stats and top examples as a pass without them."""
    tokens, x, sae, _ = world
    cfg = LatentsConfig(top_k=3, batch_samples=1)  # 23 samples: 23 batches
    quiet = compute_latent_stats(sae, x, tokens, cfg)
    lines: list[str] = []
    loud = compute_latent_stats(sae, x, tokens, cfg, report=lines.append)
    assert loud.stats.equals(quiet.stats) and loud.top_examples.equals(quiet.top_examples)
    assert len(lines) == 10 and all(line.startswith("latent stats: batch ") for line in lines)
    assert lines[0].startswith("latent stats: batch 3/23 (13 %)") and lines[-1].startswith("latent stats: batch 23/23 (100 %)")
    assert "left" in lines[0] and "left" not in lines[-1]
