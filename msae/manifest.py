"""Stage manifests: what a stage last wrote, under which fingerprint, with which data version.

Dagster's staleness lives in its instance and the CLI cannot select "only stale" assets, so each
stage also keeps a manifest next to its output. A stage whose fingerprint (its code version plus
the data versions of its inputs) matches the manifest returns the recorded result without work;
this makes re-runs cheap from any entry point (CLI, UI, notebook) and independent of the instance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from msae.store import Store

MANIFEST_DIR = "_manifests"


def fingerprint(code_version: str, inputs: dict[str, str] | None = None) -> str:
    """Hash of a stage's code version and its inputs' data versions (order independent)."""
    text = json.dumps({"code": code_version, "inputs": inputs or {}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    """The record a stage leaves beside its output."""

    stage: str
    fingerprint: str
    data_version: str
    metadata: dict[str, Any] = field(default_factory=dict)


def manifest_name(stage: str, partition: str | None = None) -> str:
    return f"{MANIFEST_DIR}/{stage}.json" if partition is None else f"{MANIFEST_DIR}/{stage}/{partition}.json"


def load_manifest(store: Store, stage: str, partition: str | None = None) -> Manifest | None:
    name = manifest_name(stage, partition)
    if not store.exists(name):
        return None
    raw = store.read_json(name)
    return Manifest(raw["stage"], raw["fingerprint"], raw["data_version"], raw.get("metadata", {}))


def save_manifest(store: Store, manifest: Manifest, partition: str | None = None) -> None:
    store.write_json(
        {
            "stage": manifest.stage,
            "fingerprint": manifest.fingerprint,
            "data_version": manifest.data_version,
            "metadata": manifest.metadata,
        },
        manifest_name(manifest.stage, partition),
    )


def current_manifest(
    store: Store, stage: str, fp: str, partition: str | None = None
) -> Manifest | None:
    """The stored manifest if it was written under fingerprint ``fp``, else None."""
    m = load_manifest(store, stage, partition)
    return m if m is not None and m.fingerprint == fp else None


def upstream_version(store: Store, stage: str, partition: str | None = None) -> str:
    """Data version of an upstream stage; a clear error if it has not run."""
    m = load_manifest(store, stage, partition)
    if m is None:
        where = stage if partition is None else f"{stage}[{partition}]"
        raise RuntimeError(f"upstream stage {where} has not been materialized in store {store.root}")
    return m.data_version
