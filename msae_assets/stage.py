"""The one pattern every asset follows: fingerprint → reuse the manifest or compute → record it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from msae.manifest import Manifest, current_manifest, fingerprint, save_manifest
from msae.store import Store


def run_stage(
    context: dg.AssetExecutionContext,
    store: Store,
    stage: str,
    code_version: str,
    inputs: dict[str, str],
    compute: Callable[[], tuple[str, dict[str, Any]]],
    partition: str | None = None,
) -> Manifest:
    """Return the stage's manifest, computing only when its fingerprint changed.

    ``compute`` returns (data_version, json-able metadata). The manifest is written only after
    the stage's outputs are complete, so a crash never leaves a manifest that lies.
    """
    fp = fingerprint(code_version, inputs)
    done = current_manifest(store, stage, fp, partition)
    if done is not None:
        context.log.info(f"{stage}{f'[{partition}]' if partition else ''}: up to date ({fp}), reusing")
        return Manifest(done.stage, done.fingerprint, done.data_version, {**done.metadata, "reused": True})
    data_version, metadata = compute()
    manifest = Manifest(stage, fp, data_version, {**metadata, "reused": False})
    save_manifest(store, manifest, partition)
    return manifest


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
