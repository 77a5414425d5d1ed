"""One PNG card per latent, for people browsing latents: stats, top images (original | masked |
heat-map) and top texts with the peak word marked. PIL only, so cards render anywhere."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from msae.latents.evidence import ImageExample, LatentEvidence, TextExample, latents_dir
from msae.latents.render import heatmap_overlay, mark_peak, mask_inactive
from msae.store import Store

CELL = 192
"""Side of the box each image view is fitted into."""
MIN_SIDE = 128
"""Smaller images are upscaled (NEAREST, integer factor) to at least this, so 64-px scenes stay legible."""
GAP = 8
MARGIN = 12
INFO_WIDTH = 300
CARD_WIDTH = 2 * MARGIN + 3 * CELL + 3 * GAP + INFO_WIDTH
FONT_SIZE = 13
LINE = 17
TEXT_WINDOW = 40
"""Tokens kept on each side of a text example's peak on the card."""
MAX_TEXT_LINES = 5
BACKGROUND, INK, MUTED, ACCENT = (255, 255, 255), (20, 20, 20), (110, 110, 110), (170, 40, 40)


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at a readable size (bitmap fallback on PIL builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _num(value: Any, fmt: str) -> str:
    """A short number, '–' for missing/NaN."""
    if value is None:
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if math.isnan(number) else format(number, fmt)


def stat_summary(stats: Mapping[str, Any]) -> dict[str, str]:
    """The key per-latent statistics as short strings (cards and the index page)."""
    return {
        "freq img": _num(stats.get("freq_image"), ".2e"),
        "freq txt": _num(stats.get("freq_text"), ".2e"),
        "max img": _num(stats.get("max_image"), ".3g"),
        "max txt": _num(stats.get("max_text"), ".3g"),
        "modality": _num(stats.get("modality_score"), ".2f"),
    }


def fit_image(image: Image.Image, box: int = CELL, min_side: int = MIN_SIDE) -> Image.Image:
    """Upscale small images by an integer NEAREST factor (patches stay crisp), shrink big ones into box."""
    longest = max(image.size)
    if longest < min_side:
        factor = min(math.ceil(min_side / longest), max(1, box // longest))
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    if longest > box:
        scale = box / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BICUBIC)
    return image


def wrap_text(text: str, font: Any, max_width: int) -> list[str]:
    """Greedy word wrap by rendered width; words longer than a line are cut by characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if font.getlength(candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while font.getlength(word) > max_width and len(word) > 1:
                cut = max(1, next((i for i in range(len(word), 0, -1) if font.getlength(word[:i]) <= max_width), 1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _clip_lines(lines: list[str], limit: int) -> list[str]:
    return lines if len(lines) <= limit else [*lines[: limit - 1], lines[limit - 1] + " …"]


def _load_image(path: str) -> Image.Image | None:
    """The sample's image, read as extraction read it (bounded, upright); None when unreadable, so
    the card still renders."""
    from msae.data.images import BadImage, load_image_rgb

    try:
        return load_image_rgb(path)
    except (BadImage, OSError, ValueError):
        return None


def _image_views(example: ImageExample) -> list[Image.Image | None]:
    image = _load_image(example.image_path)
    if image is None:
        return [None, None, None]
    acts = example.patch_activations
    thr = example.active_threshold
    return [fit_image(view) for view in (image, mask_inactive(image, acts, thr), heatmap_overlay(image, acts,
                                                                                                threshold=thr))]


def _image_caption(example: ImageExample, rank: int, font: Any) -> list[str]:
    head = [f"#{rank} {example.sample_id}",
            f"score {example.score:.4g}  active {example.active_count}",
            f"mean {example.mean_activation:.3g}  max {example.max_activation:.3g}"]
    qa = wrap_text(f"Q: {example.question}", font, INFO_WIDTH - GAP) + wrap_text(f"A: {example.answer}", font,
                                                                                     INFO_WIDTH - GAP)
    return head + _clip_lines(qa, 5)


def _text_lines(example: TextExample, rank: int, font: Any) -> tuple[str, list[str]]:
    peak_act = float(example.activations[example.peak]) if example.peak >= 0 else float("nan")
    head = f"#{rank} {example.sample_id}  max {_num(peak_act, '.3g')}"
    acts = [0.0] * len(example.pieces)
    if example.peak >= 0:
        acts[example.peak] = 1.0  # mark the evidence's peak (it honours template eligibility)
    body = (mark_peak(example.pieces, acts, window=TEXT_WINDOW, display=example.display()) if example.pieces
            else "(no text tokens)")
    return head, _clip_lines(wrap_text(body, font, CARD_WIDTH - 2 * MARGIN), MAX_TEXT_LINES)


def _header(evidence: LatentEvidence, title: str | None) -> list[str]:
    stats = stat_summary(evidence.stats)
    line = "   ".join(f"{key} {value}" for key, value in stats.items())
    return [title or f"latent {evidence.latent}", line]


def render_card(evidence: LatentEvidence, title: str | None = None) -> bytes:
    """The latent's card as PNG bytes (CARD_WIDTH wide; height follows the number of examples)."""
    font, bold = _font(), _font(FONT_SIZE + 3)
    header = _header(evidence, title)
    image_rows = [(_image_views(ex), _image_caption(ex, i, font)) for i, ex in enumerate(evidence.images)]
    row_heights = [max(max((v.height for v in views if v is not None), default=MIN_SIDE), len(caption) * LINE)
                   for views, caption in image_rows]
    text_blocks = [_text_lines(ex, i, font) for i, ex in enumerate(evidence.texts)]

    height = MARGIN + LINE + 4 + LINE + GAP
    height += LINE + sum(h + GAP for h in row_heights)
    height += LINE + sum((1 + len(lines)) * LINE + GAP for _, lines in text_blocks) + MARGIN
    card = Image.new("RGB", (CARD_WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(card)

    y = MARGIN
    draw.text((MARGIN, y), header[0], fill=INK, font=bold)
    y += LINE + 4
    draw.text((MARGIN, y), header[1], fill=MUTED, font=font)
    y += LINE + GAP

    draw.text((MARGIN, y), f"top images ({len(image_rows)})   original | masked (explainer) | heat-map",
              fill=ACCENT, font=font)
    y += LINE
    for (views, caption), row_height in zip(image_rows, row_heights, strict=True):
        x = MARGIN
        for view in views:
            if view is None:
                draw.rectangle((x, y, x + CELL - 1, y + MIN_SIDE - 1), outline=MUTED)
                draw.text((x + GAP, y + GAP), "image unavailable", fill=MUTED, font=font)
            else:
                card.paste(view, (x + (CELL - view.width) // 2, y))
            x += CELL + GAP
        for i, line in enumerate(caption):
            draw.text((x, y + i * LINE), line, fill=INK if i == 0 else MUTED, font=font)
        y += row_height + GAP

    draw.text((MARGIN, y), f"top texts ({len(text_blocks)})   peak token in (parentheses)", fill=ACCENT, font=font)
    y += LINE
    for head, lines in text_blocks:
        draw.text((MARGIN, y), head, fill=MUTED, font=font)
        y += LINE
        for line in lines:
            draw.text((MARGIN, y), line, fill=INK, font=font)
            y += LINE
        y += GAP

    buffer = io.BytesIO()
    # zlib's default level, not optimize=True: that search made encoding 3.5x slower (two thirds of
    # the embedded default's card time) for files 2 % smaller
    card.save(buffer, format="PNG")
    return buffer.getvalue()


def card_name(latent: int) -> str:
    """A card's path relative to the latents partition folder."""
    return f"cards/latent_{latent:06d}.png"


def write_cards(store: Store, layer: int, width: int, evidence: Mapping[int, LatentEvidence],
                limit: int | None = None) -> list[str]:
    """Write cards for the first `limit` latents (by id; all when None) and return their names
    relative to ``latents_dir(layer, width)`` (where index.html lives, so they are its links)."""
    latents = sorted(evidence)[:limit] if limit is not None else sorted(evidence)
    names: list[str] = []
    for latent in latents:
        name = card_name(latent)
        store.write_bytes(render_card(evidence[latent]), latents_dir(layer, width), name)
        names.append(name)
    return names
