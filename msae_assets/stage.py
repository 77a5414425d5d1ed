"""The one pattern every asset follows: fingerprint → reuse the manifest or compute → record it.

Reuse is a checked cache (the recorded outputs must exist and match their checksums,
:mod:`msae.integrity`), and computing holds the stage's write lock (:mod:`msae.store_lock`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from msae.integrity import where
from msae.manifest import Manifest, check_manifest, fingerprint, reset_if_damaged, save_manifest
from msae.runtime import apply_threads, executor_concurrency
from msae.store import Store
from msae.store_lock import stage_lock
from msae_assets.run_health import tag_run_process


STAMP = "stamp"
"""Metadata key of every materialization: the :meth:`StagePlan.stamp` it was made under."""


@dataclass(frozen=True)
class StagePlan:
    """What decides whether one stage's partition is up to date, owned in one place for the asset
    that computes it and for the driver (:mod:`msae_assets.uptodate`) that decides, before a CLI
    call, whether the call has anything to do — so the two never disagree.

    ``inputs(store, partition)`` gives the data versions the stage reads (``partition`` in the
    store's form, e.g. ``"layer=1/width=256"``; it raises while an upstream stage has no output).
    ``check_config``: settings that decide the stage's asset checks but not its outputs (kept out of
    the code version so that changing a bound never recomputes): they are part of the stamp, so a
    changed bound still re-evaluates the checks."""

    stage: str
    code_version: str
    upstream: tuple[str, ...]
    inputs: Callable[[Store, str | None], dict[str, str]]
    check_config: Mapping[str, Any] = field(default_factory=dict)

    def fingerprint(self, store: Store, partition: str | None = None) -> str:
        """The fingerprint the stage's manifest must carry to be reused."""
        return fingerprint(self.code_version, self.inputs(store, partition))

    def stamp(self, fp: str) -> str:
        """What a materialization records (:data:`STAMP`): the fingerprint, plus the check settings."""
        return fp if not self.check_config else fingerprint(fp, {f"check:{k}": repr(v)
                                                                  for k, v in self.check_config.items()})


def run_stage(
    context: dg.AssetExecutionContext,
    store: Store,
    stage: str,
    code_version: str,
    inputs: dict[str, str],
    compute: Callable[[], tuple[str, dict[str, Any]]],
    partition: str | None = None,
) -> Manifest:
    """Return the stage's manifest, computing only when its fingerprint changed or its recorded
    outputs are missing or damaged.

    ``compute`` returns (data_version, json-able metadata). It runs under the stage's write lock
    (a second writer of the same stage output fails at once, naming this one). The manifest, with
    the checksums of the outputs, is written only after the stage's outputs are written, so a
    crash never leaves a manifest that lies; a compute whose metadata has ``incomplete`` > 0
    (parts that failed and can be retried) is recorded but not reused (see
    :func:`msae.manifest.check_manifest`).
    """
    tag_run_process(context)  # which process runs this: a killed run is then failed by the next driver call
    threads = apply_threads(step_concurrency=executor_concurrency(context))  # msae.runtime: no oversubscription
    fp = fingerprint(code_version, inputs)
    done, why = check_manifest(store, stage, fp, partition)
    if done is None:
        with stage_lock(store, stage, partition, run_id=getattr(context, "run_id", None)):
            done, why_now = check_manifest(store, stage, fp, partition)  # another writer may just have finished
            if done is None:
                context.log.info(f"{where(stage, partition)}: computing ({why})")
                reset_if_damaged(store, stage, [partition])
                data_version, metadata = compute()
                metadata = {**metadata, "threads": threads, "reused": False}  # threads: how it was computed
                return save_manifest(store, Manifest(stage, fp, data_version, metadata), partition)
            why = why_now
    context.log.info(f"{where(stage, partition)}: {why}, reusing")
    return Manifest(done.stage, done.fingerprint, done.data_version, {**done.metadata, "reused": True}, done.outputs)


def to_dagster_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Turn plain values into Dagster metadata: paths, tables as markdown, numbers as-is."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, str) and key.endswith("path"):
            out[key] = dg.MetadataValue.path(value)
        elif isinstance(value, str) and key.endswith("_md"):
            out[key.removesuffix("_md")] = dg.MetadataValue.md(value)
        elif isinstance(value, dict):
            out[key] = dg.MetadataValue.json(value)
        elif isinstance(value, (bool, int, float, str)) or value is None:
            out[key] = value if value is not None else dg.MetadataValue.null()
        else:
            out[key] = dg.MetadataValue.text(str(value))
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_(empty)_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)
