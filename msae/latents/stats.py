"""Per-latent statistics and top examples in one streaming, memory-bounded pass.

The pass walks the layer's activations a batch of whole samples at a time, encodes them with the
SAE (sparse codes only: ``[rows, k]``), and updates

* per-latent accumulators (firing counts, sums, maxima on image and on text tokens), and
* for the selected latents, a running top-``K`` of samples per modality, merged with the batch's
  candidates by one ``topk`` over a dense ``[changed latents, K + batch samples]`` score matrix.
  Each top entry carries its payload (activation on every base-grid patch, or on every text token
  of the sample), captured while the batch's codes are at hand, so nothing is encoded twice.

Memory depends on the number of latents, ``K``, the grid, the longest text and the batch size,
never on the number of tokens; the token table is read in row slices alongside the activations.
The pass checkpoints its state and resumes. Formats: ``docs/formats.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.config import LatentsConfig
from msae.latents.answer_position import answer_position_rows
from msae.runtime import ProgressReport
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
    n_text: np.ndarray
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
             (pl.col("modality") == "text").sum().alias("n_text"),
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
        agg["n_text"].to_numpy().astype(np.int64), int(gr.max()) + 1 if len(gr) else 0, int(gc.max()) + 1 if len(gc) else 0,
    )


@dataclass(frozen=True)
class RowInfo:
    """What the pass needs per activation row of one batch."""

    local_sample: np.ndarray  # [rows] index of the row's sample within the batch
    modality: np.ndarray      # IMAGE / TEXT / OTHER
    base_cell: np.ndarray     # grid_row * grid_cols + grid_col for base-view rows, else -1
    eligible_text: np.ndarray # text row that may be a peak (template excluded unless asked, but the answer position)
    text_index: np.ndarray    # index among the sample's text rows, -1 for other rows
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
    # the answer position is the one template token that is evidence (msae.latents.answer_position)
    eligible = (modality == TEXT) & (include_template | ~is_template | answer_position_rows(frame))
    is_text = modality == TEXT
    before = np.concatenate([[0], np.cumsum(is_text)])  # text rows before each row, then per-sample offset
    first = np.concatenate([[0], np.cumsum(counts)])[:-1]
    text_index = np.where(is_text, before[:-1] - np.repeat(before[first], counts), -1)
    return RowInfo(local, modality, cell, eligible, text_index, frame["position"].to_numpy())


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
    """A running top-K of (score, sample, payload) per selected latent, merged batch by batch.

    The payload is what rendering needs of a top sample (activation per base patch, or per text
    token), captured while the sample's codes are at hand, so no second pass over the data is needed.
    """

    n: int
    k: int
    width: int
    score: torch.Tensor = field(init=False)
    sample: torch.Tensor = field(init=False)
    payload: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.score = torch.full((self.n, self.k), -np.inf, dtype=torch.float64)
        self.sample = torch.full((self.n, self.k), -1, dtype=torch.long)
        self.payload = torch.zeros((self.n, self.k, self.width), dtype=torch.float32)

    def merge(self, sel_row: torch.Tensor, local: torch.Tensor, score: torch.Tensor, samples: torch.Tensor,
              payload_of: Any) -> None:
        """Candidates: (selected-latent row, batch-local sample, score); ``samples`` maps local → global;
        ``payload_of(rows, locals)`` gives the payload of the candidates that enter a top list."""
        if len(sel_row) == 0:
            return
        changed = torch.unique(sel_row)
        s = int(samples.numel())
        sub = torch.full((len(changed), s), -np.inf, dtype=torch.float64)
        sub[torch.searchsorted(changed, sel_row), local] = score
        all_score = torch.cat([self.score[changed], sub], dim=1)
        top = all_score.topk(self.k, dim=1)
        idx = top.indices
        from_batch = idx >= self.k
        old = self.payload[changed].gather(1, idx.clamp(max=self.k - 1).unsqueeze(-1).expand(-1, -1, self.width))
        old_sample = self.sample[changed].gather(1, idx.clamp(max=self.k - 1))
        if from_batch.any():
            ci, ri = torch.nonzero(from_batch, as_tuple=True)
            new_local = idx[ci, ri] - self.k
            old[ci, ri] = payload_of(changed[ci], new_local)
            old_sample[ci, ri] = samples[new_local]
        self.score[changed] = top.values
        self.sample[changed] = old_sample
        self.payload[changed] = old


def _payload(sel_row: torch.Tensor, local: torch.Tensor, slot: torch.Tensor, value: torch.Tensor,
             n_local: int, width: int) -> Any:
    """A ``payload_of`` over this batch's active entries (selected row, local sample, slot, value)."""
    keys = sel_row * n_local + local

    def payload_of(rows: torch.Tensor, locals_: torch.Tensor) -> torch.Tensor:
        want = rows * n_local + locals_
        order = torch.argsort(want)
        sorted_want = want[order]
        pos = torch.searchsorted(sorted_want, keys).clamp(max=len(want) - 1)
        hit = sorted_want[pos] == keys
        out = torch.zeros((len(want), width), dtype=torch.float32)
        out[order[pos[hit]], slot[hit]] = value[hit]
        return out

    return payload_of


def _rank_key(ranking: str, count: torch.Tensor, total: torch.Tensor, peak: torch.Tensor,
              n_base: torch.Tensor) -> torch.Tensor:
    mean = total / n_base.clamp(min=1)
    if ranking == "active_patches":  # lexicographic: count first, mean breaks ties (mean/(1+mean) < 1)
        return count + mean / (1.0 + mean)
    if ranking == "max":
        return peak
    return mean


def _group(keys: torch.Tensor, values: torch.Tensor,
           fraction: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique keys with the count of values above ``fraction`` × their group's max, sum and max."""
    uniq, inv = torch.unique(keys, return_inverse=True)
    n = len(uniq)
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, values.double())
    peak = torch.zeros(n, dtype=torch.float64).scatter_reduce_(0, inv, values.double(), "amax", include_self=False)
    above = (values.double() > fraction * peak[inv]) if fraction > 0 else torch.ones_like(values, dtype=torch.bool)
    count = torch.zeros(n, dtype=torch.float64).index_add_(0, inv, above.double())
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
    max_rows: int | None = None,
    progress: bool = False,
    checkpoint: str | None = None,
    checkpoint_every: int = 50,
    fingerprint: str = "",
    report: Callable[[str], None] | None = None,
) -> LatentStatsResult:
    """Stats of every latent and top examples of the selected, non-dead ones (module doc).

    ``array``: the layer's activations (rows aligned with ``tokens``, raw scale: the SAE folds its
    input normalisation in); ``tokens``: path of a local tokens.parquet or the table itself.
    ``checkpoint``: local file where pass 1 saves its state every ``checkpoint_every`` batches; a
    rerun with the same ``fingerprint`` (SAE + settings) resumes from it instead of starting over.
    ``report``: where a progress line goes at every tenth of the batches (:class:`msae.runtime.ProgressReport`).
    """
    t0 = time.perf_counter()
    sae = sae.to(device).eval()
    # encode chunks hold a dense [rows, width] pre-activation matrix: keep it near 256 MiB
    max_rows = max_rows or int(min(8192, max(64, 2**26 // sae.num_latents)))
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
    n_sel = int(selected.sum())
    n_cells = layout.grid_rows * layout.grid_cols
    max_text = int(layout.n_text.max()) if layout.n_samples else 0
    top_img, top_txt = _TopK(n_sel, K, n_cells), _TopK(n_sel, K, max_text)
    acc = {k: torch.zeros(W, dtype=torch.float64) for k in ("fires_image", "fires_text", "sum_image", "sum_text")}
    acc |= {k: torch.zeros(W, dtype=torch.float32) for k in ("max_image", "max_text")}
    n_image = n_text = n_skipped = 0
    n_base_all = torch.from_numpy(layout.n_base.astype(np.float64))

    batches = list(_sample_batches(layout, cfg.batch_samples))
    state = {"acc": acc, "top_img": top_img, "top_txt": top_txt}
    done, counts, prior_s = _load_checkpoint(checkpoint, fingerprint, state)
    if done:
        n_image, n_text, n_skipped = counts
        log.info("latent stats: resuming after %d of %d batches from %s", done, len(batches), checkpoint)
    bar = _progress(batches[done:], progress, "latent stats")
    lines = ProgressReport(report, "latent stats: batch", len(batches), done) if report else None
    for b, (s0, s1) in enumerate(bar, start=done):
        if lines is not None:
            lines.update(b)
        if checkpoint and b > done and (b - done) % checkpoint_every == 0:
            _save_checkpoint(checkpoint, fingerprint, state, b, (n_image, n_text, n_skipped),
                             prior_s + time.perf_counter() - t0)
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
            uniq, count, total, peak = _group(keys, v[base], cfg.active_fraction)
            u_srow, u_local = uniq // n_local, uniq % n_local
            score = _rank_key(cfg.ranking, count, total, peak, n_base_all[s0:s1][u_local])
            cell = torch.from_numpy(info.base_cell)[rows[base]]
            top_img.merge(u_srow, u_local, score, globals_,
                          _payload(srow[base], local[base], cell, v[base], n_local, n_cells))
        txt = torch.from_numpy(info.eligible_text & finite)[rows]
        if txt.any():
            keys = srow[txt] * n_local + local[txt]
            uniq, _, _, peak = _group(keys, v[txt])
            any_text = torch.from_numpy((info.text_index >= 0) & finite)[rows]
            slot = torch.from_numpy(info.text_index)[rows[any_text]]
            top_txt.merge(uniq // n_local, uniq % n_local, peak, globals_,
                          _payload(srow[any_text], local[any_text], slot, v[any_text], n_local, max_text))

    if lines is not None:
        lines.update(len(batches))
    if checkpoint:
        _save_checkpoint(checkpoint, fingerprint, state, len(batches), (n_image, n_text, n_skipped),
                         prior_s + time.perf_counter() - t0)
    stats = _stats_frame(acc, selected, n_image, n_text)
    explained_mask = stats["explained"].to_numpy()[selected]
    top = _assemble_top(slices, layout, top_img, top_txt, np.flatnonzero(selected), explained_mask, cfg)
    seconds_this_run = time.perf_counter() - t0
    seconds = prior_s + seconds_this_run  # a resumed pass also counts the time its checkpoint holds
    summary = {
        "n_tokens": layout.n_rows, "n_image_tokens": n_image, "n_text_tokens": n_text, "n_samples": layout.n_samples,
        "skipped_rows": n_skipped, "num_latents": W, "selected": int(selected.sum()),
        "dead": int(stats["dead"].sum()), "explained": int(stats["explained"].sum()),
        "grid": f"{layout.grid_rows}x{layout.grid_cols}", "seconds": round(seconds, 2),
        "seconds_this_run": round(seconds_this_run, 2), "resumed_batches": done,
        "tokens_per_s": round(layout.n_rows / max(seconds, 1e-9), 1),
    }
    return LatentStatsResult(stats, top, summary)


def _save_checkpoint(path: str, fingerprint: str, state: dict, batches_done: int, counts: tuple,
                     elapsed_s: float = 0.0) -> None:
    """Atomically write pass 1's state (plain arrays, no pickle) and the compute seconds it holds."""
    import os

    from msae.store import tmp_name

    arrays = {f"acc_{k}": v.numpy() for k, v in state["acc"].items()}
    for name in ("top_img", "top_txt"):
        arrays[f"{name}_score"] = state[name].score.numpy()
        arrays[f"{name}_sample"] = state[name].sample.numpy()
        arrays[f"{name}_payload"] = state[name].payload.numpy()
    arrays["meta"] = np.array([batches_done, *counts], dtype=np.int64)
    arrays["elapsed_s"] = np.array(elapsed_s, dtype=np.float64)
    arrays["fingerprint"] = np.array(fingerprint)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tmp_name(path) + ".npz"  # this writer's own temp name (np.savez appends .npz otherwise)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _load_checkpoint(path: str | None, fingerprint: str, state: dict) -> tuple[int, tuple[int, int, int], float]:
    """Restore ``state`` in place; (batches done, counts, compute seconds spent on them), or
    (0, …, 0.0) when there is nothing to resume."""
    import os

    if not path or not os.path.exists(path):
        return 0, (0, 0, 0), 0.0
    with np.load(path, allow_pickle=False) as z:
        if str(z["fingerprint"]) != fingerprint or any(
                z[f"acc_{k}"].shape != v.shape for k, v in state["acc"].items()):
            log.info("latent stats: checkpoint %s is from other settings; starting over", path)
            return 0, (0, 0, 0), 0.0
        for k, v in state["acc"].items():
            v.copy_(torch.from_numpy(z[f"acc_{k}"]))
        for name in ("top_img", "top_txt"):
            state[name].score = torch.from_numpy(z[f"{name}_score"].copy())
            state[name].sample = torch.from_numpy(z[f"{name}_sample"].copy())
            state[name].payload = torch.from_numpy(z[f"{name}_payload"].copy())
        meta = z["meta"].tolist()
        elapsed_s = float(z["elapsed_s"]) if "elapsed_s" in z.files else 0.0  # older checkpoints lack it
    return int(meta[0]), (int(meta[1]), int(meta[2]), int(meta[3])), elapsed_s


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


# --- assembly: the top lists as a table (token positions read for the top samples only) ----------
TOP_SCHEMA = {
    "latent": pl.Int32, "modality": pl.Utf8, "rank": pl.Int16, "sample_index": pl.Int32, "sample_id": pl.Utf8,
    "score": pl.Float64, "active_count": pl.Int32, "mean_activation": pl.Float32, "max_activation": pl.Float32,
    "peak_position": pl.Int32, "grid_rows": pl.Int16, "grid_cols": pl.Int16, "active_threshold": pl.Float32,
    "patch_activations": pl.List(pl.Float32), "text_positions": pl.List(pl.Int32),
    "text_activations": pl.List(pl.Float32),
}


@dataclass(frozen=True)
class _SampleTokens:
    base_position: np.ndarray  # [n_cells] token position of each base cell (-1 if absent)
    text_position: np.ndarray  # positions of the sample's text rows
    text_eligible: np.ndarray


def _sample_tokens(slices: TokenSlices, layout: SampleLayout, samples: np.ndarray, cfg: LatentsConfig,
                   batch: int) -> dict[int, _SampleTokens]:
    """Token positions of the given samples, reading the token table in sample-batch slices."""
    out: dict[int, _SampleTokens] = {}
    n_cells = layout.grid_rows * layout.grid_cols
    wanted = set(samples.tolist())
    for s0, s1 in _sample_batches(layout, batch):
        here = [s for s in range(s0, s1) if s in wanted]
        if not here:
            continue
        r0 = int(layout.row_start[s0])
        r1 = int(layout.row_start[s1 - 1] + layout.row_count[s1 - 1])
        info = row_info(slices.rows(r0, r1), layout.row_start[s0:s1], layout.row_count[s0:s1], layout.grid_cols,
                        cfg.text_include_template)
        for s in here:
            m = info.local_sample == s - s0
            base = m & (info.base_cell >= 0)
            pos = np.full(n_cells, -1, dtype=np.int64)
            pos[info.base_cell[base]] = info.position[base]
            text = m & (info.modality == TEXT)
            out[s] = _SampleTokens(pos, info.position[text], info.eligible_text[text])
    return out


def _column(name: str, values: Any, n: int) -> pl.Series:
    """A column of the top table: arrays/lists as given, scalars (and None) repeated."""
    dtype = TOP_SCHEMA[name]
    if values is None or isinstance(values, (str, int, float)):
        return pl.repeat(values, n, dtype=dtype, eager=True).alias(name)
    return pl.Series(name, values).cast(dtype)


def _assemble_top(slices: TokenSlices, layout: SampleLayout, top_img: _TopK, top_txt: _TopK,
                  sel_latents: np.ndarray, explained: np.ndarray, cfg: LatentsConfig) -> pl.DataFrame:
    """One row per (explained latent, modality, rank), from the top lists and their payloads."""
    frames = []
    found = {}
    for topk, modality in ((top_img, "image"), (top_txt, "text")):
        sc, sm = topk.score.numpy(), topk.sample.numpy()
        keep = explained[:, None] & (sm >= 0) & np.isfinite(sc)
        found[modality] = np.nonzero(keep)
    samples = np.unique(np.concatenate([top_img.sample.numpy()[found["image"]],
                                        top_txt.sample.numpy()[found["text"]]]))
    tokens = _sample_tokens(slices, layout, samples, cfg, cfg.batch_samples)
    for topk, modality in ((top_img, "image"), (top_txt, "text")):
        j, r = found[modality]
        if len(j) == 0:
            continue
        s = topk.sample.numpy()[j, r]
        pay = topk.payload.numpy()[j, r]
        cols: dict[str, Any] = {
            "latent": sel_latents[j].astype(np.int32), "modality": modality, "rank": r.astype(np.int16),
            "sample_index": layout.sample_index[s].astype(np.int32), "sample_id": layout.sample_id[s].astype(str),
            "score": topk.score.numpy()[j, r],
        }
        if modality == "image":
            peak = pay.argmax(axis=1)
            threshold = (cfg.active_fraction * pay.max(1)).astype(np.float32)
            cols |= {"active_count": (pay > threshold[:, None]).sum(1).astype(np.int32),
                     "active_threshold": threshold,
                     "mean_activation": (pay.sum(1) / np.maximum(layout.n_base[s], 1)).astype(np.float32),
                     "max_activation": pay.max(1).astype(np.float32),
                     "peak_position": np.array([tokens[si].base_position[c] for si, c in zip(s, peak)], np.int32),
                     "grid_rows": layout.grid_rows, "grid_cols": layout.grid_cols,
                     "patch_activations": list(pay.astype(np.float32)), "text_positions": None,
                     "text_activations": None}
        else:
            acts = [pay[i, : len(tokens[si].text_position)] for i, si in enumerate(s)]
            elig = [tokens[si].text_eligible for si in s]
            peaks = [int(np.argmax(np.where(e, a, -np.inf))) for a, e in zip(acts, elig)]
            cols |= {"active_count": np.array([(a[e] > 0).sum() for a, e in zip(acts, elig)], np.int32),
                     "mean_activation": np.array([a[e].mean() for a, e in zip(acts, elig)], np.float32),
                     "max_activation": np.array([a[p] for a, p in zip(acts, peaks)], np.float32),
                     "peak_position": np.array([tokens[si].text_position[p] for si, p in zip(s, peaks)], np.int32),
                     "grid_rows": None, "grid_cols": None, "active_threshold": None, "patch_activations": None,
                     "text_positions": [tokens[si].text_position.astype(np.int32) for si in s],
                     "text_activations": [a.astype(np.float32) for a in acts]}
        n = len(j)
        frames.append(pl.DataFrame([_column(k, v, n) for k, v in cols.items()]).select(list(TOP_SCHEMA)))
    if not frames:
        return pl.DataFrame(schema=TOP_SCHEMA)
    return pl.concat(frames).select(list(TOP_SCHEMA)).sort(["latent", "modality", "rank"])
