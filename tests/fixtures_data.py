"""Small image and LLaVA-record builders shared by the dataset tests (no network, all in tmp dirs)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_rgb(size: int = 32, seed: int = 0) -> Image.Image:
    """Random pixels: compress badly, so cutting the file in half really loses image data."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr, mode="RGB")


def truncated(fmt: str) -> bytes:
    data = encode(noise_rgb(), fmt)
    return data[: len(data) // 2]


def conv(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_llava(folder: Path, records: list[object], jsonl: bool, name: str = "data") -> Path:
    """Write records as ``<name>.json`` (a list) or ``<name>.jsonl``; str entries of a JSONL are
    written verbatim (to plant bad lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not jsonl:
        path = folder / f"{name}.json"
        path.write_text(json.dumps(records))
        return path
    path = folder / f"{name}.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
