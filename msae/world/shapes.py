"""A seeded synthetic VQA world: coloured shapes on a plain background, with exact ground truth.

Each scene has ``min_objects..max_objects`` non-overlapping objects (colour, shape, size, a cell
of a coarse 3×3 grid) drawn without anti-aliasing, so every pixel inside an object's mask has
exactly the object's colour. Questions (colour, shape at a position, existence, count,
left/right) have single-word answers from one fixed :data:`VOCABULARY`.

:func:`generate_world` writes a LLaVA-format dataset plus the ground truth used to score visual
concepts: ``objects.parquet`` (one row per object) and ``annotations.parquet`` (one row per
base-view patch: the object covering most of it, or background).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from msae.world.config import ALL_QUESTION_KINDS, ShapesConfig

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 220),
    "orange": (250, 140, 20),
    "cyan": (40, 220, 230),
    "white": (245, 245, 245),
}
BACKGROUND_RGB: tuple[int, int, int] = (48, 48, 48)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's bounding square as a fraction of the image side.
SIZE_FRACTION: dict[str, float] = {"small": 0.2, "large": 0.32}
ROW_NAMES: tuple[str, ...] = ("top", "middle", "bottom")
COL_NAMES: tuple[str, ...] = ("left", "center", "right")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
YES, NO = "yes", "no"


def cell_name(row: int, col: int) -> str:
    """"top left", "top", "center", "right", "bottom right", …: the name of a 3×3 grid cell."""
    r, c = ROW_NAMES[row], COL_NAMES[col]
    if row == 1 and col == 1:
        return "center"
    if row == 1:
        return c
    if col == 1:
        return r
    return f"{r} {c}"


CELL_NAMES: tuple[str, ...] = tuple(cell_name(r, c) for r in range(3) for c in range(3))

TEMPLATE_WORDS: tuple[str, ...] = (
    "what", "color", "is", "the", "shape", "at", "there", "a", "an", "how", "many", "objects",
    "are", "left", "or", "right", "of", "?", "object",
)  # fmt: skip
# World v2 words, appended after every v1 word so that v1 token ids keep their values.
BACKGROUND = "background"
V2_WORDS: tuple[str, ...] = ("shown", "where", "and", BACKGROUND)

VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *TEMPLATE_WORDS,
            *COLORS,
            *SHAPES,
            *SIZES,
            *(w for name in CELL_NAMES for w in name.split()),
            *NUMBER_WORDS,
            YES,
            NO,
            *V2_WORDS,
        ]
    )
)


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    cell_row: int  # 0..2, from the centre of the bounding box
    cell_col: int
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 of the mask, x1/y1 exclusive

    @property
    def center_x(self) -> float:
        return (self.bbox[0] + self.bbox[2]) / 2

    @property
    def position(self) -> str:
        return cell_name(self.cell_row, self.cell_col)

    @property
    def description(self) -> str:
        """"small red circle": size, colour, shape — the words the v2 description answers use."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True, eq=False)
class Scene:
    image: Image.Image
    objects: tuple[SceneObject, ...]
    masks: np.ndarray  # [n_objects, H, W] bool


@dataclass(frozen=True)
class QA:
    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class WorldFiles:
    root: Path
    images: Path
    conversations: Path
    objects: Path
    annotations: Path
    world_json: Path


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """A [side, side] bool mask of the shape inscribed in its bounding square."""
    c = (np.arange(side) + 0.5) - side / 2  # pixel-centre coordinates relative to the centre
    y, x = np.meshgrid(c, c, indexing="ij")
    h = side / 2
    if shape == "circle":
        m = x**2 + y**2 <= h**2
    elif shape == "square":
        m = (np.abs(x) <= h * 0.85) & (np.abs(y) <= h * 0.85)
    elif shape == "triangle":  # apex up
        t = (y + h) / (2 * h)  # 0 at top, 1 at bottom
        m = np.abs(x) <= t * h
    elif shape == "cross":
        arm = h / 3
        m = ((np.abs(x) <= arm) & (np.abs(y) <= h)) | ((np.abs(y) <= arm) & (np.abs(x) <= h))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return m


_MASK_CACHE: dict[tuple[str, int], np.ndarray] = {}


def _cached_mask(shape: str, side: int) -> np.ndarray:
    key = (shape, side)
    if key not in _MASK_CACHE:
        _MASK_CACHE[key] = _shape_mask(shape, side)
    return _MASK_CACHE[key]


def generate_scene(rng: np.random.Generator, cfg: ShapesConfig) -> Scene:
    """One scene: ``min_objects..max_objects`` non-overlapping objects (1-px gap at least)."""
    s = cfg.image_size
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objects: list[SceneObject] = []
    masks: list[np.ndarray] = []
    occupied = np.zeros((s, s), dtype=bool)  # dilated by one pixel around placed objects
    attempts = 0
    while len(objects) < n_target and attempts < 200:
        attempts += 1
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        side = max(4, int(round(SIZE_FRACTION[size] * s)))
        x0 = int(rng.integers(0, s - side + 1))
        y0 = int(rng.integers(0, s - side + 1))
        local = _cached_mask(shape, side)
        if (occupied[y0 : y0 + side, x0 : x0 + side] & local).any():
            continue
        mask = np.zeros((s, s), dtype=bool)
        mask[y0 : y0 + side, x0 : x0 + side] = local
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
        cell_col = min(2, int(cx * 3 // s))
        cell_row = min(2, int(cy * 3 // s))
        objects.append(SceneObject(color, shape, size, cell_row, cell_col, bbox))
        masks.append(mask)
        dil = mask.copy()
        dil[1:, :] |= mask[:-1, :]
        dil[:-1, :] |= mask[1:, :]
        dil[:, 1:] |= mask[:, :-1]
        dil[:, :-1] |= mask[:, 1:]
        occupied |= dil
    if len(objects) < cfg.min_objects:  # practically unreachable for the allowed sizes
        raise RuntimeError(f"could not place {cfg.min_objects} objects in a {s}px image")
    pixels = np.empty((s, s, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    for obj, mask in zip(objects, masks, strict=True):
        pixels[mask] = COLORS[obj.color]
    mask_arr = np.stack(masks) if masks else np.zeros((0, s, s), dtype=bool)
    return Scene(Image.fromarray(pixels, "RGB"), tuple(objects), mask_arr)


# ---------------------------------------------------------------------------------------------
# Questions


def _unique_shape_objects(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    return [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]


def _unique_cell_objects(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    cells = [(o.cell_row, o.cell_col) for o in objects]
    return [o for o, c in zip(objects, cells, strict=True) if cells.count(c) == 1]


def _pick(objects: list[SceneObject], rng: np.random.Generator) -> SceneObject:
    return objects[int(rng.integers(len(objects)))]


def _unique_color_objects(objects: tuple[SceneObject, ...]) -> list[SceneObject]:
    return [o for o in objects if sum(p.color == o.color for p in objects) == 1]


def reading_order(objects: tuple[SceneObject, ...] | list[SceneObject]) -> list[SceneObject]:
    """Objects top to bottom, then left to right (by grid cell, then x): the order descriptions use."""
    return sorted(objects, key=lambda o: (o.cell_row, o.cell_col, o.center_x, o.bbox[1]))


def describe_objects(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    """"small red circle and large blue square"; "background" when nothing is visible."""
    if not objects:
        return BACKGROUND
    return " and ".join(o.description for o in reading_order(objects))


def _left_right_pairs(objects: tuple[SceneObject, ...], min_dx: float) -> list[tuple[SceneObject, SceneObject]]:
    uniq = _unique_shape_objects(objects)
    return [(a, b) for a in uniq for b in uniq if a is not b and abs(a.center_x - b.center_x) >= min_dx]


def _feasible(kind: str, scene: Scene, min_dx: float) -> bool:
    objs = scene.objects
    if kind == "color":
        return bool(_unique_shape_objects(objs))
    if kind == "shape":
        return bool(_unique_cell_objects(objs))
    if kind in ("exists", "count"):
        return True
    if kind == "left_right":
        return bool(_left_right_pairs(objs, min_dx))
    if kind == "describe":
        return True
    if kind == "describe_at":
        return _feasible("shape", scene, min_dx)
    if kind == "where":
        return bool(_unique_color_objects(objs))
    raise ValueError(f"unknown question kind {kind!r}")


def left_right_min_dx(image_size: int) -> float:
    """Two objects' centres must be at least this far apart in x for a left/right question."""
    return image_size / 8


def _ask(kind: str, scene: Scene, rng: np.random.Generator, min_dx: float) -> QA:
    objs = scene.objects
    if kind == "color":
        cands = _unique_shape_objects(objs)
        o = cands[int(rng.integers(len(cands)))]
        return QA(kind, f"what color is the {o.shape}?", o.color)
    if kind == "shape":
        o = _pick(_unique_cell_objects(objs), rng)
        return QA(kind, f"what shape is at the {o.position}?", o.shape)
    if kind == "exists":
        present = {(o.color, o.shape) for o in objs}
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            color, shape, answer = o.color, o.shape, YES
        else:
            # half of the "no"s are near misses: a present colour or a present shape
            absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            if rng.random() < 0.5:
                near = [(c, s) for c, s in absent if any(c == o.color or s == o.shape for o in objs)]
                absent = near or absent
            color, shape = absent[int(rng.integers(len(absent)))]
            answer = NO
        return QA(kind, f"is there a {color} {shape}?", answer)
    if kind == "count":
        return QA(kind, "how many objects are there?", NUMBER_WORDS[len(objs)])
    if kind == "left_right":
        pairs = _left_right_pairs(objs, min_dx)
        a, b = pairs[int(rng.integers(len(pairs)))]
        answer = "left" if a.center_x < b.center_x else "right"
        return QA(kind, f"is the {a.shape} left or right of the {b.shape}?", answer)
    if kind == "describe":
        return QA(kind, "what is shown?", describe_objects(objs))
    if kind == "describe_at":
        o = _pick(_unique_cell_objects(objs), rng)
        return QA(kind, f"what is at the {o.position}?", o.description)
    if kind == "where":
        o = _pick(_unique_color_objects(objs), rng)
        return QA(kind, f"where is the {o.color} object?", o.position)
    raise ValueError(f"unknown question kind {kind!r}")


def make_questions(
    scene: Scene, rng: np.random.Generator, kinds: tuple[str, ...] | list[str] = ALL_QUESTION_KINDS, n: int = 1,
    always: tuple[str, ...] | list[str] = (),
) -> list[QA]:
    """Up to ``n`` distinct questions about ``scene``: first one of each ``always`` kind the scene
    supports, then kinds drawn uniformly among the ``kinds`` it supports (fewer if the scene
    supports too few distinct questions)."""
    min_dx = left_right_min_dx(scene.image.width)
    feasible = [k for k in kinds if _feasible(k, scene, min_dx)]
    out: list[QA] = []
    seen: set[str] = set()
    for kind in always:
        if len(out) < n and kind in feasible:
            qa = _ask(kind, scene, rng, min_dx)
            seen.add(qa.question)
            out.append(qa)
    tries = 0
    while feasible and len(out) < n and tries < 20 * n:
        tries += 1
        qa = _ask(feasible[int(rng.integers(len(feasible)))], scene, rng, min_dx)
        if qa.question in seen:
            continue
        seen.add(qa.question)
        out.append(qa)
    return out


def answer_for(question: str, objects: tuple[SceneObject, ...], image_size: int) -> str:
    """Recompute a question's answer from the objects alone (the reference the tests check)."""
    words = question.rstrip("?").replace("?", "").split()
    text = " ".join(words)
    if text.startswith("what color is the "):
        shape = words[-1]
        (o,) = [o for o in objects if o.shape == shape]
        return o.color
    if text.startswith("what shape is at the "):
        pos = " ".join(words[5:])
        (o,) = [o for o in objects if o.position == pos]
        return o.shape
    if text.startswith("is there a "):
        color, shape = words[3], words[4]
        return YES if any(o.color == color and o.shape == shape for o in objects) else NO
    if text == "how many objects are there":
        return NUMBER_WORDS[len(objects)]
    if text == "what is shown":
        return describe_objects(objects)
    if text.startswith("what is at the "):
        pos = " ".join(words[4:])
        (o,) = [o for o in objects if o.position == pos]
        return o.description
    if text.startswith("where is the ") and text.endswith(" object"):
        (o,) = [o for o in objects if o.color == words[3]]
        return o.position
    if text.startswith("is the ") and " left or right of the " in text:
        (a,) = [o for o in objects if o.shape == words[2]]
        (b,) = [o for o in objects if o.shape == words[-1]]
        assert abs(a.center_x - b.center_x) >= left_right_min_dx(image_size)
        return "left" if a.center_x < b.center_x else "right"
    raise ValueError(f"unrecognised question {question!r}")


# ---------------------------------------------------------------------------------------------
# Patch annotations and the world on disk


def patch_coverage(masks: np.ndarray, patch_size: int) -> np.ndarray:
    """[n_objects, G, G] fraction of each patch's pixels covered by each object."""
    n, h, w = masks.shape
    g_r, g_c = h // patch_size, w // patch_size
    m = masks[:, : g_r * patch_size, : g_c * patch_size].reshape(n, g_r, patch_size, g_c, patch_size)
    return m.mean(axis=(2, 4))


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a world with ``seed`` (independent per scene)."""
    return np.random.default_rng([seed, index])


def iter_world(cfg: ShapesConfig):
    """(image_id, scene, questions) for every scene of the world, without touching disk."""
    width = max(6, len(str(cfg.n_images - 1)))
    for i in range(cfg.n_images):
        rng = scene_rng(cfg.seed, i)
        for _ in range(50):  # redraw scenes that support none of the asked kinds
            scene = generate_scene(rng, cfg)
            qas = make_questions(scene, rng, cfg.question_kinds, cfg.questions_per_image, cfg.always_ask)
            if qas:
                break
        yield f"{i:0{width}d}", scene, qas


def _world_meta(cfg: ShapesConfig, patch_size: int) -> dict:
    return {
        "format": "msae-shapes-world/1",
        "config": cfg.model_dump(mode="json"),
        "patch_size": patch_size,
        "vocabulary": list(VOCABULARY),
        "colors": {k: list(v) for k, v in COLORS.items()},
        "background_rgb": list(BACKGROUND_RGB),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "cells": list(CELL_NAMES),
    }


def _files(root: Path) -> WorldFiles:
    return WorldFiles(
        root=root,
        images=root / "images",
        conversations=root / "conversations.json",
        objects=root / "objects.parquet",
        annotations=root / "annotations.parquet",
        world_json=root / "world.json",
    )


def generate_world(cfg: ShapesConfig, out_dir: str | Path, patch_size: int = 8) -> WorldFiles:
    """Write the world into ``out_dir`` (idempotent: a finished world with the same config and
    patch size is left as it is). ``world.json`` is written last, so it marks completion."""
    import polars as pl

    root = Path(out_dir)
    files = _files(root)
    meta = _world_meta(cfg, patch_size)
    if files.world_json.exists():
        try:
            old = json.loads(files.world_json.read_text())
        except (OSError, ValueError):
            old = None
        if old == meta and files.conversations.exists() and files.annotations.exists():
            return files
        files.world_json.unlink()
    if cfg.image_size % patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {patch_size}")
    files.images.mkdir(parents=True, exist_ok=True)

    records: list[dict] = []
    obj_rows: dict[str, list] = {k: [] for k in
                                 ("image_id", "object", "color", "shape", "size", "cell_row", "cell_col",
                                  "x0", "y0", "x1", "y1")}  # fmt: skip
    ann: dict[str, list] = {k: [] for k in
                            ("image_id", "grid_row", "grid_col", "object", "color", "shape", "size", "coverage")}  # fmt: skip
    g = cfg.image_size // patch_size
    rows_idx, cols_idx = np.divmod(np.arange(g * g), g)
    for image_id, scene, qas in iter_world(cfg):
        rel = f"images/{image_id}.png"
        scene.image.save(root / rel, format="PNG", optimize=False)
        for j, qa in enumerate(qas):
            records.append({
                "id": f"{image_id}-q{j}",
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{qa.question}"},
                    {"from": "gpt", "value": qa.answer},
                ],
                "kind": qa.kind,
            })  # fmt: skip
        for k, o in enumerate(scene.objects):
            for key, val in zip(obj_rows, (image_id, k, o.color, o.shape, o.size, o.cell_row, o.cell_col, *o.bbox),
                                strict=True):  # fmt: skip
                obj_rows[key].append(val)
        cov = patch_coverage(scene.masks, patch_size).reshape(len(scene.objects), -1)  # [n, G*G]
        if len(scene.objects):
            best = cov.argmax(axis=0)
            best_cov = cov.max(axis=0)
        else:
            best = np.zeros(g * g, dtype=int)
            best_cov = np.zeros(g * g)
        for p in range(g * g):
            ann["image_id"].append(image_id)
            ann["grid_row"].append(int(rows_idx[p]))
            ann["grid_col"].append(int(cols_idx[p]))
            if best_cov[p] > 0:
                o = scene.objects[int(best[p])]
                ann["object"].append(int(best[p]))
                ann["color"].append(o.color)
                ann["shape"].append(o.shape)
                ann["size"].append(o.size)
                ann["coverage"].append(float(best_cov[p]))
            else:  # background: no object touches the patch; coverage is the background's (1.0)
                ann["object"].append(None)
                ann["color"].append(None)
                ann["shape"].append(None)
                ann["size"].append(None)
                ann["coverage"].append(1.0)

    files.conversations.write_text(json.dumps(records, indent=1))
    pl.DataFrame(obj_rows, schema={
        "image_id": pl.String, "object": pl.Int32, "color": pl.String, "shape": pl.String, "size": pl.String,
        "cell_row": pl.Int32, "cell_col": pl.Int32, "x0": pl.Int32, "y0": pl.Int32, "x1": pl.Int32, "y1": pl.Int32,
    }).write_parquet(files.objects)  # fmt: skip
    pl.DataFrame(ann, schema={
        "image_id": pl.String, "grid_row": pl.Int32, "grid_col": pl.Int32, "object": pl.Int32,
        "color": pl.String, "shape": pl.String, "size": pl.String, "coverage": pl.Float64,
    }).write_parquet(files.annotations)  # fmt: skip
    files.world_json.write_text(json.dumps(meta, indent=1))
    return files
