"""Find the newest checkpoint of a VLM: in a local folder, or at a Hugging Face repo's branch.

No Dagster here: the `vlm_checkpoint` source asset, the checkpoint sensor and the VLM resource all
call the same functions, and a notebook can too.

* **Folder** — either every subfolder (matching ``pattern``) is a ``save_pretrained`` checkpoint
  (``checkpoint-500/``, ``checkpoint-1000/``, … as trainers write them), or the folder itself is one
  that is overwritten in place. A checkpoint counts once its ``config.json`` and weights are there
  and no file in it changed for ``settle_s`` seconds, so one that is still being written is never
  picked. Its *version* is a hash of every file's relative path, size and modification time: cheap
  (no 16 GB read per look) and changed by any rewrite; a copy to a new place counts as new.
* **Hub repo** — the commit sha of ``revision`` (a branch, by default ``main``) from
  ``HfApi().model_info``; the checkpoint is loaded pinned to that sha, so a push during a run does
  not mix two checkpoints.

Tests fake both sides: :class:`FolderCheckpoints` takes a clock, :class:`HubCheckpoints` any object
with ``model_info(repo_id, revision=…)``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from msae.config import CheckpointsConfig, ModelConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint: what ``from_pretrained`` reads, and a stamp that changes when it does."""

    id: str
    """Short human name: the subfolder's name, or the commit sha's first 12 characters."""
    name_or_path: str
    """Local folder or hub repo id handed to ``from_pretrained``."""
    revision: str | None
    """Hub commit sha (None for a local folder)."""
    version: str
    """Data version of `vlm_checkpoint`: the full commit sha, or a hash of the folder's file stats."""
    modified: float | None = None
    """Latest modification time of its files (folders only; seconds since the epoch)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Checkpoint":
        return cls(**json.loads(text))

    def metadata(self) -> dict[str, Any]:
        """What runs and materializations record about the checkpoint they used."""
        return {"checkpoint": self.id, "checkpoint_path": self.name_or_path,
                "checkpoint_revision": self.revision or "", "checkpoint_version": self.version}


class CheckpointSource(Protocol):
    """Anything that can say which checkpoint is newest (None: none is ready yet)."""

    def latest(self) -> Checkpoint | None: ...

    def describe(self) -> str: ...


# --- local folder -----------------------------------------------------------------------------------


def natural_key(name: str) -> tuple:
    """Sort key that orders ``checkpoint-900`` before ``checkpoint-1000``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _has_weights(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir() if p.is_file()}
    for index in WEIGHT_INDEXES:
        if index in names:  # sharded: every shard the index names must be there
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            return bool(shards) and shards <= names
    return any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def is_checkpoint(folder: Path) -> bool:
    """A complete ``save_pretrained`` folder: a ``config.json`` and all its weight files."""
    return folder.is_dir() and (folder / "config.json").is_file() and _has_weights(folder)


def folder_stamp(folder: Path) -> tuple[str, float]:
    """(hash of every file's relative path, size and mtime; newest mtime) — cheap content identity."""
    h = hashlib.sha256()
    newest = 0.0
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        st = p.stat()
        newest = max(newest, st.st_mtime)
        h.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16], newest


class FolderCheckpoints:
    """Checkpoints as subfolders of ``root`` (or ``root`` itself); see the module docstring."""

    def __init__(self, root: str | Path, pattern: str = "*", order: str = "name", settle_s: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.pattern = pattern
        self.order = order
        self.settle_s = settle_s
        self.clock = clock

    def describe(self) -> str:
        return f"folder {self.root} ({self.pattern}, newest by {self.order})"

    def candidates(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (in the configured order)."""
        if not self.root.is_dir():
            return []
        if is_checkpoint(self.root):
            return [self.root]
        subs = [p for p in self.root.iterdir() if p.is_dir() and fnmatch.fnmatch(p.name, self.pattern)
                and not p.name.startswith(".") and is_checkpoint(p)]
        if self.order == "mtime":
            return sorted(subs, key=lambda p: (folder_stamp(p)[1], natural_key(p.name)))
        return sorted(subs, key=lambda p: natural_key(p.name))

    def checkpoint(self, folder: Path) -> Checkpoint:
        version, modified = folder_stamp(folder)
        return Checkpoint(id=folder.name, name_or_path=str(folder), revision=None, version=version,
                          modified=modified)

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint that has settled (a newer unsettled one is left for later)."""
        now = self.clock()
        for folder in reversed(self.candidates()):
            ckpt = self.checkpoint(folder)
            if ckpt.modified is not None and now - ckpt.modified >= self.settle_s:
                return ckpt
        return None


# --- Hugging Face hub ------------------------------------------------------------------------------


class HubApi(Protocol):
    def model_info(self, repo_id: str, *, revision: str | None = None, **kwargs: Any) -> Any: ...


class HubCheckpoints:
    """The commit at ``revision`` of a hub model repo; ``api`` defaults to ``huggingface_hub.HfApi()``."""

    def __init__(self, repo: str, revision: str = "main", api: HubApi | None = None) -> None:
        self.repo = repo
        self.revision = revision
        self._api = api

    def describe(self) -> str:
        return f"hub repo {self.repo}@{self.revision}"

    @property
    def api(self) -> HubApi:
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi()
        return self._api

    def latest(self) -> Checkpoint | None:
        sha = self.api.model_info(self.repo, revision=self.revision).sha
        if not sha:
            return None
        return Checkpoint(id=sha[:12], name_or_path=self.repo, revision=sha, version=sha)


# --- from the config -------------------------------------------------------------------------------


def checkpoint_source(cfg: CheckpointsConfig, api: HubApi | None = None) -> CheckpointSource:
    """The source a ``checkpoints`` config section describes."""
    if cfg.watch == "folder":
        return FolderCheckpoints(cfg.location, cfg.pattern, cfg.order, cfg.settle_s)
    return HubCheckpoints(cfg.location, cfg.revision, api)


def model_for_checkpoint(model: ModelConfig, ckpt: Checkpoint | None) -> ModelConfig:
    """The model config that loads ``ckpt`` (unchanged without one): same dtype, device, batching."""
    if ckpt is None:
        return model
    return model.model_copy(update={"name_or_path": ckpt.name_or_path, "revision": ckpt.revision})


__all__ = [
    "Checkpoint",
    "CheckpointSource",
    "FolderCheckpoints",
    "HubCheckpoints",
    "checkpoint_source",
    "folder_stamp",
    "is_checkpoint",
    "model_for_checkpoint",
    "natural_key",
]
