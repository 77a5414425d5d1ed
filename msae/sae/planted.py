"""Activations with planted sparse features, for checking that an SAE finds what is there.

Each row is ``sum_f a_f · D_f + noise`` over a few active features ``f``, with ``D_f`` random unit
vectors in ``d`` dimensions and ``a_f ~ U(0.5, 1.5)``. Features are *image-only*, *text-only* or
*both*: image rows draw only from image-only ∪ both, text rows from text-only ∪ both, each eligible
feature firing independently with probability ``active / n_eligible``. Rows come in samples (one
special row, then image rows, then text rows) with a token table shaped like ``tokens.parquet``.

Scores:

* :func:`feature_recovery` — for each true direction, the best cosine similarity with any decoder
  row; its mean is the usual "mean max cosine" (1 = every feature found exactly);
* :func:`modality_recovery` — for each true feature, the share of its best-matching latent's
  firings that fall on image rows, against the true share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

MODALITIES = ("image", "text", "both")


@dataclass(frozen=True)
class PlantedTruth:
    directions: np.ndarray
    """[n_features, d] unit vectors."""
    modality: np.ndarray
    """[n_features] 'image' | 'text' | 'both': which rows a feature may fire on."""
    image_share: np.ndarray
    """[n_features] fraction of the feature's firings that are on image rows (as generated)."""
    fire_count: np.ndarray
    """[n_features] number of rows where the feature fired."""


@dataclass(frozen=True)
class PlantedData:
    activations: np.ndarray
    """[n_rows, d] (float16 by default)."""
    tokens: pl.DataFrame
    truth: PlantedTruth


def make_planted(
    n_rows: int = 32_768,
    d: int = 64,
    n_features: int = 64,
    *,
    active: float = 4.0,
    image_only: float = 1 / 3,
    text_only: float = 1 / 3,
    rows_per_sample: int = 64,
    image_share_of_rows: float = 0.5,
    noise: float = 0.01,
    offset: float = 0.0,
    special_norm: float = 20.0,
    seed: int = 0,
    dtype: Any = np.float16,
    chunk_rows: int = 65_536,
) -> PlantedData:
    """Planted-feature activations and their token table (see module doc).

    ``offset`` adds a constant vector (norm ``offset``) to every non-special row, like the mean of
    a real residual stream. Special rows (first of each sample) are a large fixed vector — a
    training set that fails to exclude them pays for it.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_features, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    n_img, n_txt = round(image_only * n_features), round(text_only * n_features)
    modality = np.array(["image"] * n_img + ["text"] * n_txt + ["both"] * (n_features - n_img - n_txt))
    modality = modality[rng.permutation(n_features)]
    bias = rng.standard_normal(d).astype(np.float32)
    bias *= offset / max(np.linalg.norm(bias), 1e-12)
    special = rng.standard_normal(d).astype(np.float32)
    special *= special_norm / np.linalg.norm(special)

    # Token table: per sample one special row, then image rows, then text rows.
    n_img_rows = round((rows_per_sample - 1) * image_share_of_rows)
    pos = np.arange(n_rows) % rows_per_sample
    row_mod = np.where(pos == 0, "special", np.where(pos <= n_img_rows, "image", "text"))
    grid = int(np.ceil(np.sqrt(max(n_img_rows, 1))))
    is_img = row_mod == "image"
    tokens = pl.DataFrame({
        "sample_id": [f"s{i:06d}" for i in np.arange(n_rows) // rows_per_sample],
        "position": pos.astype(np.int64),
        "modality": row_mod,
        "view": np.where(is_img, "base", None),
        "grid_row": pl.Series(np.where(is_img, (pos - 1) // grid, 0), dtype=pl.Int64),
        "grid_col": pl.Series(np.where(is_img, (pos - 1) % grid, 0), dtype=pl.Int64),
        "token": np.where(row_mod == "text", [f"w{p}" for p in pos], None),
        "role": np.where(row_mod == "special", "template", "question"),
        "token_id": pos.astype(np.int64),
    }).with_columns(
        pl.when(pl.col("modality") == "image").then(pl.col("grid_row")).otherwise(None).alias("grid_row"),
        pl.when(pl.col("modality") == "image").then(pl.col("grid_col")).otherwise(None).alias("grid_col"),
    )

    eligible_img = np.isin(modality, ["image", "both"])
    eligible_txt = np.isin(modality, ["text", "both"])
    p_img = np.where(eligible_img, active / max(eligible_img.sum(), 1), 0.0)
    p_txt = np.where(eligible_txt, active / max(eligible_txt.sum(), 1), 0.0)
    acts = np.empty((n_rows, d), dtype=dtype)
    fire_img = np.zeros(n_features, dtype=np.int64)
    fire_all = np.zeros(n_features, dtype=np.int64)
    step = max(1, min(chunk_rows, 2**22 // n_features))  # bounded temporaries
    dirs_t = torch.from_numpy(dirs)
    for lo in range(0, n_rows, step):
        hi = min(lo + step, n_rows)
        m = row_mod[lo:hi]
        p = np.where((m == "image")[:, None], p_img[None], p_txt[None])
        p[m == "special"] = 0.0
        fires = rng.random((hi - lo, n_features), dtype=np.float32) < p
        r, f = np.nonzero(fires)
        mags = rng.uniform(0.5, 1.5, size=len(r)).astype(np.float32)
        x = torch.zeros(hi - lo, d).index_add_(0, torch.from_numpy(r), torch.from_numpy(mags)[:, None] * dirs_t[f])
        x = x.numpy() + bias + noise * rng.standard_normal((hi - lo, d)).astype(np.float32)
        x[m == "special"] = special
        acts[lo:hi] = x
        fire_all += fires.sum(0)
        fire_img += fires[m == "image"].sum(0)
    truth = PlantedTruth(dirs, modality, fire_img / np.maximum(fire_all, 1), fire_all)
    return PlantedData(acts, tokens, truth)


def write_zarr(path_or_store: Any, activations: np.ndarray, chunk_rows: int = 4096) -> Any:
    """Write activations as a zarr v3 array chunked along rows (like the extractor's output)."""
    import zarr

    arr = zarr.create_array(path_or_store, shape=activations.shape, chunks=(chunk_rows, activations.shape[1]),
                            dtype=activations.dtype, overwrite=True)
    arr[:] = activations
    return arr


# --- scores ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRecovery:
    mean_max_cos: float
    max_cos: np.ndarray
    """[n_features] best cosine of each true direction with a decoder row."""
    best_latent: np.ndarray
    """[n_features] the decoder row achieving it."""

    def fraction_above(self, threshold: float = 0.9) -> float:
        return float((self.max_cos >= threshold).mean())


def feature_recovery(decoder: torch.Tensor | np.ndarray, truth: PlantedTruth) -> FeatureRecovery:
    """Mean over true features of the max cosine similarity with the rows of ``decoder`` [n, d]."""
    w = torch.as_tensor(decoder, dtype=torch.float32)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = torch.as_tensor(truth.directions, dtype=torch.float32) @ w.T  # [F, n]
    best, idx = cos.max(dim=1)
    return FeatureRecovery(float(best.mean()), best.numpy(), idx.numpy())


@dataclass(frozen=True)
class ModalityRecovery:
    true_image_share: np.ndarray
    learned_image_share: np.ndarray
    """[n_features] share of the best-matching latent's firings (count) on image rows; nan: never fired."""
    learned_image_mass: np.ndarray
    """[n_features] the same share weighted by activation (small forced TopK firings count little)."""
    mean_abs_error: float
    """Mean |learned_image_share - true share| (nan counted as 0.5)."""
    mean_abs_error_mass: float
    label_accuracy: float
    """Share of features whose label from the activation-weighted share (>= 0.9 image, <= 0.1 text,
    else both) matches the planted modality."""


def _label(share: np.ndarray, hi: float = 0.9, lo: float = 0.1) -> np.ndarray:
    return np.where(share >= hi, "image", np.where(share <= lo, "text", "both"))


@torch.no_grad()
def modality_recovery(sae: Any, activations: np.ndarray, tokens: pl.DataFrame, truth: PlantedTruth,
                      recovery: FeatureRecovery | None = None, batch_size: int = 4096) -> ModalityRecovery:
    """For each true feature, where its best-matching latent fires (image vs text rows)."""
    recovery = recovery or feature_recovery(sae.W_dec.detach().cpu(), truth)
    mod = tokens["modality"].to_numpy()
    rows = np.flatnonzero(np.isin(mod, ["image", "text"]))
    n = sae.num_latents
    count = torch.zeros(2, n, dtype=torch.float64)  # [image, all]
    mass = torch.zeros(2, n, dtype=torch.float64)
    for lo in range(0, len(rows), batch_size):
        r = rows[lo:lo + batch_size]
        x = torch.from_numpy(activations[r].astype(np.float32)).to(sae.device)
        vals, idx, _ = sae.encode(x)
        vals, idx = vals.double().cpu(), idx.cpu()
        on = vals > 0
        img = torch.from_numpy(mod[r] == "image")[:, None] & on
        for j, sel in enumerate((img, on)):
            count[j] += torch.bincount(idx[sel], minlength=n).double()
            mass[j] += torch.bincount(idx[sel], weights=vals[sel], minlength=n)
    best = torch.from_numpy(recovery.best_latent)
    share = (count[0, best] / count[1, best]).numpy()  # nan where never fired
    share_mass = (mass[0, best] / mass[1, best]).numpy()
    fill = lambda a: np.nan_to_num(a, nan=0.5)  # noqa: E731
    return ModalityRecovery(
        truth.image_share, share, share_mass,
        float(np.abs(fill(share) - truth.image_share).mean()),
        float(np.abs(fill(share_mass) - truth.image_share).mean()),
        float((_label(fill(share_mass)) == truth.modality).mean()),
    )
