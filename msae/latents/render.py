"""Pure rendering of a latent's evidence: patch grids on images, and marked token text.

Images: LLaVA-NeXT's base view resizes the *whole* image to the square crop, so the base grid maps
proportionally onto the original image whatever its aspect ratio; patch (r, c) covers the pixels
between edges ``round(c*W/C)`` and ``round(r*H/R)`` (Python's ``round``: ties to even). Three views
are built on that map: the explainer's (inactive patches black, the method's masked prompting),
the scorer's (inactive patches blurred, the method's CLIP scoring) and a heat-map for people.

Text: token pieces as stored in ``tokens.parquet`` (raw tokenizer pieces) are turned into display
strings, then the explainer's view (peak word in parentheses), the fuzzing view (active spans in
``<< >>``, Delphi style) and the scoring window around the peak are joined from them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

# --- images: the patch grid on the original picture ---------------------------------------


def grid_edges(n_cells: int, n_pixels: int) -> np.ndarray:
    """Pixel edges of n_cells equal cells over n_pixels: ``round(i * n_pixels / n_cells)``, i = 0..n."""
    if n_cells <= 0 or n_pixels <= 0:
        raise ValueError(f"grid of {n_cells} cells over {n_pixels} pixels")
    return np.array([round(i * n_pixels / n_cells) for i in range(n_cells + 1)], dtype=np.int64)


def patch_boxes(grid_rows: int, grid_cols: int, width: int, height: int) -> np.ndarray:
    """[R, C, 4] int boxes (x0, y0, x1, y1), x1/y1 exclusive, of each base-grid patch on the image."""
    xs, ys = grid_edges(grid_cols, width), grid_edges(grid_rows, height)
    boxes = np.empty((grid_rows, grid_cols, 4), dtype=np.int64)
    boxes[..., 0] = xs[None, :-1]
    boxes[..., 1] = ys[:-1, None]
    boxes[..., 2] = xs[None, 1:]
    boxes[..., 3] = ys[1:, None]
    return boxes


def _cell_of_pixel(n_cells: int, n_pixels: int) -> np.ndarray:
    """For each pixel index, the cell whose [edge_i, edge_i+1) holds it (empty cells own no pixel)."""
    edges = grid_edges(n_cells, n_pixels)
    idx = np.searchsorted(edges, np.arange(n_pixels), side="right") - 1
    return np.clip(idx, 0, n_cells - 1)


def patch_pixel_values(patch_values: np.ndarray, width: int, height: int) -> np.ndarray:
    """[R, C, ...] per-patch values → [H, W, ...]: each pixel gets the value of the patch covering it."""
    values = np.asarray(patch_values)
    if values.ndim < 2:
        raise ValueError(f"patch values must be [rows, cols, ...], got shape {values.shape}")
    rows = _cell_of_pixel(values.shape[0], height)
    cols = _cell_of_pixel(values.shape[1], width)
    return values[rows[:, None], cols[None, :]]


def patch_pixel_mask(active: np.ndarray, width: int, height: int) -> np.ndarray:
    """[H, W] bool: True where the pixel lies in an active patch."""
    return patch_pixel_values(np.asarray(active, dtype=bool), width, height)


def _active_pixels(image: Image.Image, patch_acts: np.ndarray, threshold: float) -> np.ndarray:
    return patch_pixel_mask(np.asarray(patch_acts) > threshold, image.width, image.height)


def mask_inactive(image: Image.Image, patch_acts: np.ndarray, threshold: float = 0.0) -> Image.Image:
    """The explainer's view: pixels of patches with activation <= threshold black, the rest untouched (RGB)."""
    rgb = np.array(image.convert("RGB"))
    rgb[~_active_pixels(image, patch_acts, threshold)] = 0
    return Image.fromarray(rgb, "RGB")


def blur_inactive(image: Image.Image, patch_acts: np.ndarray, radius: float = 5.0,
                  threshold: float = 0.0) -> Image.Image:
    """The scorer's view: inactive patches replaced by the Gaussian-blurred image, active ones untouched."""
    rgb_image = image.convert("RGB")
    sharp = np.array(rgb_image)
    blurred = np.array(rgb_image.filter(ImageFilter.GaussianBlur(radius)))
    keep = _active_pixels(image, patch_acts, threshold)
    return Image.fromarray(np.where(keep[..., None], sharp, blurred), "RGB")


# A perceptual sequential map (viridis' anchor colours, linearly interpolated): dark violet for
# weak activations through teal to yellow at the latent's maximum on the image.
COLORMAP_ANCHORS: np.ndarray = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to float RGB in [0, 255], shape values.shape + (3,)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    pos = v * (len(COLORMAP_ANCHORS) - 1)
    lo = np.minimum(np.floor(pos).astype(np.int64), len(COLORMAP_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    return COLORMAP_ANCHORS[lo] * (1.0 - frac) + COLORMAP_ANCHORS[lo + 1] * frac


def heatmap_overlay(image: Image.Image, patch_acts: np.ndarray, alpha: float = 0.5,
                    threshold: float = 0.0) -> Image.Image:
    """For people: activations / max as colours blended over the image with weight alpha.

    Patches at or below threshold get black as their colour, i.e. keep the original pixels dimmed
    by (1 - alpha); pixel = round((1 - alpha) * image + alpha * colour), ties to even.
    """
    rgb = np.array(image.convert("RGB"), dtype=np.float64)
    acts = np.asarray(patch_acts, dtype=np.float64)
    peak = float(acts.max()) if acts.size else 0.0
    normalised = acts / peak if peak > 0 else np.zeros_like(acts)
    colours = np.where((acts > threshold)[..., None], colormap(normalised), 0.0)
    out = np.rint((1.0 - alpha) * rgb + alpha * patch_pixel_values(colours, image.width, image.height))
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), "RGB")


# --- text: token pieces to display strings -------------------------------------------------

_BYTE_SPACE, _BYTE_NEWLINE, _SP_SPACE = "\u0120", "\u010a", "\u2581"  # Ġ, Ċ, ▁


def _byte_level_table() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (GPT-2 / Llama-3): printable char → byte value.

    Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted to 256 + n in
    order, which is how "Ġ" (288) means space and "Ċ" (266) a newline.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table.values():
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


_BYTE_TABLE = _byte_level_table()


def _piece_style(pieces: Sequence[str]) -> str:
    """'byte' (GPT-2/Llama-3 BPE), 'sentencepiece', or 'words' (a word-level tokenizer)."""
    if any(p.startswith(_SP_SPACE) for p in pieces):
        return "sentencepiece"
    if any(p.startswith(_BYTE_SPACE) or _BYTE_NEWLINE in p for p in pieces):
        return "byte"
    return "words"


def _decode_byte_piece(piece: str) -> str:
    """Undo the byte-level alphabet; a piece that is not whole UTF-8 keeps its chars (Ġ/Ċ mapped)."""
    try:
        return bytes(_BYTE_TABLE[ch] for ch in piece).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return piece.replace(_BYTE_SPACE, " ").replace(_BYTE_NEWLINE, "\n")


def _decode_sentencepiece(piece: str) -> str:
    """'▁' is a space; byte-fallback pieces such as '<0x0A>' become their (ASCII) character."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            value = int(piece[3:5], 16)
        except ValueError:
            return piece
        return chr(value) if value < 0x80 else piece
    return piece.replace(_SP_SPACE, " ")


def display_tokens(pieces: Sequence[str]) -> list[str]:
    """Raw tokenizer pieces → display strings carrying their own leading whitespace.

    Byte-level and SentencePiece pieces encode their spaces (Ġ/▁ → space, Ċ → newline); plain words
    from a word-level tokenizer get one space before each word but the first.
    """
    style = _piece_style(pieces)
    if style == "byte":
        return [_decode_byte_piece(p) for p in pieces]
    if style == "sentencepiece":
        return [_decode_sentencepiece(p) for p in pieces]
    return [p if i == 0 else " " + p for i, p in enumerate(pieces)]


def join_tokens(display: Sequence[str]) -> str:
    """Display strings → text (they carry their own separators)."""
    return "".join(display)


def peak_index(acts: Sequence[float] | np.ndarray) -> int:
    """Index of the largest activation (ties → first); -1 for no tokens."""
    values = np.asarray(acts, dtype=np.float64)
    return int(np.argmax(values)) if values.size else -1


def _split_space(text: str) -> tuple[str, str]:
    """Leading whitespace and the rest, so marks hug the word and not its space."""
    body = text.lstrip()
    return text[: len(text) - len(body)], body


PEAK_STYLES: dict[str, tuple[str, str]] = {"parens": ("(", ")"), "brackets": ("[", "]"), "angles": ("<<", ">>")}


def _check_lengths(pieces: Sequence[str], acts: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(acts, dtype=np.float64)
    if values.shape != (len(pieces),):
        raise ValueError(f"{len(pieces)} pieces but activations of shape {values.shape}")
    return values


def _wrap_spans(display: list[str], marked: np.ndarray, opening: str, closing: str) -> str:
    """Join display strings, putting each maximal run of marked tokens inside one opening/closing pair."""
    out: list[str] = []
    for i, text in enumerate(display):
        starts = marked[i] and (i == 0 or not marked[i - 1])
        ends = marked[i] and (i == len(display) - 1 or not marked[i + 1])
        if starts:
            space, body = _split_space(text)
            text = space + opening + body
        if ends:
            body = text.rstrip()
            text = body + closing + text[len(body):]
        out.append(text)
    return join_tokens(out).strip()


def _display(pieces: Sequence[str], display: Sequence[str] | None) -> list[str]:
    """``display`` when given (e.g. with the answer position named), else the pieces' own."""
    if display is None:
        return display_tokens(pieces)
    if len(display) != len(pieces):
        raise ValueError(f"{len(pieces)} pieces but {len(display)} display strings")
    return list(display)


def mark_peak(pieces: Sequence[str], acts: Sequence[float] | np.ndarray, style: str = "parens",
              window: int | None = None, display: Sequence[str] | None = None) -> str:
    """The explainer's text: the peak-activation token wrapped, e.g. "(red)".

    window: keep only ±window tokens around the peak, with "…" where text was cut (long samples).
    display: the pieces' display strings, if not their own (``TextExample.display``).
    """
    values = _check_lengths(pieces, acts)
    if not len(pieces):
        return ""
    opening, closing = PEAK_STYLES[style]
    peak = peak_index(values)
    marked = np.zeros(len(pieces), dtype=bool)
    marked[peak] = True
    display = _display(pieces, display)
    lo, hi = 0, len(pieces)
    if window is not None:
        lo, hi = max(0, peak - window), min(len(pieces), peak + window + 1)
    text = _wrap_spans(display[lo:hi], marked[lo:hi], opening, closing)
    return ("… " if lo > 0 else "") + text + (" …" if hi < len(pieces) else "")


def mark_active(pieces: Sequence[str], acts: Sequence[float] | np.ndarray, threshold: float = 0.0) -> str:
    """The fuzzing view: every run of tokens with activation > threshold inside one << >> pair."""
    values = _check_lengths(pieces, acts)
    return _wrap_spans(display_tokens(pieces), values > threshold, "<<", ">>")


def peak_window(pieces: Sequence[str], acts: Sequence[float] | np.ndarray, size: int = 5,
                display: Sequence[str] | None = None, before_only: bool = False) -> str:
    """The tokens from peak - size to peak + size (clipped at the ends; to the peak itself with
    ``before_only``, the context a causal model's activation there saw), joined: textual scoring's
    input. display: as in :func:`mark_peak`."""
    values = _check_lengths(pieces, acts)
    if not len(pieces):
        return ""
    peak = peak_index(values)
    display = _display(pieces, display)
    return join_tokens(display[max(0, peak - size): peak + (0 if before_only else size) + 1]).strip()
