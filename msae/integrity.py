"""Checksums of every stage's outputs: recorded in its manifest, verified before anything trusts them.

A manifest says "stage X wrote these files under fingerprint F". Without checksums a flipped byte
in ``stats.parquet`` or a zarr chunk swapped for another valid one reads back silently as other
numbers. So when a stage completes, :func:`record_outputs` stores the sha256 and size of each of
its output files in the manifest (``outputs``), and

* a downstream stage reading that upstream (:func:`msae.manifest.upstream_version`) verifies them
  first and raises :class:`IntegrityError` naming the file, the upstream stage and partition to
  re-run and both digests' prefixes;
* the stage's own reuse (:func:`msae.manifest.check_manifest`) is a checked cache: the manifest
  counts as up to date only if every recorded output exists and matches, otherwise the stage
  recomputes (the log says which file and why).

What counts as an output (:func:`stage_outputs`): the files a stage's partition owns, as laid out
in README "Output layout" — never resumable scratch (``_progress/``, ``_checkpoints/``, the
explainer's ``_cache/``), manifests, locks, or temporary files of an unfinished atomic write.

Cost: reading every output once per verification; sha256 runs at about 1 GB/s per core and
files are hashed on :data:`HASH_THREADS` threads (hashlib releases the GIL). For the embedded
runs this is milliseconds; for a large activation store it is one read of the layer's zarr array
each time a downstream partition starts (tens of seconds for 30 GB) — small beside training an
SAE on the same bytes, and the price of never training on silently damaged rows. No switch turns
it off: a store too large to re-read should be split by layer, not trusted unchecked.

Manifests written before checksums existed (no ``outputs``) still load: they are accepted
unverified, with one warning per manifest; re-running the stage (or deleting its manifest)
records checksums.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from msae.store import Store, is_tmp_name

log = logging.getLogger(__name__)

ALGORITHM = "sha256"
SCRATCH = frozenset({"_progress", "_checkpoints", "_cache", "_locks", "_manifests"})
"""Folder names that are never outputs: resumable state, answer caches, bookkeeping."""
READ_CHUNK = 8 << 20
SHOWN = 5  # damaged files named in one message; the rest are counted
PREFIX = 12  # digest characters shown
HASH_THREADS = min(8, os.cpu_count() or 1)

RESET_ON_DAMAGE: dict[str, tuple[str, ...]] = {
    # extraction reuses arrays its progress record calls complete; damaged arrays must not be reused
    "activations": ("_progress/extraction.json",),
}
"""Per stage: resumable records to drop before recomputing over damaged outputs, so the recompute
starts over instead of resuming from (or reusing) the damaged files."""


class IntegrityError(RuntimeError):
    """A stored output is missing or no longer matches the checksum recorded when it was written."""


@dataclass(frozen=True)
class Damage:
    """One recorded output that is missing or changed."""

    path: str
    expected: str
    actual: str | None  # None: the file is missing
    expected_bytes: int | None = None
    actual_bytes: int | None = None

    def describe(self) -> str:
        if self.actual is None:
            return f"{self.path} is missing (expected {ALGORITHM} {self.expected[:PREFIX]}…)"
        size = ("" if self.expected_bytes in (None, self.actual_bytes)
                else f", {self.actual_bytes} bytes instead of {self.expected_bytes}")
        return (f"{self.path} changed ({ALGORITHM} expected {self.expected[:PREFIX]}…, "
                f"found {self.actual[:PREFIX]}…{size})")


# --- which files a stage owns ------------------------------------------------------------------------
def _layer_width(partition: str | None) -> tuple[int, int]:
    keys = dict(p.split("=", 1) for p in (partition or "").split("/") if "=" in p)
    try:
        return int(keys["layer"]), int(keys["width"])
    except (KeyError, ValueError):
        raise ValueError(f"partition {partition!r}: expected 'layer=<L>/width=<W>'") from None


def stage_outputs(stage: str, partition: str | None = None) -> list[str]:
    """The store paths (files, or folders ending in '/') that ``stage`` writes for ``partition``.

    The one place that maps a stage and partition to its outputs; an unknown stage owns nothing
    (its manifest records no checksums)."""
    if stage == "vqa_samples":
        return [Store.SAMPLES, "world/", "images/"]
    if stage == "activations":  # tokens.parquet is shared by every layer: each layer's manifest records it
        return [Store.activations_name(int(partition or 0)) + "/", Store.TOKENS]
    if stage == "report":
        from msae.report.build import REPORT

        return [f"{REPORT}/"]
    if stage not in ("sae", "latent_stats", "concepts", "concept_scores", "controls", "controls_stats",
                     "controls_evidence"):
        return []
    from msae.controls import CONTROL_ROOT, EVIDENCE_STAGE, ORACLE_ROOT, STATS_STAGE
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import latents_dir

    layer, width = _layer_width(partition)
    sae, latents, concepts = Store.sae_name(layer, width), latents_dir(layer, width), concepts_folder(layer, width)
    if stage == "sae":
        return [f"{sae}/"]
    if stage == "latent_stats":
        return [f"{latents}/"]
    if stage == "concepts":  # concepts/ is shared with concept_scores: name the files
        return [f"{concepts}/{PROPOSALS}"]
    if stage == "concept_scores":
        from msae.score.stage import CONCEPTS, GROUND_TRUTH

        return [f"{concepts}/{CONCEPTS}", f"{concepts}/{GROUND_TRUTH}"]
    if stage == STATS_STAGE:  # the controls' cached levels (msae.controls); `controls` records all of it
        return [f"{CONTROL_ROOT}/{sae}/", f"{CONTROL_ROOT}/{latents}/"]
    if stage == EVIDENCE_STAGE:
        return [f"{CONTROL_ROOT}/{concepts}/{PROPOSALS}", f"{ORACLE_ROOT}/{concepts}/{PROPOSALS}"]
    return [f"{CONTROL_ROOT}/{sae}/", f"{CONTROL_ROOT}/{latents}/", f"{CONTROL_ROOT}/{concepts}/",
            f"{ORACLE_ROOT}/{concepts}/"]


def _is_output(rel: str) -> bool:
    parts = rel.split("/")
    return not (SCRATCH.intersection(parts[:-1]) or is_tmp_name(parts[-1]))


def output_files(store: Store, stage: str, partition: str | None = None) -> list[str]:
    """The existing output files of ``stage``/``partition``, relative to the store root, sorted."""
    base = store.path().rstrip("/") + "/"
    found: set[str] = set()
    for root in stage_outputs(stage, partition):
        if root.endswith("/"):
            if store.exists(root):
                found.update(p[len(base):] for p in store.fs.find(store.path(root)) if p.startswith(base))
        elif store.exists(root) and store.fs.isfile(store.path(root)):
            found.add(root)
    return sorted(rel for rel in found if _is_output(rel))


# --- digests -------------------------------------------------------------------------------------------
def file_digest(store: Store, rel: str) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of one stored file."""
    h = hashlib.new(ALGORITHM)
    size = 0
    with store.fs.open(store.path(rel), "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def record_outputs(store: Store, stage: str, partition: str | None = None) -> dict[str, dict[str, Any]]:
    """``{path: {"sha256": hex, "bytes": n}}`` for every output file the stage has now."""
    files = output_files(store, stage, partition)
    return {rel: {ALGORITHM: digest, "bytes": size} for rel, (digest, size) in zip(files, _digests(store, files))}


def content_digests(store: Store, files: list[str]) -> dict[str, str | None]:
    """sha256 of each stored file (None where it is missing): for keys of caches over stored inputs."""
    return {rel: d[0] if d is not None else None for rel, d in zip(files, _digests(store, files))}


def _digests(store: Store, files: list[str]) -> list[tuple[str, int] | None]:
    """``file_digest`` of each file (None where it is missing), several files at a time."""
    def one(rel: str) -> tuple[str, int] | None:
        try:
            return file_digest(store, rel)
        except FileNotFoundError:
            return None

    if len(files) < 2 or HASH_THREADS < 2:
        return [one(rel) for rel in files]
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="msae-hash") as pool:
        return list(pool.map(one, files))


def find_damage(store: Store, outputs: dict[str, dict[str, Any]]) -> list[Damage]:
    """Recorded outputs that are missing or whose content changed (files added since are ignored)."""
    files = sorted(outputs)
    damage = []
    for rel, found in zip(files, _digests(store, files)):
        expected, expected_bytes = str(outputs[rel].get(ALGORITHM, "")), outputs[rel].get("bytes")
        if found is None:
            damage.append(Damage(rel, expected, None, expected_bytes))
        elif found[0] != expected:
            damage.append(Damage(rel, expected, found[0], expected_bytes, found[1]))
    return damage


def describe_damage(damage: list[Damage]) -> str:
    shown = "; ".join(d.describe() for d in damage[:SHOWN])
    return shown + (f"; and {len(damage) - SHOWN} more" if len(damage) > SHOWN else "")


# --- messages ------------------------------------------------------------------------------------------
def where(stage: str, partition: str | None) -> str:
    return stage if partition is None else f"{stage}[{partition}]"


def dagster_key(partition: str) -> str:
    """Store partition ('layer=1/width=256', '0') -> Dagster partition key ('1|256', '0')."""
    return "|".join(p.split("=", 1)[-1] for p in partition.split("/"))


def rerun_hint(stage: str, partition: str | None) -> str:
    part = "" if partition is None else f" --partition '{dagster_key(partition)}'"
    return f"dagster asset materialize -m msae_assets.definitions --select {stage}{part}"


def verify_upstream(store: Store, stage: str, partition: str | None,
                    outputs: dict[str, dict[str, Any]] | None) -> None:
    """Raise :class:`IntegrityError` if ``stage``'s recorded outputs are damaged (see module doc)."""
    if outputs is None:
        warn_unverified(store, stage, partition)
        return
    damage = find_damage(store, outputs)
    if damage:
        it = "them" if len(damage) > 1 else "it"
        raise IntegrityError(
            f"upstream stage {where(stage, partition)} in store {store.root}: {describe_damage(damage)}. "
            f"{'These files' if len(damage) > 1 else 'The file'} changed after the stage wrote {it} (disk or copy "
            f"damage, a hand edit), so nothing downstream may read {it}. Re-run {where(stage, partition)} (it sees "
            f"the damage and recomputes): `{rerun_hint(stage, partition)}`, then this stage.")


_warned: set[tuple[str, str]] = set()


def warn_unverified(store: Store, stage: str, partition: str | None) -> None:
    key = (store.root, where(stage, partition))
    if key not in _warned:
        _warned.add(key)
        log.warning("%s in store %s: its manifest predates output checksums, so its files are used unverified; "
                    "re-run the stage (or delete its manifest) to record them", where(stage, partition), store.root)


def forget_damaged(store: Store, stage: str, outputs: list[dict[str, dict[str, Any]] | None]) -> list[str]:
    """Before recomputing: drop ``stage``'s resumable records (:data:`RESET_ON_DAMAGE`) when any of
    its recorded ``outputs`` (one per partition) are damaged; returns what was removed."""
    resets = RESET_ON_DAMAGE.get(stage, ())
    if not resets:
        return []
    damage = [d for recorded in outputs if recorded for d in find_damage(store, recorded)]
    if not damage:
        return []
    removed = [r for r in resets if store.exists(r)]
    for r in removed:
        store.rm(r)
    log.warning("%s: recorded outputs damaged (%s); removed %s so the stage starts over instead of reusing them",
                stage, describe_damage(damage), ", ".join(removed) or "nothing")
    return removed
