"""Per-sample preparation: image loading, chat rendering, processor call and token mapping.

One sample row → :class:`Prepared` (model inputs and its :class:`SampleTokens`) or :class:`Skipped`
(a reason and a detail), exactly as extraction and :func:`msae.extract.batching.prepare_batches` see it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from msae.config import ExtractionConfig
from msae.data.images import DEFAULT_LIMITS, ImageLimits
from msae.extract.token_map import (
    ChatRenderer,
    ImageTokenMapper,
    SampleTokens,
    TokenMapError,
    classify,
    expand_spans,
    shift_span,
    token_roles,
)
from msae.vlm.load import LoadedVLM

logger = logging.getLogger("msae.extract")

SAMPLE_COLUMNS = ("sample_id", "image", "question", "answer")
LOUD_SKIPS = 3  # too-long samples logged as warnings per run; the rest at debug level (all are counted)


@dataclass
class Prepared:
    tokens: SampleTokens
    input_ids: torch.Tensor  # [n] long
    pixel_values: torch.Tensor | None  # [n_crops, 3, H, W]
    image_size: tuple[int, int] | None


@dataclass
class Skipped:
    sample_index: int
    sample_id: str
    reason: str
    detail: str


class _Preparer:
    """Image loading, chat rendering, processor call and token mapping for one sample."""

    def __init__(self, vlm: LoadedVLM, cfg: ExtractionConfig, mapper: ImageTokenMapper,
                 image_limits: ImageLimits = DEFAULT_LIMITS) -> None:
        """``image_limits``: the dataset's bounds on one image read (default: the library's), so an
        image the samples stage accepted under raised limits is read here under the same ones."""
        self.image_limits = image_limits
        self.processor = vlm.processor
        self.tokenizer = vlm.tokenizer
        self.cfg = cfg
        self.mapper = mapper
        self.renderer = ChatRenderer(vlm.processor, cfg.include_answer)
        self.image_token_id = image_token_id(vlm.model)
        self.image_token = getattr(self.processor, "image_token", "<image>")
        self.special_ids = special_ids(self.tokenizer, self.image_token_id)
        self.offsets_ok = True
        self._warned_roles = False
        self.max_positions = context_length(vlm.model)
        self._too_long_logged = 0
        if self.max_positions is None:
            logger.info("the model's config gives no max_position_embeddings: sequence lengths are not checked")

    def _process(self, img: Any, text: str) -> Any:
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self.offsets_ok:
            kwargs |= {"return_offsets_mapping": True, "return_text_replacement_offsets": True}
        images = [img] if img is not None else None
        try:
            return self.processor(images=images, text=[text], **kwargs)
        except Exception:  # noqa: BLE001
            if not self.offsets_ok:
                raise
            enc = self.processor(images=images, text=[text], return_tensors="pt")  # raises if the input is bad
            self.offsets_ok = False  # the processor cannot give offsets: roles fall back to "template"
            logger.warning("processor cannot return offset mappings; text roles will all be 'template'")
            return enc

    def __call__(self, index: int, row: dict[str, Any]) -> Prepared | Skipped:
        from msae.data.images import BadImage, load_image_rgb, to_rgb

        sid = str(row["sample_id"])
        img = None
        if row.get("image"):
            try:
                img = load_image_rgb(row["image"], self.image_limits)
                if img.mode != "RGB":
                    img = to_rgb(img)
            except BadImage as err:
                return Skipped(index, sid, err.reason, str(err))
            except Exception as err:  # noqa: BLE001 - anything else about the image
                return Skipped(index, sid, "unreadable_image", f"{type(err).__name__}: {err}")
        question = row.get("question") or ""
        answer = row.get("answer") or ""
        try:
            rendered = self.renderer.render(question, answer, img is not None)
            enc = self._process(img, rendered.text)
        except Exception as err:  # noqa: BLE001 - a processor failure skips the sample
            return Skipped(index, sid, "processor_error", f"{type(err).__name__}: {err}")

        ids = enc["input_ids"][0].to(torch.long)
        ids_np = ids.numpy()
        layouts, pixel_values, image_size = [], None, None
        if img is not None:
            image_size = tuple(int(v) for v in enc["image_sizes"][0].tolist())
            n_crops = self.mapper.num_crops(image_size)
            pixel_values = enc["pixel_values"][0][:n_crops]
            layouts = [self.mapper.layout(image_size)]

        roles = None
        if self.offsets_ok and "offset_mapping" in enc:
            offsets = enc["offset_mapping"][0].numpy()
            reps = enc.get("text_replacement_offsets")
            reps = reps[0] if reps else expand_spans(
                rendered.text, self.image_token, [int((ids_np == self.image_token_id).sum())] if img else []
            )
            roles = token_roles(offsets, shift_span(rendered.question, reps), shift_span(rendered.answer, reps))

        # truncate text beyond max_length, never cutting image tokens
        if self.cfg.max_length is not None and len(ids_np) > self.cfg.max_length:
            img_pos = np.flatnonzero(ids_np == self.image_token_id)
            keep = max(self.cfg.max_length, int(img_pos[-1]) + 1 if img_pos.size else 0)
            ids, ids_np = ids[:keep], ids_np[:keep]
            roles = roles[:keep] if roles is not None else None

        # the model's context: a longer sequence is skipped or (text only) truncated, never fed as is
        if self.max_positions is not None and len(ids_np) > self.max_positions:
            why = self._beyond_context(sid, ids_np)
            if why is not None:
                return Skipped(index, sid, "too_long", why)
            ids, ids_np = ids[: self.max_positions], ids_np[: self.max_positions]
            roles = roles[: self.max_positions] if roles is not None else None

        tokens = SampleTokens(index, sid, ids_np, roles, layouts)
        try:  # the model would refuse this input too: skip it, loudly
            classify(ids_np, self.image_token_id, self.special_ids, layouts, f"sample {sid!r}")
        except TokenMapError as err:
            logger.warning(str(err))
            return Skipped(index, sid, "image_token_mismatch", str(err))
        return Prepared(tokens, ids, pixel_values, image_size)

    def _beyond_context(self, sid: str, ids_np: np.ndarray) -> str | None:
        """Why a sequence longer than the model's context is skipped, or None to truncate its text.

        Truncation (``extraction.too_long: truncate``) only cuts text: a sample whose image tokens
        reach past the limit is skipped either way."""
        limit = self.max_positions
        img_pos = np.flatnonzero(ids_np == self.image_token_id)
        image_end = int(img_pos[-1]) + 1 if img_pos.size else 0
        what = (f"{len(ids_np)} tokens ({img_pos.size} image + {len(ids_np) - img_pos.size} text) exceed the "
                f"model's {limit} positions (max_position_embeddings)")
        if image_end > limit:
            why = f"{what}; its image tokens alone reach position {image_end}: use a smaller image"
        elif self.cfg.too_long == "skip":
            why = f"{what}; shorten the text, or set extraction.too_long: truncate (or extraction.max_length)"
        else:
            why = None
        level = logging.WARNING if self._too_long_logged < LOUD_SKIPS else logging.DEBUG
        self._too_long_logged += 1
        if why is None:
            logger.log(level, "sample %r: %s; text truncated to %d tokens (extraction.too_long: truncate)",
                       sid, what, limit)
        else:
            logger.log(level, "sample %r skipped (too_long): %s", sid, why)
        return why


def context_length(model: torch.nn.Module) -> int | None:
    """Positions the language model takes (LLaVA-NeXT: ``text_config.max_position_embeddings``); None if unsaid."""
    cfg = model.config
    text = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(text, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def image_token_id(model: torch.nn.Module) -> int:
    cfg = model.config
    for key in ("image_token_id", "image_token_index"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{type(model).__name__}.config has no image_token_id")


def special_ids(tokenizer: Any, image_id: int) -> np.ndarray:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("added_tokens_decoder",):
        for i, tok in (getattr(tokenizer, attr, None) or {}).items():
            if getattr(tok, "special", False):
                ids.add(int(i))
    ids.discard(image_id)
    return np.array(sorted(ids), dtype=np.int64)
