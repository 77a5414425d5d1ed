"""Materializing assets of a raw config in the test process (shared by the pipeline-level tests)."""

from __future__ import annotations

import dagster as dg

from msae.config import parse_config
from msae_assets.definitions import build_definitions


def materialize_ok(data: dict, instance: dg.DagsterInstance, names: list[str],
                   partition: str | None = None) -> dg.ExecuteInProcessResult:
    """Build the definitions of ``data``, materialize ``names`` (one partition key) and require success."""
    defs = build_definitions(parse_config(data))
    assets = {a.key.to_user_string(): a for a in defs.assets}
    result = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                            partition_key=partition, selection=names)
    assert result.success
    return result
