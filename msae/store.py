"""The output store: one root (local folder or fsspec URL) and the layout of everything under it.

All stages address files through :class:`Store` so that a local run and a run writing to
``s3://…`` or ``memory://…`` share code. Layout (see README "Output layout")::

    <store>/samples.parquet                     vqa_samples
    <store>/world/…                             shapes world (images, annotations)
    <store>/images/…                            images materialised from an hf dataset
    <store>/tokens.parquet                      one row per activation row
    <store>/activations/layer=<L>.zarr          float16 [n_tokens, d_model]
    <store>/_progress/…                         extraction checkpoints
    <store>/sae/layer=<L>/width=<W>/            one SAE (sparsify layout + msae.json + train_log.parquet,
                                                training checkpoints under _checkpoints/)
    <store>/_manifests/…                        per stage (and partition): fingerprint, data version,
                                                checksums of its outputs (msae.manifest, msae.integrity)
    <store>/_locks/…                            one lock (+ holder JSON) per stage being written
                                                (msae.store_lock)
    <store>/export/neuronpedia/layer=<L>/width=<W>/features.jsonl
                                                `msae export neuronpedia` (msae.export.neuronpedia)

Which files each stage writes under which partition: :func:`msae.integrity.stage_outputs`.
"""

from __future__ import annotations

import io
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any

import fsspec
import polars as pl
from fsspec.core import url_to_fs

TMP_SUFFIX = ".tmp"


def tmp_name(target: str) -> str:
    """A temporary name beside ``target`` that no other writer shares (pid + random), so two
    processes or threads writing the same file never write into, rename or delete each other's
    temporary file; same folder, so the final rename is atomic."""
    return f"{target}.{os.getpid()}.{secrets.token_hex(6)}{TMP_SUFFIX}"


def is_tmp_name(name: str) -> bool:
    """A file an atomic write has not renamed yet (``tmp_name``, or the older fixed ``.tmp``)."""
    return name.endswith(TMP_SUFFIX) or f"{TMP_SUFFIX}." in name.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Store:
    """A root URL plus helpers; paths are always '/'-joined relative names."""

    root: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", self.root.rstrip("/"))

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.root)[0]

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def url(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def path(self, *parts: str) -> str:
        """Path in the store's filesystem (no protocol), for fsspec calls."""
        return url_to_fs(self.url(*parts))[1]

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def makedirs(self, *parts: str) -> None:
        self.fs.makedirs(self.path(*parts), exist_ok=True)

    def rm(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.rm(self.path(*parts), recursive=True)

    # --- bytes, json, parquet -------------------------------------------------------------
    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically where the filesystem allows (local: a temp file of this writer's own,
        :func:`tmp_name`, then rename; the temp file is removed if the write fails)."""
        target = self.path(*parts)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if self.is_local:
            tmp = tmp_name(target)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            with self.fs.open(target, "wb") as f:
                f.write(data)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open(self.path(*parts), "rb") as f:
            return f.read()

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_parquet(self, df: pl.DataFrame, *parts: str) -> None:
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", statistics=True)
        self.write_bytes(buf.getvalue(), *parts)

    def read_parquet(self, *parts: str) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.read_bytes(*parts)))

    # --- zarr -------------------------------------------------------------------------------
    def zarr_store(self, *parts: str, read_only: bool = False):
        """A zarr v3 store object for a path under the root (local or fsspec)."""
        import zarr.storage

        if self.is_local:
            return zarr.storage.LocalStore(self.path(*parts), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url(*parts), read_only=read_only)

    # --- standard names ---------------------------------------------------------------------
    SAMPLES = "samples.parquet"
    TOKENS = "tokens.parquet"

    @staticmethod
    def activations_name(layer: int) -> str:
        return f"activations/layer={layer}.zarr"

    @staticmethod
    def sae_name(layer: int, width: int) -> str:
        return f"sae/layer={layer}/width={width}"
