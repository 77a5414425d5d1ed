"""What an extraction has done, and under which identity: fingerprint, progress record, data versions.

The fingerprint (model, layers, extraction config and samples) guards the progress record; the
record lists the committed chunks (see :mod:`msae.extract.writer` for the commit protocol).

The fingerprint is the identity of one *extraction run*, so it includes how rows are stored
(``chunk_samples``, ``rows_per_zarr_chunk``) and every layer the run fills. A layer's *data
version* (:func:`layer_data_versions`) must not: it is what the SAEs of that layer are trained
on, so it is derived from what decides that layer's values — the model, the samples, the
value-changing extraction settings (``include_answer``, ``max_length``, ``too_long``,
``store_dtype``), the layer itself — and from the content of ``tokens.parquet`` (which also
records which samples were skipped). Adding a layer or changing the chunking then re-extracts
(one forward pass writes every layer) but leaves every other layer's data version, and so its
SAEs, alone.

Why not a hash of the stored float values: batch composition (``model.batch_size``, ``auto``,
chunk boundaries) picks other GPU kernels, whose low bits differ, so a re-extraction of an
unchanged layer would look changed and re-train its SAEs. The batch settings are declared
value-neutral (left out of the code version) for the same reason. Damage to the stored values is
caught by the output checksums (:mod:`msae.integrity`), not by the data version.
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
LAYOUT_FIELDS = frozenset({"chunk_samples", "rows_per_zarr_chunk"})
"""ExtractionConfig fields that decide how rows are checkpointed and stored, never their values."""
DIGEST_ROWS = 1 << 18
"""Token-table rows hashed per step (bounds the memory of the CSV text hashed)."""


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


# --- data versions ---------------------------------------------------------------------------------


def layer_value_inputs(fp_inputs: dict[str, Any], layer: int) -> dict[str, Any]:
    """The extraction fingerprint's inputs that decide ``layer``'s values: without the storage
    layout (:data:`LAYOUT_FIELDS`) and without the other layers of the run."""
    extraction = {k: v for k, v in fp_inputs["extraction"].items() if k not in LAYOUT_FIELDS}
    return {**{k: v for k, v in fp_inputs.items() if k != "layers"}, "extraction": extraction, "layer": int(layer)}


def table_digest(df: pl.DataFrame) -> str:
    """Content hash of a table, independent of how it is chunked in memory or on disk (column
    names, dtypes and values, in row order)."""
    h = hashlib.sha256(json.dumps([[c, str(t)] for c, t in df.schema.items()]).encode())
    for start in range(0, df.height, DIGEST_ROWS):
        h.update(df.slice(start, DIGEST_ROWS).write_csv(include_header=False).encode())
    return h.hexdigest()[:16]


def layer_data_versions(store: Store, layers: list[int], extra: dict[str, Any] | None = None) -> dict[int, str]:
    """``{layer: data version}`` of a complete extraction (see module doc): ``<hash>-<rows>``.

    ``extra``: further value-deciding inputs known only to the caller (the upstream data
    versions, the model settings of the code version), hashed into every layer's version."""
    progress = _load_progress(store)
    if progress is None or not progress.get("complete"):
        raise RuntimeError(f"no complete extraction in store {store.root} ({PROGRESS}): extract before versioning")
    tokens = table_digest(store.read_parquet(store.TOKENS))
    rows = int(progress["n_rows"])
    out = {}
    for layer in layers:
        inputs = {"values": layer_value_inputs(progress["fingerprint_inputs"], layer), "rows": rows,
                  "d_model": progress["d_model"], "tokens": tokens, "extra": extra or {}}
        out[int(layer)] = f"{hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]}-{rows}"
    return out


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
