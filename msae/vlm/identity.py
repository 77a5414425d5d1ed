"""What identifies a model's outputs: a content stamp for a local folder, the hub id and revision otherwise.

One owner for the question "is this still the model that produced those activations / answers?".
A model retrained in place keeps its path, so a path alone would let a re-run reuse activations
and explanations of the old weights; the stamp changes with any file that shapes the outputs
(weights, config, tokenizer, processor, chat template). A training report beside the weights
(:data:`NOT_MODEL_FILES`) does not change what the model computes and is left out, so rewriting it
re-runs nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_FULL_HASH_BYTES = 64 << 20
_PROBE_BYTES = 1 << 20
NOT_MODEL_FILES = frozenset({"eval.json", "README.md"})
"""File names in a model folder that describe the model (the embedded VLM's training report, a
model card) rather than define it."""


def file_digest(path: Path) -> str:
    """sha256 of a file; for files over 64 MiB of its size, first and last MiB (weights change there too)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(_PROBE_BYTES))
            f.seek(size - _PROBE_BYTES)
            h.update(f.read(_PROBE_BYTES))
    return h.hexdigest()


def model_identity(ref: str, revision: str | None = None) -> str:
    """A local folder's content stamp (every defining file's name, size and hash), else the hub id
    with its revision (not resolved to a commit: that needs the network)."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        h = hashlib.sha256()
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and not p.name.startswith(".") and p.name not in NOT_MODEL_FILES)
        for path in files:
            h.update(f"{path.relative_to(folder).as_posix()}|{path.stat().st_size}|{file_digest(path)}\n".encode())
        return f"folder:{h.hexdigest()[:16]}"
    return f"hub:{ref}@{revision or 'main'}"


__all__ = ["NOT_MODEL_FILES", "file_digest", "model_identity"]
