"""Train the embedded default's small CLIP (``data/shapes-clip``) on the synthetic shapes world.

The embedded default scores concepts as the method does (``docs/method.md``, "Scoring") but
cannot download CLIP/ALIGN, and a web-trained CLIP would not know this world anyway. So a
``CLIPModel`` with a tiny config is trained here, contrastively, on exactly what the scorer will
show it:

* **images** — whole scenes; scenes with every patch (8×8 grid of 8 px) outside one object's
  patches painted black (*masked*, what the explainer sees); the same with those patches Gaussian-
  blurred, radius 5, instead (*blurred*, what the visual scorer sees); and background-only views
  of both kinds (latents that fire on empty patches);
* **texts** — concept-like phrases at mixed granularity ("red", "circle", "red circle",
  "red objects", "a large blue square", "small shapes", "object at the top left", "two objects",
  "dark background"), plus ±5-token windows of the VLM's own conversations
  ("the circle ? assistant : red </s>"), because textual scores embed such windows.

Every phrase is a :class:`Constraint` (colour, shape, size, cell, count or background), so
whether a phrase is true of a view is *computed*, not assumed: the loss is a symmetric InfoNCE
whose targets are spread uniformly over all texts (images) in the batch that are true of the
image (text). That keeps mixed granularity consistent (a red circle is "red", "circle" and "red
circle" at once, never a negative of them) and lets every batch carry hard negatives (one
attribute changed) plus the 47 canonical phrases (8 colours, 4 shapes, 32 colour-shape pairs,
"one/two/three objects"). Windows are pulled towards the phrases whose attributes they mention.

Scenes come from :mod:`msae.world.shapes` with seed 2024 (training) and 77 (evaluation); the VLM
uses 0/98/99 and the pipeline's embedded default 1234. ``python -m msae.embedded.shapes_clip --out
data/shapes-clip`` trains (one CPU thread, a fixed number of steps, so it is deterministic), saves
a real ``CLIPModel`` + ``CLIPProcessor`` and writes ``eval.json``; see ``docs/shapes_clip.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from msae.vlm.build import TEMPLATE_WORDS as VLM_TEMPLATE_WORDS
from msae.world.config import V1_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import (
    COLORS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    VOCABULARY,
    QA,
    Scene,
    SceneObject,
    cell_name,
    generate_scene,
    make_questions,
    scene_rng,
)
from msae.embedded.views import (
    PATCH_SIZE,
    background_patches,
    blurred_view,
    masked_view,
    object_patches,
    pick_keep,
    visible_objects,
)

TRAIN_SEED = 2024
EVAL_SEED = 77

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)  # EOS id 3: CLIP treats eos_token_id == 2 as legacy
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
# Words concept phrases use beyond the world's question vocabulary.
EXTRA_WORDS: tuple[str, ...] = (
    *PLURALS.values(), "shapes", "things", "thing", "something", "colored", "background", "dark", "gray",
    "grey", "empty", "space", "no", "nothing", "in", "on", "with", "and", "size", "sized", "same",
    "region", "image", "scene", "part", "black",
)  # fmt: skip
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three")

# ---------------------------------------------------------------------------------------------
# Tokenizer, model, processor


def clip_vocabulary() -> list[str]:
    """Specials, the VLM's template words, the world's vocabulary, then :data:`EXTRA_WORDS` —
    so every token of the VLM's text windows is a known word."""
    return list(dict.fromkeys([*SPECIAL_TOKENS, *VLM_TEMPLATE_WORDS, *VOCABULARY, *EXTRA_WORDS]))


def build_clip_tokenizer(max_length: int = 32) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer that wraps every text as ``<s> … </s>`` (CLIP pools
    the first EOS position) and pads on the right, as CLIP's own tokenizer does."""
    vocab = clip_vocabulary()
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="right",
        model_max_length=max_length,
    )


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes of the small CLIP (chosen to train in minutes on one CPU thread and stay < 3 MiB)."""

    image_size: int = 64
    patch_size: int = PATCH_SIZE
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 64
    max_length: int = 32


def build_shapes_clip(geometry: ClipGeometry = ClipGeometry(), seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised CLIPModel and a real CLIPProcessor (CLIP image processor at the
    world's image size + the word-level tokenizer)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_clip_tokenizer(geometry.max_length)
    g = geometry
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=g.text_hidden, intermediate_size=4 * g.text_hidden,
            num_hidden_layers=g.text_layers, num_attention_heads=g.text_heads,
            max_position_embeddings=g.max_length, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=g.vision_hidden, intermediate_size=4 * g.vision_hidden, num_hidden_layers=g.vision_layers,
            num_attention_heads=g.vision_heads, image_size=g.image_size, patch_size=g.patch_size,
        ),
        projection_dim=g.projection_dim,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": g.image_size}, crop_size={"height": g.image_size, "width": g.image_size}
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ---------------------------------------------------------------------------------------------
# Views: what the explainer and the scorer see


@dataclass
class View:
    pixels: np.ndarray  # [H, W, 3] uint8
    visible: tuple[SceneObject, ...]
    kind: str  # whole | masked | blurred
    target: SceneObject | None  # the object the view is about (None: whole scene or background)


# ---------------------------------------------------------------------------------------------
# Phrases as constraints


@dataclass(frozen=True)
class Constraint:
    """What a phrase asserts about a view. Unset fields are free. ``count`` and ``background``
    are about the view as a whole; the other fields must all hold for one visible object."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    cell: tuple[int, int] | None = None
    count: int | None = None
    background: bool = False

    @property
    def family(self) -> str:
        if self.background:
            return "background"
        if self.count is not None:
            return "count"
        parts = [n for n, v in (("z", self.size), ("c", self.color), ("s", self.shape), ("p", self.cell)) if v]
        return "".join(parts) or "generic"


def holds(c: Constraint, visible: Sequence[SceneObject]) -> bool:
    """Whether phrase ``c`` is true of a view showing ``visible`` (the reference semantics;
    :func:`truth_matrix` is its vectorised twin)."""
    if c.background:
        return not visible
    if c.count is not None:
        return len(visible) == c.count
    return any(
        (c.color is None or o.color == c.color)
        and (c.shape is None or o.shape == c.shape)
        and (c.size is None or o.size == c.size)
        and (c.cell is None or (o.cell_row, o.cell_col) == c.cell)
        for o in visible
    )


_COLOR_IDX = {c: i for i, c in enumerate(COLORS)}
_SHAPE_IDX = {s: i for i, s in enumerate(SHAPES)}
_SIZE_IDX = {s: i for i, s in enumerate(SIZES)}
_MAX_VISIBLE = 6


def _encode_views(views: Sequence[Sequence[SceneObject]]) -> tuple[np.ndarray, np.ndarray]:
    """[V, MAX, 5] attribute codes (colour, shape, size, row, col; -9 = no object) and [V] counts."""
    arr = np.full((len(views), _MAX_VISIBLE, 5), -9, dtype=np.int64)
    for i, vis in enumerate(views):
        for j, o in enumerate(vis[:_MAX_VISIBLE]):
            arr[i, j] = (_COLOR_IDX[o.color], _SHAPE_IDX[o.shape], _SIZE_IDX[o.size], o.cell_row, o.cell_col)
    return arr, np.array([len(v) for v in views], dtype=np.int64)


def _encode_constraints(cs: Sequence[Constraint]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, 5] attribute codes (-1 = free), [T] count (-1 = free), [T] background flag."""
    attrs = np.full((len(cs), 5), -1, dtype=np.int64)
    count = np.full(len(cs), -1, dtype=np.int64)
    bg = np.zeros(len(cs), dtype=bool)
    for t, c in enumerate(cs):
        if c.color:
            attrs[t, 0] = _COLOR_IDX[c.color]
        if c.shape:
            attrs[t, 1] = _SHAPE_IDX[c.shape]
        if c.size:
            attrs[t, 2] = _SIZE_IDX[c.size]
        if c.cell:
            attrs[t, 3:] = c.cell
        if c.count is not None:
            count[t] = c.count
        bg[t] = c.background
    return attrs, count, bg


def truth_matrix(views: Sequence[Sequence[SceneObject]], cs: Sequence[Constraint]) -> np.ndarray:
    """[V, T] bool: ``holds(cs[t], views[v])`` for all pairs, vectorised."""
    objs, n_vis = _encode_views(views)
    attrs, count, bg = _encode_constraints(cs)
    valid = objs[:, :, 0] >= 0  # [V, M]
    ok = (attrs[None, None] == -1) | (attrs[None, None] == objs[:, :, None])  # [V, M, T, 5]
    match = (ok.all(-1) & valid[:, :, None]).any(1)  # [V, T]
    is_count = count >= 0
    match = np.where(is_count[None], n_vis[:, None] == count[None], match)
    match = np.where(bg[None], (n_vis == 0)[:, None], match)
    return match


def _cell_phrase(cell: tuple[int, int]) -> str:
    return cell_name(*cell)


def phrase(c: Constraint, rng: np.random.Generator | None = None) -> str:
    """A surface form of ``c``; the first (canonical) template when ``rng`` is None."""

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    col, sh, sz = c.color, c.shape, c.size
    pl = PLURALS.get(sh or "", "")
    fam = c.family
    if fam == "background":
        return pick(["background", "dark background", "gray background", "empty background", "empty space",
                     "no objects"])  # fmt: skip
    if fam == "count":
        n = COUNT_WORDS[c.count - 1] if 1 <= (c.count or 0) <= 3 else NUMBER_WORDS[c.count or 0]
        noun = "object" if c.count == 1 else "objects"
        return pick([f"{n} {noun}", f"{n} {'shape' if c.count == 1 else 'shapes'}"])
    if fam == "generic":
        return pick(["objects", "shapes", "an object", "a shape", "colored shapes", "something"])
    if fam == "c":
        return pick([col, f"{col} objects", f"{col} shapes", f"a {col} object", f"a {col} shape",
                     f"{col} things", f"something {col}"])  # fmt: skip
    if fam == "s":
        return pick([sh, pl, f"a {sh}", f"{sh} shape", f"{sh} shapes"])
    if fam == "cs":
        return pick([f"{col} {sh}", f"a {col} {sh}", f"{col} {pl}", f"the {col} {sh}"])
    if fam == "z":
        return pick([f"{sz} objects", f"{sz} shapes", f"a {sz} object", sz, f"{sz} things"])
    if fam == "zc":
        return pick([f"{sz} {col} objects", f"a {sz} {col} object", f"{sz} {col} shapes"])
    if fam == "zs":
        return pick([f"{sz} {sh}", f"a {sz} {sh}", f"{sz} {pl}"])
    if fam == "zcs":
        return pick([f"a {sz} {col} {sh}", f"{sz} {col} {sh}", f"{sz} {col} {pl}"])
    if c.cell is not None:
        pos = _cell_phrase(c.cell)
        if col and sh:
            head = pick([f"{col} {sh}", f"a {col} {sh}"])
        elif sh:
            head = pick([f"a {sh}", sh])
        elif col:
            head = pick([f"{col} object", f"a {col} shape"])
        else:
            head = pick(["object", "an object", "shapes"])
        return f"{head} at the {pos}"
    raise ValueError(f"no phrase for {c}")


def canonical_constraints() -> list[Constraint]:
    """The 47 phrases present in every training batch: colours, shapes, colour-shape pairs,
    one/two/three objects (the discriminations the scorer and the eval rely on most)."""
    out = [Constraint(color=c) for c in COLORS]
    out += [Constraint(shape=s) for s in SHAPES]
    out += [Constraint(color=c, shape=s) for c in COLORS for s in SHAPES]
    out += [Constraint(count=n) for n in (1, 2, 3)]
    return out


# family -> weight, for the positive phrase of an object view
FAMILY_WEIGHTS: dict[str, float] = {
    "c": 0.22, "s": 0.16, "cs": 0.20, "z": 0.04, "zc": 0.05, "zs": 0.05, "zcs": 0.10, "cell": 0.08,
    "count": 0.06, "generic": 0.04,
}  # fmt: skip


def sample_constraint(anchor: SceneObject, n_visible: int, rng: np.random.Generator) -> Constraint:
    """A true phrase about ``anchor`` at a random granularity."""
    fams = list(FAMILY_WEIGHTS)
    w = np.array(list(FAMILY_WEIGHTS.values()))
    fam = fams[int(rng.choice(len(fams), p=w / w.sum()))]
    a = anchor
    if fam == "count":
        return Constraint(count=n_visible)
    if fam == "generic":
        return Constraint()
    if fam == "cell":
        extra = int(rng.integers(4))  # 0: cell only, 1: +shape, 2: +colour, 3: +both
        return Constraint(
            color=a.color if extra >= 2 else None, shape=a.shape if extra in (1, 3) else None,
            cell=(a.cell_row, a.cell_col),
        )  # fmt: skip
    return Constraint(
        color=a.color if "c" in fam else None, shape=a.shape if "s" in fam else None,
        size=a.size if "z" in fam else None,
    )  # fmt: skip


def perturb(c: Constraint, rng: np.random.Generator) -> Constraint:
    """A hard negative: ``c`` with one attribute changed (it may still be true of *other* views;
    :func:`truth_matrix` decides)."""

    def other(values: Sequence[Any], v: Any) -> Any:
        rest = [x for x in values if x != v]
        return rest[int(rng.integers(len(rest)))]

    fam = c.family
    if fam == "background":
        return Constraint(color=COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))])
    if fam == "generic":
        return Constraint(background=True)
    if fam == "count":
        return Constraint(count=other((1, 2, 3), c.count))
    fields = [f for f in ("color", "shape", "size", "cell") if getattr(c, f) is not None]
    f = fields[int(rng.integers(len(fields)))]
    choices = {"color": COLOR_NAMES, "shape": SHAPES, "size": SIZES,
               "cell": [(r, q) for r in range(3) for q in range(3)]}[f]  # fmt: skip
    return Constraint(**{**asdict(c), f: other(choices, getattr(c, f))})


# ---------------------------------------------------------------------------------------------
# Text windows of the VLM's conversations


def conversation_tokens(qa: QA) -> tuple[list[str], dict[str, list[int]]]:
    """The VLM's conversation as words (``msae.vlm.build.CHAT_TEMPLATE``, image as one token) and
    where it mentions each attribute value: ``{"color:red": [positions], "cell:0,0": [...], ...}``."""
    q = qa.question.replace("?", " ?").split()
    toks = [BOS, "user", ":", IMAGE, *q, "assistant", ":", qa.answer, EOS]
    mentions: dict[str, list[int]] = {}
    for i, w in enumerate(toks):
        if w in COLORS:
            mentions.setdefault(f"color:{w}", []).append(i)
        elif w in SHAPES:
            mentions.setdefault(f"shape:{w}", []).append(i)
    if qa.kind == "shape":  # "what shape is at the top left ?": the cell words after "the"
        start = 4 + q.index("the") + 1
        end = 4 + q.index("?")
        name = " ".join(toks[start:end])
        cell = [(r, c) for r in range(3) for c in range(3) if cell_name(r, c) == name]
        if cell:
            mentions[f"cell:{cell[0][0]},{cell[0][1]}"] = list(range(start, end))
    if qa.kind == "count":
        mentions[f"count:{NUMBER_WORDS.index(qa.answer)}"] = [len(toks) - 2]
    return toks, mentions


def sample_window(qa: QA, rng: np.random.Generator, radius: int = 5) -> tuple[str, set[str]]:
    """A ±``radius``-word window around a random text word, and the mentions wholly inside it.
    Special tokens are dropped half of the time (decoders often skip them)."""
    toks, mentions = conversation_tokens(qa)
    specials = set(SPECIAL_TOKENS)
    centres = [i for i, w in enumerate(toks) if w not in specials]
    c = centres[int(rng.integers(len(centres)))]
    lo, hi = max(0, c - radius), min(len(toks), c + radius + 1)
    words = toks[lo:hi]
    if rng.random() < 0.5:
        words = [w for w in words if w not in specials]
    inside = {m for m, pos in mentions.items() if all(lo <= p < hi for p in pos)}
    return " ".join(words), inside


def mentioned(c: Constraint, mentions: set[str]) -> bool | None:
    """Whether a window mentioning ``mentions`` is about phrase ``c``; None when the question
    does not apply (generic and background phrases are left out of the window loss)."""
    if c.background or c.family == "generic":
        return None
    if c.count is not None:
        return f"count:{c.count}" in mentions
    if c.size is not None:  # the VLM's questions never name sizes
        return False
    need = []
    if c.color:
        need.append(f"color:{c.color}")
    if c.shape:
        need.append(f"shape:{c.shape}")
    if c.cell:
        need.append(f"cell:{c.cell[0]},{c.cell[1]}")
    return all(n in mentions for n in need)


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    pixels: torch.Tensor  # [B, H, W, 3] uint8
    texts: list[str]
    truth: torch.Tensor  # [B, T] bool (image i, text j)
    windows: list[str]
    window_truth: torch.Tensor  # [W, T] float: 1 positive, 0 negative, nan not applicable


def object_views(scene: Scene, k: int, rng: np.random.Generator | None = None) -> tuple[View, View]:
    """Masked and blurred views of object ``k`` (augmented kept patches when ``rng`` is given)."""
    views = []
    for kind in ("masked", "blurred"):
        keep = pick_keep(scene, k, rng, True) if rng is not None else object_patches(scene, k)
        pix = masked_view(scene.image, keep) if kind == "masked" else blurred_view(scene.image, keep)
        views.append(View(pix, visible_objects(scene, keep, always=k), kind, scene.objects[k]))
    return views[0], views[1]


def background_view(scene: Scene, rng: np.random.Generator, kind: str) -> View | None:
    """A view keeping 1–10 random object-free patches (a background latent's top image)."""
    free = np.flatnonzero(background_patches(scene))
    if not len(free):
        return None
    keep = np.zeros((scene.image.height // PATCH_SIZE,) * 2, dtype=bool)
    keep.flat[rng.choice(free, size=min(len(free), int(rng.integers(1, 11))), replace=False)] = True
    pix = masked_view(scene.image, keep) if kind == "masked" else blurred_view(scene.image, keep)
    return View(pix, (), kind, None)


class BatchMaker:
    """Draws training batches from an endless seeded stream of scenes (no dataset on disk)."""

    def __init__(self, tokenizer_vocab: set[str], seed: int = TRAIN_SEED, scenes_per_batch: int = 40,
                 background_views: int = 8, windows: int = 48, image_size: int = 64) -> None:  # fmt: skip
        self.seed = seed
        self.cfg = ShapesConfig(seed=seed, n_images=1, image_size=image_size)
        self.scenes_per_batch = scenes_per_batch
        self.background_views = background_views
        self.windows = windows
        self.canonical = canonical_constraints()
        self.vocab = tokenizer_vocab
        self.next_scene = 0

    def _scene(self) -> tuple[Scene, np.random.Generator]:
        rng = scene_rng(self.seed, self.next_scene)
        self.next_scene += 1
        return generate_scene(rng, self.cfg), rng

    def make(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, 7, step])
        views: list[View] = []
        qas: list[QA] = []
        bg_scenes: list[Scene] = []
        for _ in range(self.scenes_per_batch):
            scene, srng = self._scene()
            n = len(scene.objects)
            views.append(View(np.asarray(scene.image), scene.objects, "whole", None))
            ka, kb = int(rng.integers(n)), int(rng.integers(n))
            views.append(object_views(scene, ka, rng)[0])
            views.append(object_views(scene, kb, rng)[1])
            qas.extend(make_questions(scene, srng, V1_QUESTION_KINDS, n=2))
            bg_scenes.append(scene)
        for j in range(self.background_views):
            v = background_view(bg_scenes[j % len(bg_scenes)], rng, "masked" if j % 2 == 0 else "blurred")
            if v is not None:
                views.append(v)

        positives: list[Constraint] = []
        for v in views:
            if not v.visible:
                positives.append(Constraint(background=True))
                continue
            anchor = v.target or v.visible[int(rng.integers(len(v.visible)))]
            positives.append(sample_constraint(anchor, len(v.visible), rng))
        negatives = [perturb(c, rng) for c in positives]
        cons = [*positives, *negatives, *self.canonical]
        texts = [phrase(c, rng) for c in positives + negatives] + [phrase(c) for c in self.canonical]
        truth = truth_matrix([v.visible for v in views], cons)

        win_idx = rng.choice(len(qas), size=min(self.windows, len(qas)), replace=False)
        win_texts, win_truth = [], np.full((len(win_idx), len(cons)), np.nan, dtype=np.float32)
        for r, qi in enumerate(win_idx):
            radius = 5 if rng.random() < 0.7 else int(rng.integers(1, 5))
            text, ments = sample_window(qas[qi], rng, radius)
            win_texts.append(text)
            for t, c in enumerate(cons):
                m = mentioned(c, ments)
                if m is not None:
                    win_truth[r, t] = float(m)
        return Batch(
            pixels=torch.from_numpy(np.stack([v.pixels for v in views])),
            texts=texts,
            truth=torch.from_numpy(truth),
            windows=win_texts,
            window_truth=torch.from_numpy(win_truth),
        )


# ---------------------------------------------------------------------------------------------
# Training


def _norm_consts(processor: CLIPProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    ip = processor.image_processor
    return (torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1),
            torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1))  # fmt: skip


def pixel_values(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> the processor's normalised [B, 3, H, W] (images already at size)."""
    return (pixels.permute(0, 3, 1, 2).float().div_(255.0) - mean) / std


def check_pixel_path(processor: CLIPProcessor, pixels: torch.Tensor) -> None:
    """Training normalises in torch; it must equal what the saved processor does at scoring."""
    imgs = [Image.fromarray(p.numpy()) for p in pixels[:4]]
    ref = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    mine = pixel_values(pixels[:4], *_norm_consts(processor))
    if ref.shape != mine.shape or not torch.allclose(ref, mine, atol=1e-5):
        raise RuntimeError("training pixel normalisation differs from the processor's output")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of CE against targets spread uniformly over each row's positives
    (rows without a positive are skipped)."""
    t = targets.float()
    keep = t.sum(1) > 0
    if not keep.any():
        return logits.sum() * 0.0
    t = t[keep] / t[keep].sum(1, keepdim=True)
    return -(t * F.log_softmax(logits[keep], dim=1)).sum(1).mean()


@dataclass
class Recipe:
    seed: int = TRAIN_SEED
    steps: int = 1400
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 100
    scenes_per_batch: int = 40
    background_views: int = 8
    windows: int = 48
    window_weight: float = 0.5
    max_minutes: float = 12.0  # safety cap on *CPU* time of this process (a shared machine's load
    # stretches wall time, not CPU time), so the run ends by steps and stays deterministic
    eval_scenes: int = 500
    geometry: ClipGeometry = field(default_factory=ClipGeometry)


def train(recipe: Recipe, log_every: int = 100) -> tuple[CLIPModel, CLIPProcessor, dict]:
    """Train a fresh small CLIP with ``recipe``; returns the model, its processor and a log."""
    torch.manual_seed(recipe.seed)
    model, processor = build_shapes_clip(recipe.geometry, seed=recipe.seed)
    tok = processor.tokenizer
    maker = BatchMaker(set(tok.get_vocab()), recipe.seed, recipe.scenes_per_batch, recipe.background_views,
                       recipe.windows, recipe.geometry.image_size)  # fmt: skip
    mean, std = _norm_consts(processor)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)  # fmt: skip
    max_scale = math.log(100.0)
    history: list[dict] = []
    t0, cpu0 = time.time(), time.process_time()
    model.train()
    run_loss = {"i2t": 0.0, "t2i": 0.0, "win": 0.0}
    steps_done = 0
    for step in range(recipe.steps):
        if time.process_time() - cpu0 > recipe.max_minutes * 60:
            print(f"CPU-time cap reached at step {step}", flush=True)
            break
        f = (step + 1) / recipe.warmup if step < recipe.warmup else \
            0.1 + 0.45 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))
        for group in opt.param_groups:
            group["lr"] = recipe.lr * f
        b = maker.make(step)
        if step == 0:
            check_pixel_path(processor, b.pixels)
        enc = tok(b.texts + b.windows, padding=True, return_tensors="pt")
        img = F.normalize(_emb(model.get_image_features(pixel_values=pixel_values(b.pixels, mean, std))), dim=-1)
        txt = F.normalize(_emb(model.get_text_features(input_ids=enc["input_ids"],
                                                       attention_mask=enc["attention_mask"])), dim=-1)  # fmt: skip
        phr, win = txt[: len(b.texts)], txt[len(b.texts) :]
        scale = model.logit_scale.exp()
        logits = scale * img @ phr.T  # [B, T]
        l_i2t = soft_cross_entropy(logits, b.truth)
        l_t2i = soft_cross_entropy(logits.T, b.truth.T)
        wt = b.window_truth
        applicable = ~torch.isnan(wt)
        wlog = (scale * win @ phr.T).masked_fill(~applicable, -1e4)  # not -inf: 0 · -inf is nan
        l_win = soft_cross_entropy(wlog, torch.nan_to_num(wt, nan=0.0))
        loss = 0.5 * (l_i2t + l_t2i) + recipe.window_weight * l_win
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, max_scale)
        for k, v in (("i2t", l_i2t), ("t2i", l_t2i), ("win", l_win)):
            run_loss[k] += v.item()
        steps_done = step + 1
        if steps_done % log_every == 0 or steps_done == recipe.steps:
            n = log_every if steps_done % log_every == 0 else steps_done % log_every
            rec = {"step": steps_done, "seconds": round(time.time() - t0, 1),
                   "cpu_seconds": round(time.process_time() - cpu0, 1),
                   "scale": round(scale.item(), 2), **{k: round(v / n, 4) for k, v in run_loss.items()}}  # fmt: skip
            history.append(rec)
            print(json.dumps(rec), flush=True)
            run_loss = dict.fromkeys(run_loss, 0.0)
    model.eval()
    log = {"steps": steps_done, "capped": steps_done < recipe.steps, "train_seconds": round(time.time() - t0, 1),
           "train_cpu_seconds": round(time.process_time() - cpu0, 1), "history": history,
           "scenes_seen": maker.next_scene, "batch_images": int(b.pixels.shape[0]), "batch_texts": len(b.texts)}  # fmt: skip
    return model, processor, log


def _emb(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------
# Evaluation (through the same loader path the pipeline uses)


def eval_views(seed: int = EVAL_SEED, n_scenes: int = 500, image_size: int = 64) -> dict[str, list[View]]:
    """Held-out views: masked / blurred single objects of 1–3-object scenes and whole scenes with
    one object (a separate 1-object world of the same seed). No augmentation."""
    cfg = ShapesConfig(seed=seed, n_images=1, image_size=image_size)
    one = ShapesConfig(seed=seed, n_images=1, image_size=image_size, min_objects=1, max_objects=1)
    out: dict[str, list[View]] = {"masked": [], "blurred": [], "whole_single": []}
    for i in range(n_scenes):
        scene = generate_scene(scene_rng(seed, i), cfg)
        for k in range(len(scene.objects)):
            m, b = object_views(scene, k)
            out["masked"].append(m)
            out["blurred"].append(b)
        single = generate_scene(scene_rng(seed, 100_000 + i), one)  # same world seed, unused indices
        out["whole_single"].append(View(np.asarray(single.image), single.objects, "whole", single.objects[0]))
    return out


def evaluate(embedder: Any, seed: int = EVAL_SEED, n_scenes: int = 500) -> dict:
    """Retrieval accuracies of ``embedder`` (an :class:`~msae.embed.embedders.ImageTextEmbedder`)
    on held-out views, the visual score it would give, and text–text checks."""
    from msae.embed.embedders import concept_probabilities

    scale = embedder.logit_scale
    colors, shapes = list(COLORS), list(SHAPES)
    pairs = [(c, s) for c in colors for s in shapes]
    e_col = embedder.embed_texts(colors)
    e_shp = embedder.embed_texts(shapes)
    e_pair = embedder.embed_texts([f"{c} {s}" for c, s in pairs])
    e_size = embedder.embed_texts(list(SIZES))
    bg_e = embedder.embed_texts(["background"])
    result: dict[str, Any] = {"logit_scale": round(scale, 3)}
    for kind, views in eval_views(seed, n_scenes).items():
        emb = embedder.embed_images([Image.fromarray(v.pixels) for v in views])
        tc = np.array([colors.index(v.target.color) for v in views])
        ts = np.array([shapes.index(v.target.shape) for v in views])
        tp = np.array([pairs.index((v.target.color, v.target.shape)) for v in views])
        tz = np.array([list(SIZES).index(v.target.size) for v in views])
        prob = concept_probabilities(emb, e_pair, scale)
        result[kind] = {
            "n": len(views),
            "color": round(float(((emb @ e_col.T).argmax(1) == tc).mean()), 4),
            "shape": round(float(((emb @ e_shp.T).argmax(1) == ts).mean()), 4),
            "color_shape": round(float(((emb @ e_pair.T).argmax(1) == tp).mean()), 4),
            "size": round(float(((emb @ e_size.T).argmax(1) == tz).mean()), 4),
            "p_color_shape": round(float(prob[np.arange(len(views)), tp].mean()), 4),
        }
        # the visual score a colour latent would get: softmax over the 8 colours + 4 shapes
        prob_cs = concept_probabilities(emb, np.concatenate([e_col, e_shp, bg_e]), scale)
        result[kind]["p_color_among_13"] = round(float(prob_cs[np.arange(len(views)), tc].mean()), 4)
    # text -> text
    col_ok = [float(e_col[ci] @ e_pair[pairs.index((c, s))] > e_col[ci] @ e_pair[pairs.index((c2, s))])
              for ci, c in enumerate(colors) for s in shapes for c2 in colors if c2 != c]  # fmt: skip
    shp_ok = [float(e_shp[si] @ e_pair[pairs.index((c, s))] > e_shp[si] @ e_pair[pairs.index((c, s2))])
              for si, s in enumerate(shapes) for c in colors for s2 in shapes if s2 != s]  # fmt: skip
    result["text_text"] = {
        "color_in_phrase": round(float(np.mean(col_ok)), 4),
        "shape_in_phrase": round(float(np.mean(shp_ok)), 4),
        "n_color": len(col_ok),
        "n_shape": len(shp_ok),
    }
    result["windows"] = evaluate_windows(embedder, seed, n_scenes)
    return result


def evaluate_windows(embedder: Any, seed: int = EVAL_SEED, n_scenes: int = 500) -> dict:
    """±5-word windows centred on the answer of held-out colour / shape questions: is the answer
    the nearest colour (shape) word, and how far apart are mentioned and unmentioned concepts?"""
    cfg = ShapesConfig(seed=seed, n_images=1)
    colors, shapes = list(COLORS), list(SHAPES)
    e_col, e_shp = embedder.embed_texts(colors), embedder.embed_texts(shapes)
    texts, answers, kinds = [], [], []
    for i in range(n_scenes):
        rng = scene_rng(seed, i)
        scene = generate_scene(rng, cfg)
        for qa in make_questions(scene, rng, ("color", "shape"), n=2):
            toks, _ = conversation_tokens(qa)
            a = len(toks) - 2
            texts.append(" ".join(toks[max(0, a - 5) : a + 6]))
            answers.append(qa.answer)
            kinds.append(qa.kind)
    emb = embedder.embed_texts(texts)
    kinds_a = np.array(kinds)
    out: dict[str, Any] = {"example": texts[0]}
    for kind, vocab, e in (("color", colors, e_col), ("shape", shapes, e_shp)):
        sel = np.flatnonzero(kinds_a == kind)
        sims = emb[sel] @ e.T
        tgt = np.array([vocab.index(answers[j]) for j in sel])
        pos = sims[np.arange(len(sel)), tgt]
        neg = (sims.sum(1) - pos) / (len(vocab) - 1)
        out[kind] = {
            "n": int(len(sel)),
            "answer_top1": round(float((sims.argmax(1) == tgt).mean()), 4),
            "cos_answer": round(float(pos.mean()), 4),
            "cos_other": round(float(neg.mean()), 4),
        }
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    from msae.embed.embedders import ImageTextEmbedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/shapes-clip")
    ap.add_argument("--seed", type=int, default=TRAIN_SEED)
    ap.add_argument("--steps", type=int, default=Recipe.steps)
    ap.add_argument("--max-minutes", type=float, default=Recipe.max_minutes)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-scenes", type=int, default=Recipe.eval_scenes)
    args = ap.parse_args(argv)
    # one thread means one: the fast tokenizer would otherwise batch-encode on a thread pool
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed, steps=args.steps, max_minutes=args.max_minutes, eval_scenes=args.eval_scenes)
    model, processor, log = train(recipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    embedder = ImageTextEmbedder.from_pretrained(out, device="cpu", local_files_only=True)
    t0 = time.time()
    metrics = evaluate(embedder, EVAL_SEED, recipe.eval_scenes)
    report = {
        "format": "msae-shapes-clip-eval/1",
        "metrics": metrics,
        "eval_seed": EVAL_SEED,
        "eval_scenes": recipe.eval_scenes,
        "eval_seconds": round(time.time() - t0, 1),
        "training": log,
        "recipe": {k: v for k, v in asdict(recipe).items() if k != "geometry"},
        "geometry": asdict(recipe.geometry),
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
        "vocabulary_size": len(processor.tokenizer),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(metrics, indent=2), flush=True)
    return report


if __name__ == "__main__":
    main()
