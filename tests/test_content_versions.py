"""Activations' data versions are each layer's value identity, not the extraction run's fingerprint.

Adding a layer or changing the chunking re-extracts (one forward pass writes every layer), but an
unchanged layer keeps its data version, so its SAEs are reused; a changed ``store_dtype`` (other
values) changes it.
"""

from __future__ import annotations

import copy

import dagster as dg
import polars as pl

from msae.manifest import load_manifest
from msae.store import Store
from pipeline_helpers import materialize_ok


def _versions(store: Store, layers: list[int]) -> dict[int, str]:
    return {layer: load_manifest(store, "activations", str(layer)).data_version for layer in layers}


def _reused(result: dg.ExecuteInProcessResult, name: str) -> bool:
    """The stage's ``reused`` flag as this materialization reported it (the manifest keeps the computing run's)."""
    return result.asset_materializations_for_node(name)[-1].metadata["reused"].value


def _with(data: dict, **sections) -> dict:
    out = copy.deepcopy(data)
    for key, value in sections.items():
        out[key] = {**out[key], **value} if isinstance(value, dict) else value
    return out


def test_unchanged_layers_keep_their_data_version_and_their_sae(tiny_config_data):
    one = _with(tiny_config_data, layers=[0])
    store = Store(one["store"])
    with dg.instance_for_test() as instance:
        materialize_ok(one, instance, ["vqa_samples"])
        materialize_ok(one, instance, ["activations"], "0")
        v0 = _versions(store, [0])[0]
        materialize_ok(one, instance, ["sae"], "0|16")
        assert load_manifest(store, "sae", "layer=0/width=16").metadata["reused"] is False
        fingerprint0 = load_manifest(store, "activations", "0").fingerprint

        # a second layer: the extraction runs again (another run fingerprint) but layer 0's values did not change
        both = _with(tiny_config_data, layers=[0, 2])
        act = materialize_ok(both, instance, ["activations"], "0")
        assert not _reused(act, "activations")
        assert load_manifest(store, "activations", "0").fingerprint != fingerprint0
        v = _versions(store, [0, 2])
        assert v[0] == v0 and v[2] != v0
        r = materialize_ok(both, instance, ["sae"], "0|16")
        assert _reused(r, "sae")
        materialize_ok(both, instance, ["sae"], "2|16")
        sae2 = load_manifest(store, "sae", "layer=2/width=16").data_version

        # other chunking: re-extracted in other chunks, same data versions, no SAE re-trained
        chunked = _with(both, extraction={"chunk_samples": 3, "rows_per_zarr_chunk": 64})
        act = materialize_ok(chunked, instance, ["activations"], "0")
        assert not _reused(act, "activations")
        assert _versions(store, [0, 2]) == v
        for layer in (0, 2):
            assert _reused(materialize_ok(chunked, instance, ["sae"], f"{layer}|16"), "sae")
        assert load_manifest(store, "sae", "layer=2/width=16").data_version == sae2

        # other stored values (float32 instead of float16): every layer's version changes
        wide = _with(chunked, extraction={"chunk_samples": 3, "rows_per_zarr_chunk": 64, "store_dtype": "float32"})
        materialize_ok(wide, instance, ["activations"], "0")
        changed = _versions(store, [0, 2])
        assert changed[0] != v[0] and changed[2] != v[2]
        assert not _reused(materialize_ok(wide, instance, ["sae"], "0|16"), "sae")


def test_value_inputs_drop_layout_and_other_layers_but_keep_value_settings():
    from msae.extract.progress import layer_value_inputs  # new API

    inputs = {"version": 1, "model": {"name_or_path": "m"}, "layers": [0, 2], "samples": "abc", "n_samples": 8,
              "extraction": {"include_answer": True, "chunk_samples": 4, "rows_per_zarr_chunk": 256,
                             "max_length": None, "too_long": "skip", "store_dtype": "float16"}}
    got = layer_value_inputs(inputs, 2)
    assert got["layer"] == 2 and "layers" not in got
    assert got["extraction"] == {"include_answer": True, "max_length": None, "too_long": "skip",
                                 "store_dtype": "float16"}
    other = {**inputs, "layers": [2], "extraction": {**inputs["extraction"], "chunk_samples": 1}}
    assert layer_value_inputs(other, 2) == got
    for field, value in (("max_length", 16), ("include_answer", False), ("too_long", "truncate"),
                         ("store_dtype", "float32")):
        changed = {**inputs, "extraction": {**inputs["extraction"], field: value}}
        assert layer_value_inputs(changed, 2) != got, field


def test_table_digest_is_content_not_layout():
    from msae.extract.progress import table_digest  # new API

    df = pl.DataFrame({"a": list(range(10)), "b": [f"t{i}" for i in range(10)]})
    pieces = pl.concat([df.slice(0, 3), df.slice(3, 7)], rechunk=False)
    assert table_digest(pieces) == table_digest(df)
    assert table_digest(df.with_columns(pl.col("a").cast(pl.Int32))) != table_digest(df)
    assert table_digest(df.reverse()) != table_digest(df)
