"""Stage manifests: what a stage last wrote, under which fingerprint, with which data version.

Dagster's staleness lives in its instance and the CLI cannot select "only stale" assets, so each
stage also keeps a manifest next to its output. A stage whose fingerprint (its code version plus
the data versions of its inputs) matches the manifest returns the recorded result without work;
this makes re-runs cheap from any entry point (CLI, UI, notebook) and independent of the instance.

A manifest also records the checksum of each output file (``outputs``, :mod:`msae.integrity`):
reuse is a checked cache (a missing or changed output means recompute) and a downstream stage
verifies its upstream's files before reading them. Manifests without ``outputs`` (written before
checksums existed) load as before and are accepted unverified, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from msae import integrity
from msae.store import Store

log = logging.getLogger(__name__)

DAMAGED = "recorded outputs damaged"

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
    outputs: dict[str, dict[str, Any]] | None = None
    """``{path: {"sha256": hex, "bytes": n}}`` of the stage's output files; None: not recorded
    (an old manifest). :func:`save_manifest` fills it when left None."""


def layer_width_folder(layer: int, width: int) -> str:
    """The store's form of a layer × width partition (its manifests' and outputs' sub-folder)."""
    return f"layer={layer}/width={width}"


def manifest_name(stage: str, partition: str | None = None) -> str:
    return f"{MANIFEST_DIR}/{stage}.json" if partition is None else f"{MANIFEST_DIR}/{stage}/{partition}.json"


def load_manifest(store: Store, stage: str, partition: str | None = None) -> Manifest | None:
    name = manifest_name(stage, partition)
    if not store.exists(name):
        return None
    raw = store.read_json(name)
    return Manifest(raw["stage"], raw["fingerprint"], raw["data_version"], raw.get("metadata", {}),
                    raw.get("outputs"))


def save_manifest(store: Store, manifest: Manifest, partition: str | None = None) -> Manifest:
    """Write the manifest once the stage's outputs are complete; checksums of those outputs
    (:func:`msae.integrity.record_outputs`) are taken now unless ``manifest.outputs`` is given."""
    outputs = manifest.outputs
    if outputs is None:
        outputs = integrity.record_outputs(store, manifest.stage, partition)
    store.write_json(
        {
            "stage": manifest.stage,
            "fingerprint": manifest.fingerprint,
            "data_version": manifest.data_version,
            "metadata": manifest.metadata,
            "outputs": outputs,
        },
        manifest_name(manifest.stage, partition),
    )
    return Manifest(manifest.stage, manifest.fingerprint, manifest.data_version, manifest.metadata, outputs)


def check_manifest(
    store: Store, stage: str, fp: str, partition: str | None = None
) -> tuple[Manifest | None, str]:
    """(the stored manifest if the stage can be reused, else None; why, in words).

    Reusable: written under fingerprint ``fp``, complete (no ``metadata["incomplete"]`` > 0, e.g.
    explainer requests that errored: the next run does the missing work), and every recorded
    output still exists with its recorded checksum. A manifest without recorded outputs (older
    than checksums) is reused unverified, with a warning."""
    m = load_manifest(store, stage, partition)
    if m is None:
        return None, "no manifest yet"
    if m.fingerprint != fp:
        return None, f"fingerprint changed ({m.fingerprint} -> {fp})"
    if m.metadata.get("incomplete"):
        return None, f"the last run left {m.metadata['incomplete']} parts incomplete"
    if m.outputs is None:
        integrity.warn_unverified(store, stage, partition)
        return m, f"up to date ({fp}), outputs unverified (manifest predates checksums)"
    damage = integrity.find_damage(store, m.outputs)
    if damage:
        return None, f"{DAMAGED}, recomputing: {integrity.describe_damage(damage)}"
    return m, f"up to date ({fp}), {len(m.outputs)} output files verified"


def current_manifest(
    store: Store, stage: str, fp: str, partition: str | None = None
) -> Manifest | None:
    """The stored manifest if it was written under fingerprint ``fp`` and records a complete,
    intact output, else None (:func:`check_manifest`; damaged outputs are logged). A stage that
    finished with failed parts (``metadata["incomplete"]`` > 0, e.g. explainer requests that
    errored) leaves a manifest for its data version and metadata but is never reused: the next
    run does the missing work."""
    m, why = check_manifest(store, stage, fp, partition)
    if m is None and why.startswith(DAMAGED):
        log.warning("%s: %s", integrity.where(stage, partition), why)
    return m


def reset_if_damaged(store: Store, stage: str, partitions: list[str | None]) -> list[str]:
    """Before recomputing ``stage``: if the outputs its manifests (one per partition) recorded are
    damaged, drop its resumable records so the recompute starts over
    (:func:`msae.integrity.forget_damaged`)."""
    if not integrity.RESET_ON_DAMAGE.get(stage):
        return []
    manifests = [load_manifest(store, stage, p) for p in partitions]
    return integrity.forget_damaged(store, stage, [m.outputs if m is not None else None for m in manifests])


def upstream_version(store: Store, stage: str, partition: str | None = None) -> str:
    """Data version of an upstream stage, after verifying its recorded outputs: a clear error if
    it has not run, :class:`msae.integrity.IntegrityError` (file, digests, what to re-run) if a
    file it wrote is missing or changed."""
    m = load_manifest(store, stage, partition)
    if m is None:
        where = stage if partition is None else f"{stage}[{partition}]"
        raise RuntimeError(f"upstream stage {where} has not been materialized in store {store.root}")
    integrity.verify_upstream(store, stage, partition, m.outputs)
    return m.data_version
