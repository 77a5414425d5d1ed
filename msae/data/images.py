"""Opening dataset images as RGB, with every failure mapped to one of a few skip reasons.

Two steps, kept apart on purpose:

* :func:`check_image_ref` decides whether a dataset's image reference may be opened at all, from
  the text of the reference alone (nothing is opened): a path must resolve, after ``..`` and
  symlinks, inside the dataset's image root or an allowed extra root; ``file://`` is a path like
  any other; ``http(s)://`` only when the dataset allows URLs; any other scheme only inside a root
  on that filesystem. A dataset file therefore cannot make the pipeline read ``/etc/passwd`` or
  fetch arbitrary URLs.
* :func:`load_image_rgb` reads a checked reference with bounds: regular files only (never a
  device, FIFO or directory), at most ``max_bytes`` bytes read, at most ``max_pixels`` pixels
  decoded (judged from the header, before decoding), URLs through httpx with a deadline and no
  credentials. Later stages re-read the references stored in ``samples.parquet`` through it.

Images are decoded fully on open (``load()``) so a broken file is caught while building the
sample table, not hours later in the middle of an extraction, and turned upright by their EXIF
orientation (as every viewer shows them). PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay
False (its default): with it on, a truncated file decodes "successfully" with grey padding.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Literal, get_args

import httpx
import numpy as np
from fsspec.core import url_to_fs
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from msae.store import Store

if TYPE_CHECKING:
    from msae.config import DatasetConfig

ImageReason = Literal[
    "missing_image",
    "unreadable_image",
    "truncated_image",
    "empty_image",
    "not_regular_file",
    "image_too_large",
    "outside_image_root",
    "url_not_allowed",
    "unsupported_scheme",
    "url_fetch_failed",
]
IMAGE_REASONS: tuple[str, ...] = get_args(ImageReason)

DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own Image.MAX_IMAGE_PIXELS default
DEFAULT_URL_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
URL_SCHEMES = ("http", "https")
_READ_CHUNK = 1 << 20
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


class BadImage(Exception):
    """An image that cannot be used; ``reason`` is one of :data:`IMAGE_REASONS`."""

    def __init__(self, reason: ImageReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one image read: bytes read, pixels decoded, seconds spent fetching a URL."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    url_timeout_s: float = DEFAULT_URL_TIMEOUT_S

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> ImageLimits:
        """The limits a dataset config sets (stages that re-read its images should use these too)."""
        return cls(cfg.max_image_bytes, cfg.max_image_pixels, cfg.image_url_timeout_s)


DEFAULT_LIMITS = ImageLimits()


# --- which references may be opened ----------------------------------------------------------


def _split_scheme(ref: str) -> tuple[str | None, str]:
    """(lower-case scheme, rest) of ``scheme://rest``; (None, ref) for a plain path."""
    m = _SCHEME.match(ref)
    return (m.group(1).lower(), m.group(2)) if m else (None, ref)


def _normalise_root(root: str) -> str:
    """A root in the form refs are compared with: a real absolute path, or ``scheme://normpath``."""
    scheme, rest = _split_scheme(root)
    if scheme in (None, "file"):
        return os.path.realpath(os.path.abspath(rest))
    return f"{scheme}://{posixpath.normpath(rest)}".rstrip("/")


def _absolute_base(root: str) -> str:
    """``root`` with a local path made absolute (symlinks kept: stored refs keep the user's form)."""
    scheme, rest = _split_scheme(root)
    return os.path.abspath(rest) if scheme in (None, "file") else root.rstrip("/")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


@dataclass(frozen=True)
class ImagePolicy:
    """Where one dataset's image references may point.

    ``base``: what relative references are relative to (a local folder or URL), None if nothing;
    ``roots``: normalised local real paths / URL prefixes that references must fall inside.
    """

    base: str | None
    roots: tuple[str, ...]
    allow_urls: bool = False
    limits: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def build(
        cls,
        image_root: str | None,
        extra_roots: tuple[str, ...] | list[str] = (),
        allow_urls: bool = False,
        limits: ImageLimits = DEFAULT_LIMITS,
    ) -> ImagePolicy:
        """The policy of a dataset whose own images live under ``image_root`` (None: it has none)."""
        roots = [image_root] if image_root else []
        base = _absolute_base(image_root) if image_root else None
        return cls(base, tuple(_normalise_root(r) for r in [*roots, *extra_roots]), allow_urls, limits)


def _check_local(path: str, policy: ImagePolicy) -> str:
    if not os.path.isabs(path):
        if policy.base is None:
            raise BadImage(
                "outside_image_root",
                f"{path}: relative image path, and this dataset has no image root to resolve it "
                "against (set dataset.image_root)",
            )
        return check_image_ref(posixpath.join(policy.base, path), policy)
    norm = os.path.normpath(path)
    real = os.path.realpath(norm)  # lstat/readlink only: resolving a symlink opens nothing
    if not any(_inside(real, root) for root in policy.roots if root.startswith("/")):
        where = ", ".join(policy.roots) or "none configured"
        raise BadImage(
            "outside_image_root",
            f"{path}: resolves to {real}, outside the allowed image roots ({where}); "
            "add its folder to dataset.allowed_image_roots if it is meant to be read",
        )
    return norm


def _check_url(url: str, policy: ImagePolicy) -> str:
    if not policy.allow_urls:
        raise BadImage(
            "url_not_allowed", f"{url}: image URLs are not fetched (set dataset.allow_image_urls to allow them)"
        )
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as err:
        raise BadImage("url_not_allowed", f"{url}: invalid URL ({err})") from None
    if not parsed.host:
        raise BadImage("url_not_allowed", f"{url}: URL has no host")
    if parsed.userinfo:
        raise BadImage("url_not_allowed", f"{parsed.copy_with(username=None, password=None)}: "
                                          "URLs with credentials are refused")
    return url


def _check_remote(ref: str, scheme: str, rest: str, policy: ImagePolicy) -> str:
    norm = f"{scheme}://{posixpath.normpath(rest)}"
    if any(_inside(norm, root) for root in policy.roots):
        return norm
    if any(root.startswith(f"{scheme}://") for root in policy.roots):
        raise BadImage("outside_image_root", f"{ref}: outside the allowed image roots ({', '.join(policy.roots)})")
    raise BadImage(
        "unsupported_scheme",
        f"{ref}: {scheme}:// is not an image source of this dataset (allowed: paths inside its image "
        "roots, http(s) URLs with dataset.allow_image_urls)",
    )


def check_image_ref(ref: str, policy: ImagePolicy) -> str:
    """The reference to open and store for a dataset's image ``ref``, or :class:`BadImage` saying
    why it may not be opened. Decided from the text alone: nothing is opened or fetched."""
    if "::" in ref and "://" in ref:
        raise BadImage("unsupported_scheme", f"{ref}: fsspec URL chains are not image sources")
    scheme, rest = _split_scheme(ref)
    if scheme == "file":
        return _check_local(rest, policy)
    if scheme in URL_SCHEMES:
        return _check_url(ref, policy)
    if scheme is not None:
        return _check_remote(ref, scheme, rest, policy)
    return _check_local(ref, policy)


# --- bounded reads ------------------------------------------------------------------------------


def _too_large(label: str, size: int, limits: ImageLimits) -> BadImage:
    return BadImage(
        "image_too_large", f"{label}: {size} bytes, over dataset.max_image_bytes={limits.max_bytes}"
    )


def _read_bounded(f: IO[bytes], label: str, limits: ImageLimits) -> bytes:
    """Read ``f`` to its end, but never more than ``max_bytes + 1`` bytes."""
    chunks: list[bytes] = []
    total = 0
    while chunk := f.read(min(_READ_CHUNK, limits.max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limits.max_bytes:
            raise BadImage("image_too_large", f"{label}: more than dataset.max_image_bytes={limits.max_bytes} bytes")
    return b"".join(chunks)


def _check_regular(st: os.stat_result, path: str, limits: ImageLimits) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (device, FIFO or socket)"
        raise BadImage("not_regular_file", f"{path}: {kind}")
    if st.st_size > limits.max_bytes:
        raise _too_large(path, st.st_size, limits)


def _read_local(path: str, limits: ImageLimits) -> bytes:
    try:
        _check_regular(os.stat(path), path, limits)
        # O_NONBLOCK: should the path have become a FIFO since the stat, open must not wait on it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise BadImage("missing_image", f"{path}: no such file") from None
    except OSError as err:
        raise BadImage("unreadable_image", f"{path}: {err}") from None
    try:
        with open(fd, "rb", buffering=0, closefd=True) as f:
            _check_regular(os.fstat(f.fileno()), path, limits)  # what was opened, not what was stat'ed
            return _read_bounded(f, path, limits)
    except OSError as err:
        raise BadImage("unreadable_image", f"{path}: {err}") from None


def _read_fsspec(url: str, limits: ImageLimits) -> bytes:
    try:
        fs, path = url_to_fs(url)
        info = fs.info(path)
        if info.get("type") != "file":
            raise BadImage("not_regular_file", f"{url}: a {info.get('type')}, not a file")
        size = info.get("size")
        if isinstance(size, int) and size > limits.max_bytes:
            raise _too_large(url, size, limits)
        with fs.open(path, "rb") as f:
            return _read_bounded(f, url, limits)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("missing_image", f"{url}: no such file") from None
    except Exception as err:  # noqa: BLE001 - every fsspec backend has its own errors
        raise BadImage("unreadable_image", f"{url}: {type(err).__name__}: {err}") from None


def fetch_image_url(url: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """GET an http(s) image: at most ``max_bytes`` bytes, ``url_timeout_s`` in all (each wait is
    bounded by it too), a few redirects, and no credentials (no netrc, no proxy settings, no cookies
    kept: ``trust_env=False`` and a fresh client)."""
    deadline = time.monotonic() + limits.url_timeout_s
    try:
        if httpx.URL(url).userinfo:
            raise BadImage("url_not_allowed", "an image URL with credentials is never fetched")
        with (
            httpx.Client(trust_env=False, follow_redirects=True, max_redirects=MAX_REDIRECTS,
                         timeout=limits.url_timeout_s) as client,
            client.stream("GET", url, headers={"Accept": "image/*"}) as resp,
        ):
            if resp.status_code != 200:
                raise BadImage("url_fetch_failed", f"{url}: HTTP {resp.status_code} {resp.reason_phrase}")
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise _too_large(url, int(declared), limits)
            chunks: list[bytes] = []
            total = 0
            for chunk in resp.iter_bytes():
                chunks.append(chunk)
                total += len(chunk)
                if total > limits.max_bytes:
                    raise BadImage("image_too_large",
                                   f"{url}: more than dataset.max_image_bytes={limits.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise BadImage("url_fetch_failed",
                                   f"{url}: not fetched within dataset.image_url_timeout_s={limits.url_timeout_s}")
            return b"".join(chunks)
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as err:
        raise BadImage("url_fetch_failed", f"{url}: {type(err).__name__}: {err}") from None


def read_image_bytes(ref: str, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes of an already checked reference (see :func:`check_image_ref`), bounded."""
    scheme, rest = _split_scheme(ref)
    if scheme == "file":
        return _read_local(rest, limits)
    if scheme in URL_SCHEMES:
        return fetch_image_url(ref, limits)
    if scheme is not None:
        return _read_fsspec(ref, limits)
    return _read_local(ref, limits)


# --- decoding ------------------------------------------------------------------------------------


def _is_truncation(err: BaseException) -> bool:
    return isinstance(err, EOFError) or "truncat" in str(err).lower()


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (a rotated phone photo), if there is one; a broken EXIF block
    leaves the image as stored rather than losing it."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img
    except Exception:  # noqa: BLE001 - EXIF parsing has many ways to fail; the pixels are fine
        return img


def decode_image(data: bytes, label: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode encoded image bytes fully and upright; ``label`` names the image in error details.

    The pixel count is checked from the header before anything is decoded.
    """
    if not data:
        raise BadImage("empty_image", f"{label}: 0 bytes")
    if len(data) > limits.max_bytes:
        raise _too_large(label, len(data), limits)
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except UnidentifiedImageError:
        raise BadImage("unreadable_image", f"{label}: not a recognised image format") from None
    except Image.DecompressionBombError as err:
        raise BadImage("image_too_large", f"{label}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason: ImageReason = "truncated_image" if _is_truncation(err) else "unreadable_image"
        raise BadImage(reason, f"{label}: {err}") from None
    check_pixels(img, label, limits)
    try:
        img.load()
    except Image.DecompressionBombError as err:
        raise BadImage("image_too_large", f"{label}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = "truncated_image" if _is_truncation(err) else "unreadable_image"
        raise BadImage(reason, f"{label}: {err}") from None
    if img.width == 0 or img.height == 0:
        raise BadImage("empty_image", f"{label}: size {img.width}x{img.height}")
    return _upright(img)


def check_pixels(img: Image.Image, label: str, limits: ImageLimits = DEFAULT_LIMITS) -> None:
    """Refuse an image with more pixels than ``max_pixels`` (a decompression bomb)."""
    if img.width * img.height > limits.max_pixels:
        raise BadImage(
            "image_too_large",
            f"{label}: {img.width}x{img.height} pixels, over dataset.max_image_pixels={limits.max_pixels}",
        )


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


def load_image_rgb(ref: str, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read an already checked reference (a local path, a store/dataset fsspec URL or an http(s)
    URL; see :func:`check_image_ref`) within ``limits``, decode it fully and return it as RGB."""
    return to_rgb(decode_image(read_image_bytes(ref, limits), ref, limits))


def open_dataset_image(ref: str, policy: ImagePolicy) -> tuple[str, Image.Image]:
    """Check a dataset's image reference against its policy, then read it: (checked ref, RGB image)."""
    checked = check_image_ref(ref, policy)
    return checked, load_image_rgb(checked, policy.limits)


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
