"""What an extraction has done, and under which identity: fingerprint and progress record.

The fingerprint (model, layers, extraction config and samples) guards the progress record; the
record lists the committed chunks (see :mod:`msae.extract.writer` for the commit protocol).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl
import torch

from msae.config import ExtractionConfig
from msae.extract.prepare import SAMPLE_COLUMNS
from msae.extract.writer import ACTIVATIONS_DIR, PROGRESS
from msae.store import Store
from msae.vlm.load import LoadedVLM

EXTRACTOR_VERSION = 1


# --- fingerprint -----------------------------------------------------------------------------------


def samples_hash(samples: pl.DataFrame) -> str:
    cols = [c for c in SAMPLE_COLUMNS if c in samples.columns]
    return hashlib.sha256(samples.select(cols).write_csv().encode()).hexdigest()[:16]


def weights_signature(model: torch.nn.Module) -> str:
    """Cheap identity of the weights: shape and first/last values of every parameter."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        probe = torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(probe.tobytes())
    return h.hexdigest()[:16]


def extraction_fingerprint(
    samples: pl.DataFrame, vlm: LoadedVLM, layers: list[int], cfg: ExtractionConfig
) -> tuple[str, dict[str, Any]]:
    inputs = {
        "version": EXTRACTOR_VERSION,
        "model": {
            "name_or_path": vlm.name_or_path,
            "revision": vlm.revision,
            "dtype": str(vlm.dtype),
            "weights": weights_signature(vlm.model),
        },
        "layers": list(layers),
        "extraction": cfg.model_dump(mode="json"),
        "samples": samples_hash(samples),
        "n_samples": samples.height,
    }
    fp = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return fp, inputs


# --- progress record -------------------------------------------------------------------------------


def _clear(store: Store) -> None:
    for name in (ACTIVATIONS_DIR, store.TOKENS, "_progress"):
        store.rm(name)


def _load_progress(store: Store) -> dict[str, Any] | None:
    if not store.exists(PROGRESS):
        return None
    try:
        return store.read_json(PROGRESS)
    except Exception:  # noqa: BLE001 - a damaged record means starting over
        return None


def _complete_and_intact(store: Store, progress: dict[str, Any], layers: list[int]) -> bool:
    import zarr

    if not progress.get("complete") or not store.exists(store.TOKENS):
        return False
    for layer in layers:
        name = store.activations_name(layer)
        if not store.exists(name):
            return False
        try:
            arr = zarr.open_array(store=store.zarr_store(name, read_only=True), mode="r")
        except Exception:  # noqa: BLE001
            return False
        if arr.shape[0] != progress["n_rows"]:
            return False
    return True
