"""The shapes world: determinism, masks, patch annotations, answers, vocabulary, LLaVA format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from msae.vlm.build import build_word_tokenizer
from msae.world.config import V1_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import (
    COLORS,
    VOCABULARY,
    answer_for,
    generate_scene,
    generate_world,
    describe_objects,
    iter_world,
    make_questions,
    patch_coverage,
)

CFG = ShapesConfig(seed=5, n_images=40, questions_per_image=3)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(CFG, tmp_path_factory.mktemp("world") / "w")


def test_same_seed_same_bytes_different_seed_differs(tmp_path, world):
    again = generate_world(CFG, tmp_path / "again")
    assert _digest(world.root) == _digest(again.root)
    other = generate_world(CFG.model_copy(update={"seed": 6}), tmp_path / "other")
    assert _digest(other.root)["conversations.json"] != _digest(world.root)["conversations.json"]
    assert _digest(other.root)["images/000000.png"] != _digest(world.root)["images/000000.png"]


def test_idempotent_rerun_does_not_rewrite(world):
    before = world.world_json.stat().st_mtime_ns, world.annotations.stat().st_mtime_ns
    generate_world(CFG, world.root)
    assert (world.world_json.stat().st_mtime_ns, world.annotations.stat().st_mtime_ns) == before


def test_masks_match_objects():
    rng = np.random.default_rng(0)
    for _ in range(60):
        scene = generate_scene(rng, CFG)
        s = CFG.image_size
        assert CFG.min_objects <= len(scene.objects) <= CFG.max_objects
        assert scene.masks.shape == (len(scene.objects), s, s) and scene.masks.dtype == bool
        assert scene.masks.sum(axis=0).max() <= 1, "objects overlap"
        pixels = np.asarray(scene.image)
        assert scene.image.size == (s, s) and scene.image.mode == "RGB"
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            assert mask.any()
            ys, xs = np.nonzero(mask)
            assert obj.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert 0 <= obj.bbox[0] < obj.bbox[2] <= s and 0 <= obj.bbox[1] < obj.bbox[3] <= s
            assert (pixels[mask] == np.array(COLORS[obj.color], dtype=np.uint8)).all()
            cx, cy = (obj.bbox[0] + obj.bbox[2]) / 2, (obj.bbox[1] + obj.bbox[3]) / 2
            assert (obj.cell_col, obj.cell_row) == (min(2, int(cx * 3 // s)), min(2, int(cy * 3 // s)))
        background = ~scene.masks.any(axis=0)
        assert len(np.unique(pixels[background], axis=0)) == 1


def test_annotations_agree_with_masks(world):
    ann = pl.read_parquet(world.annotations)
    objects = pl.read_parquet(world.objects)
    g = CFG.image_size // 8
    assert ann.height == CFG.n_images * g * g
    scenes = {image_id: scene for image_id, scene, _ in iter_world(CFG)}
    for image_id, scene in scenes.items():
        cov = patch_coverage(scene.masks, 8)  # [n, g, g]
        rows = ann.filter(pl.col("image_id") == image_id).sort("grid_row", "grid_col")
        assert rows.height == g * g
        for r in rows.iter_rows(named=True):
            c = cov[:, r["grid_row"], r["grid_col"]]
            if r["object"] is None:
                assert c.max(initial=0) == 0 and r["color"] is None and r["shape"] is None
            else:
                o = scene.objects[r["object"]]
                assert c[r["object"]] == c.max() > 0
                assert r["coverage"] == pytest.approx(c[r["object"]])
                assert (r["color"], r["shape"], r["size"]) == (o.color, o.shape, o.size)
        objs = objects.filter(pl.col("image_id") == image_id).sort("object")
        assert objs["color"].to_list() == [o.color for o in scene.objects]
        assert list(zip(objs["x0"], objs["y0"], objs["x1"], objs["y1"], strict=True)) == [
            o.bbox for o in scene.objects
        ]


def test_every_answer_is_correct_and_kinds_are_covered():
    kinds_seen: dict[str, set[str]] = {}
    rng = np.random.default_rng(1)
    for _ in range(300):
        scene = generate_scene(rng, CFG)
        for qa in make_questions(scene, rng, CFG.question_kinds, 4):
            assert answer_for(qa.question, scene.objects, CFG.image_size) == qa.answer, qa
            kinds_seen.setdefault(qa.kind, set()).add(qa.answer)
    assert set(kinds_seen) == set(CFG.question_kinds)
    assert kinds_seen["exists"] == {"yes", "no"}
    assert kinds_seen["left_right"] == {"left", "right"}
    assert kinds_seen["count"] == {"one", "two", "three"}
    assert len(kinds_seen["color"]) >= 6 and len(kinds_seen["shape"]) >= 4


def test_exists_is_balanced():
    rng = np.random.default_rng(2)
    answers = []
    for _ in range(400):
        scene = generate_scene(rng, CFG)
        answers += [qa.answer for qa in make_questions(scene, rng, ("exists",), 1)]
    assert 0.4 < np.mean([a == "yes" for a in answers]) < 0.6


def test_vocabulary_covers_all_words(world):
    tok = build_word_tokenizer(VOCABULARY)
    vocab = set(VOCABULARY)
    for r in json.loads(world.conversations.read_text()):
        for turn in r["conversations"]:
            text = turn["value"].replace("<image>", "")
            words = text.replace("?", " ? ").split()
            assert set(words) <= vocab, words
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]


def test_conversations_are_llava_format(world):
    records = json.loads(world.conversations.read_text())
    assert len(records) == CFG.n_images * CFG.questions_per_image
    ids = [r["id"] for r in records]
    assert len(set(ids)) == len(ids)
    for r in records:
        assert set(r) == {"id", "image", "conversations", "kind"}
        image_id, q = r["id"].split("-q")
        assert len(image_id) == 6 and image_id.isdigit() and q.isdigit()
        assert r["image"] == f"images/{image_id}.png" and (world.root / r["image"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt"
        # v1 kinds answer with one word; v2 descriptions with "size colour shape" phrases joined by
        # "and", "where" with a cell name ("top left", "center")
        if r["kind"] in V1_QUESTION_KINDS:
            assert " " not in gpt["value"]
        elif r["kind"] in ("describe", "describe_at"):
            assert all(len(p.split()) == 3 for p in gpt["value"].split(" and ")) or gpt["value"] == "background"
        assert r["kind"] in CFG.question_kinds
    meta = json.loads(world.world_json.read_text())
    assert meta["config"] == CFG.model_dump(mode="json") and meta["vocabulary"] == list(VOCABULARY)


def test_descriptions_name_every_object_in_reading_order():
    rng = np.random.default_rng(4)
    for _ in range(200):
        scene = generate_scene(rng, CFG)
        (qa,) = make_questions(scene, rng, ("describe",), 1)
        parts = qa.answer.split(" and ")
        assert len(parts) == len(scene.objects)
        assert sorted(parts) == sorted(f"{o.size} {o.color} {o.shape}" for o in scene.objects)
        rows = [next(o.cell_row for o in scene.objects if o.description == p) for p in parts]
        assert rows == sorted(rows)  # top to bottom
    assert describe_objects(()) == "background"


def test_always_ask_comes_first_and_where_names_a_unique_colour(tmp_path):
    cfg = ShapesConfig(seed=6, n_images=60, questions_per_image=2, always_ask=("describe",))
    for _, scene, qas in iter_world(cfg):
        assert qas[0].kind == "describe" and len(qas) == 2
    rng = np.random.default_rng(5)
    n = 0
    for _ in range(200):
        scene = generate_scene(rng, CFG)
        for qa in make_questions(scene, rng, ("where",), 1):
            color = qa.question.split()[3]
            assert sum(o.color == color for o in scene.objects) == 1
            n += 1
    assert n > 150
    with pytest.raises(ValueError, match="always_ask"):
        ShapesConfig(question_kinds=("color",), always_ask=("describe",))


def test_question_kinds_filter(tmp_path):
    cfg = ShapesConfig(seed=3, n_images=20, question_kinds=("left_right",))
    files = generate_world(cfg, tmp_path / "lr")
    records = json.loads(files.conversations.read_text())
    assert records and {r["kind"] for r in records} == {"left_right"}


def test_fast_enough(tmp_path):
    import time

    t = time.time()
    generate_world(ShapesConfig(seed=11, n_images=600), tmp_path / "big")
    assert time.time() - t < 20
