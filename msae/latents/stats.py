"""Per-latent statistics and top examples in one streaming, memory-bounded pass.

Pass 1 walks the layer's activations a batch of whole samples at a time, encodes them with the
SAE (sparse codes only: ``[rows, k]``), and updates

* per-latent accumulators (firing counts, sums, maxima on image and on text tokens), and
* for the selected latents, a running top-``K`` of samples per modality, merged with the batch's
  candidates by one ``topk`` over a dense ``[latents, K + batch samples]`` score matrix.

Pass 2 re-encodes only the rows of the samples that ended in some top list and reads off what the
renderers need (activation on each base-grid patch, on each text token). Memory depends on the
number of latents, ``K`` and the batch size, never on the number of tokens; the token table is read
in row slices alongside the activations. Formats: ``docs/formats.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.config import LatentsConfig
from msae.sae.model import SparseCoder

log = logging.getLogger(__name__)

IMAGE, TEXT, OTHER = 0, 1, 2
TOKEN_COLUMNS = ("sample_index", "sample_id", "position", "modality", "view", "grid_row", "grid_col", "role")


# --- which latents -------------------------------------------------------------------------------
def select_latents(num_latents: int, cfg: LatentsConfig) -> np.ndarray:
    """Boolean mask of the latents to analyse: all, the first ``n`` (the paper: 5,000) or a seeded sample."""
    mask = np.zeros(num_latents, dtype=bool)
    if cfg.select == "all":
        mask[:] = True
    elif cfg.select == "first":
        mask[: min(cfg.n or num_latents, num_latents)] = True
    else:
        n = min(cfg.n or num_latents, num_latents)
        mask[np.random.default_rng(cfg.seed).choice(num_latents, size=n, replace=False)] = True
    return mask


# --- the token table, a row slice at a time ------------------------------------------------------
@dataclass(frozen=True)
class SampleLayout:
    """Where each sample's rows are, and how many base-grid patches it has."""

    sample_index: np.ndarray
    sample_id: np.ndarray
    row_start: np.ndarray
    row_count: np.ndarray
    n_base: np.ndarray
    grid_rows: int
    grid_cols: int

    @property
    def n_samples(self) -> int:
        return len(self.sample_index)

    @property
    def n_rows(self) -> int:
        return int(self.row_start[-1] + self.row_count[-1]) if self.n_samples else 0


def sample_layout(tokens: pl.LazyFrame) -> SampleLayout:
    """Per-sample row ranges (rows must be grouped by sample, as the extractor writes them)."""
    agg = (
        tokens.with_row_index("_row")
        .group_by("sample_index", maintain_order=True)
        .agg(pl.col("sample_id").first(), pl.col("_row").min().alias("start"), pl.len().alias("count"),
             pl.col("_row").max().alias("stop"), (pl.col("view") == "base").sum().alias("n_base"),
             pl.col("grid_row").filter(pl.col("view") == "base").max().alias("gr"),
             pl.col("grid_col").filter(pl.col("view") == "base").max().alias("gc"))
        .collect()
    )
    if agg.height and (agg["stop"] - agg["start"] + 1 != agg["count"]).any():
        bad = agg.filter(pl.col("stop") - pl.col("start") + 1 != pl.col("count"))["sample_id"][0]
        raise ValueError(f"tokens.parquet: rows of sample {bad!r} are not contiguous; re-run `activations`")
    gr = agg["gr"].drop_nulls()
    gc = agg["gc"].drop_nulls()
    return SampleLayout(
        agg["sample_index"].to_numpy(), agg["sample_id"].to_numpy(), agg["start"].to_numpy().astype(np.int64),
        agg["count"].to_numpy().astype(np.int64), agg["n_base"].to_numpy().astype(np.int64),
        int(gr.max()) + 1 if len(gr) else 0, int(gc.max()) + 1 if len(gc) else 0,
    )


@dataclass(frozen=True)
class RowInfo:
    """What the pass needs per activation row of one batch."""

    local_sample: np.ndarray  # [rows] index of the row's sample within the batch
    modality: np.ndarray      # IMAGE / TEXT / OTHER
    base_cell: np.ndarray     # grid_row * grid_cols + grid_col for base-view rows, else -1
    eligible_text: np.ndarray # text row that may be a peak (template excluded unless asked)
    position: np.ndarray


def row_info(frame: pl.DataFrame, starts: np.ndarray, counts: np.ndarray, grid_cols: int,
             include_template: bool) -> RowInfo:
    local = np.repeat(np.arange(len(counts)), counts)
    mod = frame["modality"].to_numpy()
    modality = np.where(mod == "image", IMAGE, np.where(mod == "text", TEXT, OTHER)).astype(np.int8)
    base = (frame["view"] == "base").fill_null(False).to_numpy()
    cell = np.where(base, frame["grid_row"].fill_null(0).to_numpy().astype(np.int64) * grid_cols
                    + frame["grid_col"].fill_null(0).to_numpy(), -1)
    is_template = (frame["role"] == "template").fill_null(False).to_numpy()
    eligible = (modality == TEXT) & (include_template | ~is_template)
    return RowInfo(local, modality, cell, eligible, frame["position"].to_numpy())


class TokenSlices:
    """Row slices of tokens.parquet: lazily from a local file, else from a frame held in memory."""

    def __init__(self, source: str | pl.DataFrame) -> None:
        self._frame = source if isinstance(source, pl.DataFrame) else None
        self._lazy = source.lazy() if isinstance(source, pl.DataFrame) else pl.scan_parquet(source)
        self._lazy = self._lazy.select(TOKEN_COLUMNS)

    @property
    def lazy(self) -> pl.LazyFrame:
        return self._lazy

    def rows(self, start: int, stop: int) -> pl.DataFrame:
        if self._frame is not None:
            return self._frame.slice(start, stop - start).select(TOKEN_COLUMNS)
        return self._lazy.slice(start, stop - start).collect()


# --- encoding ------------------------------------------------------------------------------------
def encode_rows(sae: SparseCoder, x: np.ndarray, device: str, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes of ``x`` (values [n, k], indices [n, k]) in chunks of ``max_rows``."""
    vals, idxs = [], []
    with torch.inference_mode():
        for i in range(0, len(x), max_rows):
            xb = torch.from_numpy(np.ascontiguousarray(x[i: i + max_rows], dtype=np.float32)).to(device)
            enc = sae.encode(xb)
            vals.append(enc.values.float())
            idxs.append(enc.indices)
    if not vals:
        k = sae.k
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(vals), torch.cat(idxs)


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


# --- pass 1 state --------------------------------------------------------------------------------
@dataclass
class _TopK:
    """A running top-K of (score, sample) per selected latent, merged batch by batch."""

    n: int
    k: int
    score: torch.Tensor = field(init=False)
    sample: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.score = torch.full((self.n, self.k), -np.inf, dtype=torch.float64)
        self.sample = torch.full((self.n, self.k), -1, dtype=torch.long)

    def merge(self, sel_row: torch.Tensor, local: torch.Tensor, score: torch.Tensor, samples: torch.Tensor) -> None:
        """Candidates: (selected-latent row, batch-local sample, score); ``samples`` maps local → global."""
        if len(sel_row) == 0:
            return
        s = int(samples.numel())
        dense = torch.full((self.n, s), -np.inf, dtype=torch.float64)
        dense[sel_row, local] = score
        cand_sample = samples.unsqueeze(0).expand(self.n, s)
        all_score = torch.cat([self.score, dense], dim=1)
        all_sample = torch.cat([self.sample, cand_sample], dim=1)
        top = all_score.topk(self.k, dim=1)
        self.score, self.sample = top.values, all_sample.gather(1, top.indices)


def _rank_key(ranking: str, count: torch.Tensor, total: torch.Tensor, peak: torch.Tensor,
              n_base: torch.Tensor) -> torch.Tensor:
    mean = total / n_base.clamp(min=1)
    if ranking == "active_patches":  # lexicographic: count first, mean breaks ties (mean/(1+mean) < 1)
        return count + mean / (1.0 + mean)
    if ranking == "max":
        return peak
    return mean


def _group(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique keys with count, sum and max of their values."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    n = len(uniq)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, torch.ones_like(values, dtype=torch.float64))
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, values.double())
    peak = torch.zeros(n, dtype=torch.float64).scatter_reduce_(0, inv, values.double(), "amax", include_self=False)
    return uniq, count, total, peak


@dataclass(frozen=True)
class LatentStatsResult:
    stats: pl.DataFrame
    top_examples: pl.DataFrame
    summary: dict[str, Any]


def _sample_batches(layout: SampleLayout, batch_samples: int) -> Iterator[tuple[int, int]]:
    for i in range(0, layout.n_samples, batch_samples):
        yield i, min(i + batch_samples, layout.n_samples)


def compute_latent_stats(
    sae: SparseCoder,
    array: Any,
    tokens: str | pl.DataFrame,
    cfg: LatentsConfig,
    *,
    device: str = "cpu",
    max_rows: int = 8192,
    progress: bool = False,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    fingerprint: str = "",
) -> LatentStatsResult:
    """Stats of every latent and top examples of the selected, non-dead ones (module doc).

    ``array``: the layer's activations (rows aligned with ``tokens``, raw scale: the SAE folds its
    input normalisation in); ``tokens``: path of a local tokens.parquet or the table itself.
    ``checkpoint``: local file where pass 1 saves its state every ``checkpoint_every`` batches; a
    rerun with the same ``fingerprint`` (SAE + settings) resumes from it instead of starting over.
    """
    t0 = time.perf_counter()
    sae = sae.to(device).eval()
    slices = TokenSlices(tokens)
    layout = sample_layout(slices.lazy)
    if layout.n_rows != array.shape[0]:
        raise ValueError(f"tokens.parquet has {layout.n_rows} rows but the activations have {array.shape[0]}: "
                         "they come from different runs; re-run `activations`")
    W = sae.num_latents
    selected = select_latents(W, cfg)
    sel_rows = np.full(W, -1, dtype=np.int64)
    sel_rows[selected] = np.arange(int(selected.sum()))
    sel_rows_t = torch.from_numpy(sel_rows)
    K = cfg.top_k
    top_img, top_txt = _TopK(int(selected.sum()), K), _TopK(int(selected.sum()), K)
    acc = {k: torch.zeros(W, dtype=torch.float64) for k in ("fires_image", "fires_text", "sum_image", "sum_text")}
    acc |= {k: torch.zeros(W, dtype=torch.float32) for k in ("max_image", "max_text")}
    n_image = n_text = n_skipped = 0
    n_base_all = torch.from_numpy(layout.n_base.astype(np.float64))
    n_cells = layout.grid_rows * layout.grid_cols

    batches = list(_sample_batches(layout, cfg.batch_samples))
    state = {"acc": acc, "top_img": top_img, "top_txt": top_txt}
    done, counts = _load_checkpoint(checkpoint, fingerprint, state)
    if done:
        n_image, n_text, n_skipped = counts
        log.info("latent stats: resuming after %d of %d batches from %s", done, len(batches), checkpoint)
    bar = _progress(batches[done:], progress, "latent stats")
    for b, (s0, s1) in enumerate(bar, start=done):
        if checkpoint and b > done and (b - done) % checkpoint_every == 0:
            _save_checkpoint(checkpoint, fingerprint, state, b, (n_image, n_text, n_skipped))
        r0, r1 = int(layout.row_start[s0]), int(layout.row_start[s1 - 1] + layout.row_count[s1 - 1])
        info = row_info(slices.rows(r0, r1), layout.row_start[s0:s1], layout.row_count[s0:s1],
                        layout.grid_cols, cfg.text_include_template)
        x = np.asarray(array[r0:r1], dtype=np.float32)
        finite = _finite_rows(x)
        if not finite.all():
            bad = int((~finite).sum())
            n_skipped += bad
            log.warning("latent stats: %d rows with NaN/inf activations in samples %s…%s skipped",
                        bad, layout.sample_id[s0], layout.sample_id[s1 - 1])
            x = np.where(finite[:, None], x, 0.0)
        modality = np.where(finite, info.modality, OTHER)
        n_image += int((modality == IMAGE).sum())
        n_text += int((modality == TEXT).sum())
        values, indices = encode_rows(sae, x, device, max_rows)
        values, indices = values.cpu(), indices.cpu()
        rows = torch.arange(len(x)).unsqueeze(1).expand_as(indices).reshape(-1)
        v, lat = values.reshape(-1), indices.reshape(-1)
        on = v > 0
        rows, v, lat = rows[on], v[on], lat[on]
        mod_t = torch.from_numpy(modality)[rows]
        for code, name in ((IMAGE, "image"), (TEXT, "text")):
            m = mod_t == code
            acc[f"fires_{name}"].index_add_(0, lat[m], torch.ones(int(m.sum()), dtype=torch.float64))
            acc[f"sum_{name}"].index_add_(0, lat[m], v[m].double())
            acc[f"max_{name}"].scatter_reduce_(0, lat[m], v[m], "amax")
        # candidates for the top lists: only selected latents
        srow = sel_rows_t[lat]
        keep = srow >= 0
        rows, v, lat, srow = rows[keep], v[keep], lat[keep], srow[keep]
        local = torch.from_numpy(info.local_sample)[rows]
        n_local = s1 - s0
        globals_ = torch.arange(s0, s1)
        base = torch.from_numpy(info.base_cell >= 0)[rows] & torch.from_numpy(finite)[rows]
        if base.any():
            keys = srow[base] * n_local + local[base]
            uniq, count, total, peak = _group(keys, v[base])
            u_srow, u_local = uniq // n_local, uniq % n_local
            score = _rank_key(cfg.ranking, count, total, peak, n_base_all[s0:s1][u_local])
            top_img.merge(u_srow, u_local, score, globals_)
        txt = torch.from_numpy(info.eligible_text & finite)[rows]
        if txt.any():
            keys = srow[txt] * n_local + local[txt]
            uniq, _, _, peak = _group(keys, v[txt])
            top_txt.merge(uniq // n_local, uniq % n_local, peak, globals_)

    if checkpoint:
        _save_checkpoint(checkpoint, fingerprint, state, len(batches), (n_image, n_text, n_skipped))
    stats = _stats_frame(acc, selected, n_image, n_text)
    explained_mask = stats["explained"].to_numpy()[selected]
    top = _gather_top(sae, array, slices, layout, top_img, top_txt, np.flatnonzero(selected), explained_mask,
                      cfg, device, max_rows, n_cells)
    seconds = time.perf_counter() - t0
    summary = {
        "n_tokens": layout.n_rows, "n_image_tokens": n_image, "n_text_tokens": n_text, "n_samples": layout.n_samples,
        "skipped_rows": n_skipped, "num_latents": W, "selected": int(selected.sum()),
        "dead": int(stats["dead"].sum()), "explained": int(stats["explained"].sum()),
        "grid": f"{layout.grid_rows}x{layout.grid_cols}", "seconds": round(seconds, 2),
        "tokens_per_s": round(layout.n_rows / max(seconds, 1e-9), 1),
    }
    return LatentStatsResult(stats, top, summary)


def _save_checkpoint(path: str, fingerprint: str, state: dict, batches_done: int, counts: tuple) -> None:
    """Atomically write pass 1's state (plain arrays, no pickle)."""
    import os

    arrays = {f"acc_{k}": v.numpy() for k, v in state["acc"].items()}
    for name in ("top_img", "top_txt"):
        arrays[f"{name}_score"] = state[name].score.numpy()
        arrays[f"{name}_sample"] = state[name].sample.numpy()
    arrays["meta"] = np.array([batches_done, *counts], dtype=np.int64)
    arrays["fingerprint"] = np.array(fingerprint)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _load_checkpoint(path: str | None, fingerprint: str, state: dict) -> tuple[int, tuple[int, int, int]]:
    """Restore ``state`` in place; (batches done, counts), or (0, …) when there is nothing to resume."""
    import os

    if not path or not os.path.exists(path):
        return 0, (0, 0, 0)
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fingerprint or any(
                z[f"acc_{k}"].shape != v.shape for k, v in state["acc"].items()):
            log.info("latent stats: checkpoint %s is from other settings; starting over", path)
            return 0, (0, 0, 0)
        for k, v in state["acc"].items():
            v.copy_(torch.from_numpy(z[f"acc_{k}"]))
        for name in ("top_img", "top_txt"):
            state[name].score = torch.from_numpy(z[f"{name}_score"].copy())
            state[name].sample = torch.from_numpy(z[f"{name}_sample"].copy())
        meta = z["meta"].tolist()
    return int(meta[0]), (int(meta[1]), int(meta[2]), int(meta[3]))


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return items
    return tqdm(items, desc=desc, unit="batch")


def _stats_frame(acc: dict[str, torch.Tensor], selected: np.ndarray, n_image: int, n_text: int) -> pl.DataFrame:
    a = {k: v.numpy() for k, v in acc.items()}
    fires = a["fires_image"] + a["fires_text"]
    dead = fires == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        freq_i = a["fires_image"] / max(n_image, 1)
        freq_t = a["fires_text"] / max(n_text, 1)
        mean_i = a["sum_image"] / max(n_image, 1)
        mean_t = a["sum_text"] / max(n_text, 1)
        modality_score = np.where(mean_i + mean_t > 0, mean_i / (mean_i + mean_t), np.nan)
        selectivity = np.where(freq_i + freq_t > 0, (freq_i - freq_t) / (freq_i + freq_t), np.nan)
    return pl.DataFrame({
        "latent": np.arange(len(dead), dtype=np.int32), "selected": selected, "dead": dead,
        "explained": selected & ~dead,
        "fires_image": a["fires_image"].astype(np.int64), "fires_text": a["fires_text"].astype(np.int64),
        "freq_image": freq_i, "freq_text": freq_t, "mean_image": mean_i, "mean_text": mean_t,
        "max_image": a["max_image"], "max_text": a["max_text"],
        "modality_score": modality_score, "selectivity": selectivity,
    })


# --- pass 2: what rendering needs, for the top samples only ---------------------------------------
TOP_SCHEMA = {
    "latent": pl.Int32, "modality": pl.Utf8, "rank": pl.Int16, "sample_index": pl.Int32, "sample_id": pl.Utf8,
    "score": pl.Float64, "active_count": pl.Int32, "mean_activation": pl.Float32, "max_activation": pl.Float32,
    "peak_position": pl.Int32, "grid_rows": pl.Int16, "grid_cols": pl.Int16,
    "patch_activations": pl.List(pl.Float32), "text_positions": pl.List(pl.Int32),
    "text_activations": pl.List(pl.Float32),
}


def _gather_top(sae: SparseCoder, array: Any, slices: TokenSlices, layout: SampleLayout, top_img: _TopK,
                top_txt: _TopK, sel_latents: np.ndarray, explained: np.ndarray, cfg: LatentsConfig, device: str,
                max_rows: int, n_cells: int) -> pl.DataFrame:
    """One row per (explained latent, modality, rank), filled from a re-encoding of the top samples."""
    wanted: list[tuple[int, str, int, int, float]] = []  # (latent, modality, rank, sample, score)
    for topk, modality in ((top_img, "image"), (top_txt, "text")):
        sc, sm = topk.score.numpy(), topk.sample.numpy()
        for j in np.flatnonzero(explained):
            for r in range(topk.k):
                if sm[j, r] >= 0 and np.isfinite(sc[j, r]):
                    wanted.append((int(sel_latents[j]), modality, r, int(sm[j, r]), float(sc[j, r])))
    if not wanted:
        return pl.DataFrame(schema=TOP_SCHEMA)
    by_sample: dict[int, list[int]] = {}
    for i, w in enumerate(wanted):
        by_sample.setdefault(w[3], []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(wanted)
    samples = np.array(sorted(by_sample))
    for b in range(0, len(samples), cfg.batch_samples):
        chunk = samples[b: b + cfg.batch_samples]
        # rows of these samples only (not contiguous): read each, encode them together
        spans = [(int(layout.row_start[s]), int(layout.row_count[s])) for s in chunk]
        infos = [row_info(slices.rows(r0, r0 + n), np.array([r0]), np.array([n]), layout.grid_cols,
                          cfg.text_include_template) for r0, n in spans]
        x = np.concatenate([np.asarray(array[r0: r0 + n], dtype=np.float32) for r0, n in spans])
        x = np.where(_finite_rows(x)[:, None], x, 0.0)
        values, indices = encode_rows(sae, x, device, max_rows)
        lats = np.array(sorted({wanted[i][0] for s in chunk for i in by_sample[s]}))
        dense = _dense_columns(values.cpu(), indices.cpu(), lats, sae.num_latents)
        col = {int(lat): c for c, lat in enumerate(lats)}
        offset = 0
        for s, (_, n), info in zip(chunk, spans, infos):
            block = dense[offset: offset + n]
            offset += n
            for i in by_sample[s]:
                latent, modality, rank, _, score = wanted[i]
                out[i] = _example_row(latent, modality, rank, int(s), score, block[:, col[latent]], info, layout,
                                      n_cells)
    return pl.DataFrame([r for r in out if r is not None], schema=TOP_SCHEMA).sort(["latent", "modality", "rank"])


def _dense_columns(values: torch.Tensor, indices: torch.Tensor, latents: np.ndarray, num_latents: int) -> np.ndarray:
    """[rows, len(latents)] activations of just these latents."""
    lookup = np.full(num_latents, -1, dtype=np.int64)
    lookup[latents] = np.arange(len(latents))
    dense = np.zeros((values.shape[0], len(latents)), dtype=np.float32)
    cols = lookup[indices.numpy()]
    r, c = np.nonzero(cols >= 0)
    np.add.at(dense, (r, cols[r, c]), values.numpy()[r, c])
    return dense


def _example_row(latent: int, modality: str, rank: int, s: int, score: float, acts: np.ndarray, info: RowInfo,
                 layout: SampleLayout, n_cells: int) -> dict[str, Any]:
    row: dict[str, Any] = {"latent": latent, "modality": modality, "rank": rank, "sample_index":
                           int(layout.sample_index[s]), "sample_id": str(layout.sample_id[s]), "score": score}
    if modality == "image":
        base = info.base_cell >= 0
        patches = np.zeros(n_cells, dtype=np.float32)
        patches[info.base_cell[base]] = acts[base]
        peak = int(np.argmax(np.where(base, acts, -np.inf)))
        row |= {"active_count": int((patches > 0).sum()), "mean_activation": float(patches.sum() / max(base.sum(), 1)),
                "max_activation": float(patches.max()), "peak_position": int(info.position[peak]),
                "grid_rows": layout.grid_rows, "grid_cols": layout.grid_cols,
                "patch_activations": patches.tolist(), "text_positions": None, "text_activations": None}
    else:
        text = info.modality == TEXT
        elig = info.eligible_text
        peak = int(np.argmax(np.where(elig, acts, -np.inf)))
        row |= {"active_count": int((acts[elig] > 0).sum()), "mean_activation": float(acts[elig].mean()),
                "max_activation": float(acts[peak]), "peak_position": int(info.position[peak]),
                "grid_rows": None, "grid_cols": None, "patch_activations": None,
                "text_positions": info.position[text].astype(np.int32).tolist(),
                "text_activations": acts[text].astype(np.float32).tolist()}
    return row
