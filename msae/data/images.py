"""Opening dataset images as RGB, with every failure mapped to one of a few skip reasons.

Images are decoded fully on open (``load()``) so a broken file is caught while building the
sample table, not hours later in the middle of an extraction. PIL's
``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False (its default): with it on, a truncated file
decodes "successfully" with grey padding.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Literal, get_args

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from msae.store import Store

ImageReason = Literal["missing_image", "unreadable_image", "truncated_image", "empty_image"]
IMAGE_REASONS: tuple[str, ...] = get_args(ImageReason)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one of :data:`IMAGE_REASONS`."""

    def __init__(self, reason: ImageReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _is_truncation(err: BaseException) -> bool:
    return isinstance(err, EOFError) or "truncat" in str(err).lower()


def decode_image(data: bytes, label: str) -> Image.Image:
    """Decode encoded image bytes fully; ``label`` names the image in error details."""
    if not data:
        raise BadImage("empty_image", f"{label}: 0 bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("unreadable_image", f"{label}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason: ImageReason = "truncated_image" if _is_truncation(err) else "unreadable_image"
        raise BadImage(reason, f"{label}: {err}") from None
    except Image.DecompressionBombError as err:
        raise BadImage("unreadable_image", f"{label}: {err}") from None
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if _is_truncation(err) else "unreadable_image"
        raise BadImage(reason, f"{label}: {err}") from None
    if img.width == 0 or img.height == 0:
        raise BadImage("empty_image", f"{label}: size {img.width}x{img.height}")
    return img


def _rescale_to_l(img: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float greyscale to 8 bits (PIL's own convert just clips at 255).

    I;16*: full 16-bit range. I: 16-bit range if any value exceeds 255 (how 16-bit PNGs often
    arrive), else already 8-bit. F: [0, 1] if the max is <= 1, else clipped to [0, 255].
    """
    arr = np.asarray(img, dtype=np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and peak > 255):
        arr = arr / 257.0
    elif img.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent pixels are composited onto white (as viewers show them)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    try:
        if img.mode.startswith("I") or img.mode == "F":
            return _rescale_to_l(img).convert("RGB")
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as err:
        raise BadImage("unreadable_image", f"cannot convert mode {img.mode} to RGB: {err}") from None


def load_image_rgb(ref: str) -> Image.Image:
    """Open a local path or fsspec URL, decode it fully and return it as RGB."""
    try:
        with fsspec.open(ref, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("missing_image", f"{ref}: no such file") from None
    except IsADirectoryError:
        raise BadImage("missing_image", f"{ref}: is a directory") from None
    except OSError as err:
        raise BadImage("unreadable_image", f"{ref}: {err}") from None
    return to_rgb(decode_image(data, ref))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_filename(sample_id: str, max_len: int = 100) -> str:
    """A file-name stem for ``sample_id``; a short hash is appended when the id had to change,
    so distinct ids never share a file."""
    stem = _UNSAFE.sub("_", sample_id)[:max_len]
    if stem.startswith("."):  # no hidden files, no "." or ".."
        stem = "_" + stem[1:]
    if stem != sample_id or not stem:
        stem = f"{stem}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"
    return stem


def save_png(img: Image.Image, sample_id: str, store: Store) -> str:
    """Write an RGB copy of ``img`` to ``<store>/images/<safe id>.png``; returns its URL."""
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG")
    name = f"{safe_filename(sample_id)}.png"
    store.write_bytes(buf.getvalue(), "images", name)
    return store.url("images", name)
