"""Partitions come from the config: one per layer, and (later stages) one per layer × width."""

from __future__ import annotations

import dagster as dg

from msae.config import MsaeConfig


def layer_partitions(cfg: MsaeConfig) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([str(layer) for layer in cfg.layers])


def layer_width_partitions(cfg: MsaeConfig) -> dg.MultiPartitionsDefinition:
    """Keys sort by dimension name: ``"<layer>|<width>"``."""
    return dg.MultiPartitionsDefinition(
        {
            "layer": layer_partitions(cfg),
            "width": dg.StaticPartitionsDefinition([str(w) for w in cfg.widths]),
        }
    )
