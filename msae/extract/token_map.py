"""What every input position of a LLaVA-NeXT sequence is: image patch (which one), text or special.

Image positions are never guessed. LLaVA-NeXT scatters its packed image features into the
positions where ``input_ids == image_token_id``, in order, and the packed order is whatever the
model's own ``pack_image_features`` produces (base view row-major, then the anyres tiles
rearranged into one feature map, unpadded by ``unpad_image``, with ``image_newline`` appended to
every row). :class:`ImageTokenMapper` therefore runs that very function on synthetic *index
features* — each feature vector encodes ``[kind, a, b, marker]`` — and decodes the returned order.
The result is exact for any geometry, pinpoints and aspect ratio the installed transformers
supports, and it is cached per (image size, geometry) because it depends on nothing else.

Text roles (question / answer / template) come from character spans of the rendered chat text
matched against the tokenizer's offset mapping, so they hold for any tokenizer that merges
whitespace or punctuation into neighbouring tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

# view codes of image positions
BASE, TILE, NEWLINE = 0, 1, 2
VIEW_NAMES = ("base", "tile", "newline")
# modality codes
IMAGE, TEXT, SPECIAL = 0, 1, 2
MODALITY_NAMES = ("image", "text", "special")
# role codes (-1: none, for image tokens)
QUESTION, ANSWER, TEMPLATE = 0, 1, 2
ROLE_NAMES = ("question", "answer", "template")

NULL = -1

TOKEN_SCHEMA: dict[str, pl.DataType] = {
    "sample_index": pl.Int32(),
    "sample_id": pl.Utf8(),
    "position": pl.Int32(),
    "token_id": pl.Int32(),
    "token": pl.Utf8(),
    "modality": pl.Utf8(),
    "view": pl.Utf8(),
    "grid_row": pl.Int32(),
    "grid_col": pl.Int32(),
    "tile_row": pl.Int32(),
    "tile_col": pl.Int32(),
    "role": pl.Utf8(),
}
"""Schema of ``tokens.parquet`` (row i describes row i of every layer's activation array).

sample_index: row of the sample in the samples table; position: index in the model's input
sequence (0-based, padding never counted); modality: image | text | special; view (image only):
base | tile | newline; grid_row/grid_col (base view only): patch on the base grid (24×24 for
336/14); tile_row/tile_col (tile view): cell of the unpadded anyres feature map (tile_row is also
set on newline tokens: the row they end); token: token text (text and special tokens); role (text
and special tokens): question | answer | template.
"""


class TokenMapError(RuntimeError):
    """The token map disagrees with the model's input (a bug or an unsupported model)."""


@dataclass(frozen=True)
class ImageLayout:
    """Per image token, in scatter order: its view and coordinates (``NULL`` where not defined)."""

    view: np.ndarray  # int8 codes
    grid_row: np.ndarray
    grid_col: np.ndarray
    tile_row: np.ndarray
    tile_col: np.ndarray

    def __len__(self) -> int:
        return int(self.view.shape[0])

    @property
    def n_base(self) -> int:
        return int((self.view == BASE).sum())

    @property
    def n_newline(self) -> int:
        return int((self.view == NEWLINE).sum())


def _inner_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The module that owns ``pack_image_features`` and the LLaVA config."""
    for cand in (model, getattr(model, "model", None)):
        if cand is not None and callable(getattr(cand, "pack_image_features", None)):
            inner = getattr(cand, "model", None)
            if inner is not None and callable(getattr(inner, "pack_image_features", None)):
                return inner
            return cand
    raise TokenMapError(
        f"{type(model).__name__} has no pack_image_features (on itself or its .model); "
        "only LLaVA-NeXT models are supported"
    )


class ImageTokenMapper:
    """Decodes the model's own image-feature packing into per-token coordinates (cached)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inner = _inner_llava(model)
        cfg = self.inner.config
        vcfg = cfg.vision_config
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        if self.strategy != "default":
            raise TokenMapError(
                f"vision_feature_select_strategy={self.strategy!r} is not supported (only 'default')"
            )
        self.image_size = int(vcfg.image_size)
        self.patch_size = int(vcfg.patch_size)
        self.side = self.image_size // self.patch_size
        self.pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
        module = sys.modules[type(self.inner).__module__]
        self._num_patches = getattr(module, "image_size_to_num_patches", None)
        if self._num_patches is None:  # pragma: no cover - every llava_next version has it
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            self._num_patches = image_size_to_num_patches
        self.geometry_key = (self.image_size, self.patch_size, tuple(map(tuple, self.pinpoints)), self.strategy)
        self._cache: dict[tuple, ImageLayout] = {}

    def num_crops(self, image_size: tuple[int, int]) -> int:
        """Number of crops (base + anyres tiles) the model reads for an image of (height, width)."""
        return int(self._num_patches(list(image_size), self.pinpoints, self.image_size))

    def layout(self, image_size: tuple[int, int]) -> ImageLayout:
        """Coordinates of the packed image tokens for an original image of (height, width)."""
        key = (int(image_size[0]), int(image_size[1]))
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._decode(key)
        return hit

    def _decode(self, image_size: tuple[int, int]) -> ImageLayout:
        n_crops = self.num_crops(image_size)
        per_crop = self.side * self.side
        # channels: [kind, a, b, marker]; base: a=row, b=col; tile: a=crop index, b=patch index
        feats = torch.zeros(n_crops, per_crop, 4, dtype=torch.float64)
        idx = torch.arange(per_crop, dtype=torch.float64)
        feats[0, :, 0] = BASE
        feats[0, :, 1] = torch.div(idx, self.side, rounding_mode="floor")
        feats[0, :, 2] = idx % self.side
        for t in range(1, n_crops):
            feats[t, :, 0] = TILE
            feats[t, :, 1] = t - 1
            feats[t, :, 2] = idx
        feats[..., 3] = 1.0
        newline = torch.tensor([NEWLINE, -1.0, -1.0, 7.0], dtype=torch.float64)
        packed, lens = self.inner.pack_image_features(
            [feats], torch.tensor([list(image_size)]), vision_feature_select_strategy=self.strategy,
            image_newline=newline,
        )
        out = packed[0].numpy()
        if out.shape[0] != int(lens[0]):
            raise TokenMapError(f"pack_image_features returned {out.shape[0]} rows but lens={int(lens[0])}")
        kind = np.rint(out[:, 0]).astype(np.int8)
        marker = out[:, 3]
        if not np.all((kind == NEWLINE) == (marker == 7.0)) or not np.all(np.isin(kind, (BASE, TILE, NEWLINE))):
            raise TokenMapError("pack_image_features mixed feature channels; cannot decode the layout")
        a = np.rint(out[:, 1]).astype(np.int64)
        b = np.rint(out[:, 2]).astype(np.int64)
        n = out.shape[0]
        grid_row = np.full(n, NULL, np.int64)
        grid_col = np.full(n, NULL, np.int64)
        tile_row = np.full(n, NULL, np.int64)
        tile_col = np.full(n, NULL, np.int64)
        is_base = kind == BASE
        grid_row[is_base], grid_col[is_base] = a[is_base], b[is_base]

        # The anyres section: rows of the unpadded feature map, each ended by one newline. Rows and
        # columns are read off that structure, not recomputed.
        first_non_base = int(np.argmax(~is_base)) if (~is_base).any() else n
        if is_base[first_non_base:].any():
            raise TokenMapError("base-view features are not all before the anyres features")
        sec_kind = kind[first_non_base:]
        is_nl = sec_kind == NEWLINE
        row_of = np.cumsum(is_nl) - is_nl  # newline ends the row it is on
        tiles = sec_kind == TILE
        if tiles.any():
            if not is_nl[-1]:
                raise TokenMapError("anyres feature rows do not end with image_newline")
            row_starts = np.flatnonzero(np.r_[True, is_nl[:-1]])
            col_of = np.arange(len(sec_kind)) - row_starts[row_of]
            widths = np.diff(np.r_[row_starts, len(sec_kind)]) - 1
            if widths.min() != widths.max():
                raise TokenMapError("anyres feature rows have different widths")
            # every (crop, patch) appears at most once
            pairs = a[first_non_base:][tiles] * per_crop + b[first_non_base:][tiles]
            if np.unique(pairs).size != pairs.size:
                raise TokenMapError("anyres features repeat a patch")
            tile_row[first_non_base:] = row_of
            tile_col[first_non_base:] = np.where(is_nl, NULL, col_of)
        # (no tiles: a single newline after the base view; it has no tile coordinates)
        if is_base.sum() != per_crop or not np.array_equal(
            grid_row[is_base] * self.side + grid_col[is_base], np.arange(per_crop)
        ):
            raise TokenMapError("base view is not the full row-major patch grid")
        return ImageLayout(kind, grid_row, grid_col, tile_row, tile_col)


# --- text spans ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """The chat text fed to the processor and the character spans of question and answer in it."""

    text: str
    question: tuple[int, int] | None
    answer: tuple[int, int] | None


_QS, _AS = "\x02MSAEQ\x03", "\x02MSAEA\x03"


class ChatRenderer:
    """Renders ``[image] question (answer)`` with the processor's chat template and locates spans.

    The answer is the assistant turn of the same template (so the template's end-of-turn tokens
    follow it) when that rendering extends the generation prompt; otherwise it is appended to
    the generation prompt verbatim.
    """

    def __init__(self, processor: Any, include_answer: bool) -> None:
        self.processor = processor
        self.include_answer = include_answer
        self._skeleton: dict[bool, tuple[str, str, str] | None] = {}

    def _messages(self, question: str, has_image: bool) -> list[dict]:
        content: list[dict] = [{"type": "image"}] if has_image else []
        content.append({"type": "text", "text": question})
        return [{"role": "user", "content": content}]

    def _render(self, question: str, answer: str | None, has_image: bool) -> str:
        msgs = self._messages(question, has_image)
        prompt = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if answer is None:
            return prompt
        msgs = msgs + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        full = self.processor.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
        if full.startswith(prompt) and answer in full[len(prompt):]:
            return full
        return prompt + answer

    def _skeleton_for(self, has_image: bool) -> tuple[str, str, str] | None:
        """(before question, between question and answer, after answer) of the template."""
        if has_image not in self._skeleton:
            text = self._render(_QS, _AS if self.include_answer else None, has_image)
            sk = None
            if text.count(_QS) == 1 and (not self.include_answer or text.count(_AS) == 1):
                before, rest = text.split(_QS)
                if self.include_answer:
                    mid, after = rest.split(_AS)
                else:
                    mid, after = rest, ""
                sk = (before, mid, after)
            self._skeleton[has_image] = sk
        return self._skeleton[has_image]

    def render(self, question: str, answer: str | None, has_image: bool) -> Rendered:
        answer = answer if self.include_answer else None
        if self.include_answer and answer is None:
            answer = ""
        text = self._render(question, answer, has_image)
        sk = self._skeleton_for(has_image)
        if sk is not None:
            before, mid, after = sk
            guess = before + question + mid + (answer or "") + after
            if guess == text:
                q0 = len(before)
                a0 = q0 + len(question) + len(mid)
                return Rendered(text, (q0, q0 + len(question)), (a0, a0 + len(answer)) if answer else None)
        # the template transformed the content (e.g. trimmed it): fall back to searching the strings
        qspan = _find(text, question, 0, last=False)
        aspan = _find(text, answer or "", qspan[1] if qspan else 0, last=True)
        return Rendered(text, qspan, aspan)


def _find(text: str, needle: str, start: int, last: bool) -> tuple[int, int] | None:
    for cand in dict.fromkeys((needle, needle.strip())):
        if cand:
            i = text.rfind(cand, start) if last else text.find(cand, start)
            if i >= 0:
                return (i, i + len(cand))
    return None


def shift_span(span: tuple[int, int] | None, replacements: list[dict]) -> tuple[int, int] | None:
    """Move a character span of the chat text into the processor's expanded text (where each
    image placeholder was replaced by many image tokens)."""
    if span is None:
        return None
    s, e = span
    ds = de = 0
    for rep in replacements:
        (o0, o1), (n0, n1) = rep["span"], rep["new_span"]
        delta = (n1 - n0) - (o1 - o0)
        if s >= o1:
            ds += delta
        if e >= o1:
            de += delta
    return (s + ds, e + de)


def expand_spans(text: str, image_token: str, n_image_tokens: list[int]) -> list[dict]:
    """The replacement records the processor would report, for processors that do not."""
    out, offset, start = [], 0, 0
    for n in n_image_tokens:
        i = text.find(image_token, start)
        if i < 0:
            break
        j = i + len(image_token)
        new_len = len(image_token) * n
        out.append({"span": (i, j), "new_span": (i + offset, i + offset + new_len)})
        offset += new_len - len(image_token)
        start = j
    return out


def token_roles(
    offsets: np.ndarray | None, question: tuple[int, int] | None, answer: tuple[int, int] | None
) -> np.ndarray:
    """Role code per token from its character span: overlapping the question/answer span wins."""
    if offsets is None:
        return None  # type: ignore[return-value]
    s, e = offsets[:, 0], offsets[:, 1]
    roles = np.full(len(offsets), TEMPLATE, np.int8)
    nonempty = e > s
    for code, span in ((QUESTION, question), (ANSWER, answer)):
        if span is not None:
            roles[nonempty & (s < span[1]) & (e > span[0])] = code
    return roles


# --- assembling the table --------------------------------------------------------------------------


@dataclass
class SampleTokens:
    """Everything the table needs about one processed sample (arrays over its kept positions)."""

    sample_index: int
    sample_id: str
    input_ids: np.ndarray  # int64 [n]
    roles: np.ndarray | None  # int8 [n] or None when offsets are unavailable
    layouts: list[ImageLayout]


def classify(
    input_ids: np.ndarray, image_token_id: int, special_ids: np.ndarray, layouts: list[ImageLayout], label: str
) -> dict[str, np.ndarray]:
    """Per-position modality / view / coordinates for one sample (vectorised)."""
    n = len(input_ids)
    is_image = input_ids == image_token_id
    n_img = int(is_image.sum())
    expected = sum(len(lay) for lay in layouts)
    if n_img != expected:
        raise TokenMapError(
            f"{label}: {n_img} image tokens in input_ids but the model packs {expected} image features"
        )
    modality = np.where(is_image, IMAGE, np.where(np.isin(input_ids, special_ids), SPECIAL, TEXT)).astype(np.int8)
    cols = {k: np.full(n, NULL, np.int64) for k in ("grid_row", "grid_col", "tile_row", "tile_col")}
    view = np.full(n, NULL, np.int8)
    if layouts:
        pos = np.flatnonzero(is_image)
        cat = (lambda name: np.concatenate([getattr(lay, name) for lay in layouts]))
        view[pos] = cat("view")
        for k in cols:
            cols[k][pos] = cat(k)
    return {"modality": modality, "view": view, **cols}


def _codes_to_str(codes: np.ndarray, names: tuple[str, ...]) -> pl.Series:
    return pl.Series(codes.astype(np.int8)).replace_strict(
        {i: n for i, n in enumerate(names)}, default=None, return_dtype=pl.Utf8
    )


def _nullable(values: np.ndarray) -> pl.Series:
    s = pl.Series("v", values.astype(np.int32))
    if not (values < 0).any():
        return s
    return s.to_frame().select(pl.when(pl.col("v") >= 0).then(pl.col("v"))).to_series()


def build_token_table(
    samples: list[SampleTokens], tokenizer: Any, image_token_id: int, special_ids: np.ndarray
) -> pl.DataFrame:
    """The token-table rows for a batch of samples, in sample order then position order."""
    if not samples:
        return pl.DataFrame(schema=TOKEN_SCHEMA)
    parts = [
        classify(s.input_ids, image_token_id, special_ids, s.layouts, f"sample {s.sample_id!r}") for s in samples
    ]
    lengths = np.array([len(s.input_ids) for s in samples])
    ids = np.concatenate([s.input_ids for s in samples])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    modality = cat["modality"]
    roles = np.concatenate(
        [s.roles if s.roles is not None else np.full(len(s.input_ids), TEMPLATE, np.int8) for s in samples]
    )
    roles = np.where(modality == IMAGE, NULL, roles).astype(np.int8)
    token_text = np.array(tokenizer.convert_ids_to_tokens(ids.tolist()), dtype=object)
    token_text[modality == IMAGE] = None
    positions = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    df = pl.DataFrame(
        {
            "sample_index": pl.Series(np.repeat([s.sample_index for s in samples], lengths).astype(np.int32)),
            "sample_id": pl.Series(np.repeat(np.array([s.sample_id for s in samples], dtype=object), lengths),
                                   dtype=pl.Utf8),
            "position": pl.Series(positions),
            "token_id": pl.Series(ids.astype(np.int32)),
            "token": pl.Series(token_text, dtype=pl.Utf8),
            "modality": _codes_to_str(modality, MODALITY_NAMES),
            "view": _codes_to_str(cat["view"], VIEW_NAMES),
            "grid_row": _nullable(cat["grid_row"]),
            "grid_col": _nullable(cat["grid_col"]),
            "tile_row": _nullable(cat["tile_row"]),
            "tile_col": _nullable(cat["tile_col"]),
            "role": _codes_to_str(roles, ROLE_NAMES),
        }
    )
    return df.cast(TOKEN_SCHEMA)
