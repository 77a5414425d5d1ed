"""build_samples over LLaVA files, local HF datasets and the shapes world: exact kept ids, exact
skip counts by reason, limit/fraction, and the sample table's round trip through the store."""

from __future__ import annotations

import json
import logging
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from fixtures_data import conv, encode, noise_rgb, truncated, write_llava
from msae.config import DatasetConfig
from msae.data import (
    DatasetError,
    VQASample,
    build_samples,
    iter_samples,
    load_image_rgb,
    read_samples,
    write_samples,
)
from msae.data.images import safe_filename
from msae.data.llava import first_qa
from msae.data.samples import SAMPLES_SCHEMA, fraction_count
from msae.store import Store
from msae.world.config import ShapesConfig

CONV = conv("<image>\nq", "a")


@pytest.fixture
def memory_store():
    store = Store(f"memory://msae-test-{uuid.uuid4().hex}")
    yield store
    store.rm()


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "ds" / "images"
    folder.mkdir(parents=True)
    (folder / "good1.png").write_bytes(encode(Image.new("L", (8, 8), 100)))
    (folder / "good2.jpg").write_bytes(encode(noise_rgb(), "JPEG"))
    (folder / "cut.jpg").write_bytes(truncated("JPEG"))
    (folder / "junk.png").write_bytes(b"definitely not an image" * 4)
    return folder


# One of each problem; kept: "a", "b" and 7 (an int id).
RECORDS: list[object] = [
    {"id": "a", "image": "images/good1.png", "conversations": conv("<image>\nWhat colour?", "grey")},
    {
        "id": "b",
        "image": "images/good2.jpg",
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "user", "value": "Describe it. <image>"},
            {"from": "assistant", "value": " noise "},
            {"from": "human", "value": "a second question"},
            {"from": "gpt", "value": "ignored"},
        ],
    },
    {"id": "c", "image": "images/absent.png", "conversations": CONV},
    {"id": "d", "image": "images/cut.jpg", "conversations": CONV},
    {"id": "e", "image": "images/good1.png", "conversations": conv("<image>\n  ", "x")},
    {"id": "f", "conversations": CONV},
    {"id": "a", "image": "images/good2.jpg", "conversations": CONV},
    {"id": "g", "image": "images/good1.png", "conversations": conv("q", "  ")},
    {"id": "h", "image": "images/good1.png"},
    ["not", "a", "record"],
    {"id": "i", "image": "images/junk.png", "conversations": CONV},
    {"id": 7, "image": "images/good1.png", "conversations": conv("q7", "a7")},
    {
        "id": "j",
        "image": "images/good1.png",
        "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}],
    },
    {"id": "k", "image": "", "conversations": CONV},
]
SKIPS = {
    "missing_image": 1,
    "truncated_image": 1,
    "empty_question": 1,
    "no_image": 2,
    "duplicate_id": 1,
    "empty_answer": 1,
    "malformed_record": 3,
    "unreadable_image": 1,
}
# JSONL variant: a broken line after record 5, and a blank line (ignored: not a record).
JSONL_RECORDS = [*RECORDS[:6], '{"id": "broken", "image": ', *RECORDS[6:9], "", *RECORDS[9:]]


def llava(path: Path | str, **kw: object) -> DatasetConfig:
    return DatasetConfig(kind="llava", path=str(path), **kw)


@pytest.mark.parametrize("jsonl", [False, True], ids=["json", "jsonl"])
def test_llava_keeps_good_samples_and_counts_skips(images, tmp_path, jsonl, caplog):
    path = write_llava(images.parent, JSONL_RECORDS if jsonl else RECORDS, jsonl=jsonl)
    with caplog.at_level(logging.WARNING, logger="msae.data"):
        res = build_samples(llava(path), Store(str(tmp_path / "store")))

    t = res.table
    assert t.schema == pl.Schema(SAMPLES_SCHEMA)
    assert t["sample_id"].to_list() == ["a", "b", "7"]
    assert t["source_index"].to_list() == [0, 1, 12 if jsonl else 11]
    assert t["question"].to_list() == ["What colour?", "Describe it.", "q7"]
    assert t["answer"].to_list() == ["grey", "noise", "a7"]
    assert t["image"].to_list() == [str(images / n) for n in ("good1.png", "good2.jpg", "good1.png")]
    assert res.n_seen == len(RECORDS) + (1 if jsonl else 0)
    assert res.skips == dict(sorted((SKIPS | {"malformed_record": 4 if jsonl else 3}).items()))
    assert len(res.examples) == sum(res.skips.values())
    assert {"sample_id": "c", "reason": "missing_image"}.items() <= res.examples[0].items()
    if jsonl:
        assert any(e["reason"] == "malformed_record" and "line 7" in e["detail"] for e in res.examples)
    assert "skipping sample c (missing_image)" in caplog.text
    assert not (tmp_path / "store").exists()  # llava writes nothing


def test_llava_limit_counts_kept_samples_and_stops_reading(images, tmp_path):
    path = write_llava(images.parent, RECORDS, jsonl=True)
    store = Store(str(tmp_path / "store"))
    two = build_samples(llava(path, limit=2), store)
    assert two.table["sample_id"].to_list() == ["a", "b"] and two.n_seen == 2 and two.skips == {}
    three = build_samples(llava(path, limit=3), store)
    assert three.table["sample_id"].to_list() == ["a", "b", "7"] and three.n_seen == 12


def test_llava_fraction_cuts_records_before_skipping(images, tmp_path):
    store = Store(str(tmp_path / "store"))
    path = write_llava(images.parent, RECORDS, jsonl=False)  # 14 records
    half = build_samples(llava(path, fraction=0.5), store)  # first 7
    assert half.n_seen == 7 and half.table["sample_id"].to_list() == ["a", "b"]
    assert half.skips == {
        "duplicate_id": 1, "empty_question": 1, "missing_image": 1, "no_image": 1, "truncated_image": 1
    }
    # 15 records (+1 blank line, not counted): ceil(0.2 * 15) = 3, not ceil(0.2 * 16) = 4
    path = write_llava(images.parent, JSONL_RECORDS, jsonl=True)
    assert build_samples(llava(path, fraction=0.2), store).n_seen == 3
    assert build_samples(llava(path, fraction=1.0), store).n_seen == 15


def test_first_qa():
    turns = [{"from": "USER", "value": " <image>\nWhy? <image> "}, {"from": "Assistant", "value": "ok "}]
    assert first_qa(turns) == ("Why?", "ok")
    as_columns = {"from": ["human", "gpt"], "value": ["<image>q", "a"]}  # datasets Sequence(dict)
    assert first_qa(as_columns) == ("q", "a")
    no_reply = [{"from": "human", "value": "q"}]
    not_text = [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]
    for bad in (None, [], no_reply, not_text):
        with pytest.raises(ValueError):
            first_qa(bad)


def test_fraction_count_ignores_float_noise():
    assert fraction_count(0.07, 100) == 7  # 0.07 * 100 == 7.000000000000001
    assert fraction_count(0.15, 101) == 16
    assert fraction_count(1e-9, 5) == 1
    assert fraction_count(None, 5) is None


def test_llava_image_root_and_folder_resolution(images, tmp_path):
    store = Store(str(tmp_path / "store"))
    meta = tmp_path / "meta"
    write_llava(meta, RECORDS[:2], jsonl=False)
    res = build_samples(llava(meta, image_root=str(images.parent)), store)  # a folder with one file
    assert res.table["image"].to_list() == [str(images / "good1.png"), str(images / "good2.jpg")]

    with pytest.raises(DatasetError, match="no records|none of"):
        build_samples(llava(meta), store)  # images are not next to the file
    write_llava(meta, RECORDS[:2], jsonl=True, name="other")
    with pytest.raises(DatasetError, match=r"exactly one .*found: data\.json, other\.jsonl"):
        build_samples(llava(meta), store)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="found: none"):
        build_samples(llava(tmp_path / "empty"), store)
    with pytest.raises(DatasetError, match="not found"):
        build_samples(llava(tmp_path / "nope.json"), store)
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        build_samples(llava(tmp_path / "bad.json"), store)


def test_wholly_bad_dataset_names_the_reasons(images, tmp_path):
    store = Store(str(tmp_path / "store"))
    path = write_llava(images.parent, [RECORDS[2], RECORDS[3], RECORDS[2 + 3]], jsonl=False)
    with pytest.raises(DatasetError) as err:
        build_samples(llava(path), store)
    msg = str(err.value)
    assert str(path) in msg and "3 records" in msg
    assert "missing_image=1" in msg and "truncated_image=1" in msg and "no_image=1" in msg
    path = write_llava(images.parent, [], jsonl=False)
    with pytest.raises(DatasetError, match="no records"):
        build_samples(llava(path), store)


# --- Hugging Face ------------------------------------------------------------------------------


def _hf_rows() -> dict[str, list]:
    rows = [
        ("rgb/1", Image.new("RGB", (4, 4), (255, 0, 0)), CONV),
        ("grey", Image.new("L", (4, 4), 100), conv("<image>\nWhat shade?", "grey")),
        ("rgba", Image.new("RGBA", (4, 4), (0, 0, 0, 0)), CONV),
        ("none", None, CONV),
        ("junk", {"bytes": b"junk" * 10, "path": None}, CONV),
        ("grey", Image.new("RGB", (4, 4), (0, 0, 255)), CONV),
        ("noq", Image.new("RGB", (4, 4)), conv("<image>", "a")),
    ]
    return {k: [r[i] for r in rows] for i, k in enumerate(("id", "image", "conversations"))}


def _features():
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    turn = {"from": Value("string"), "value": Value("string")}
    return Features({"id": Value("string"), "image": ImageFeature(), "conversations": List(turn)})


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory) -> Path:
    from datasets import Dataset

    folder = tmp_path_factory.mktemp("hf") / "saved"
    Dataset.from_dict(_hf_rows(), features=_features()).save_to_disk(str(folder))
    return folder


def _pixel(ref: str) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(load_image_rgb(ref))[0, 0])


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_hf_saved_dataset_writes_pngs_into_the_store(hf_saved, tmp_path, memory_store, store_kind):
    store = Store(str(tmp_path / "store")) if store_kind == "local" else memory_store
    res = build_samples(DatasetConfig(kind="hf", name=str(hf_saved)), store)

    t = res.table
    assert t["sample_id"].to_list() == ["rgb/1", "grey", "rgba"]
    assert t["source_index"].to_list() == [0, 1, 2]
    assert t["question"].to_list() == ["q", "What shade?", "q"]
    assert res.n_seen == 7
    assert res.skips == {"duplicate_id": 1, "empty_question": 1, "no_image": 1, "unreadable_image": 1}
    names = [f"{safe_filename(i)}.png" for i in ("rgb/1", "grey", "rgba")]
    assert names[0].startswith("rgb_1-") and names[1:] == ["grey.png", "rgba.png"]
    assert t["image"].to_list() == [store.url("images", n) for n in names]
    written = sorted(store.fs.ls(store.path("images"), detail=False))
    assert written == sorted(store.path("images", n) for n in names)
    # red stays red; grey -> RGB grey (not overwritten by the duplicate's blue); transparent -> white
    assert [_pixel(r) for r in t["image"]] == [(255, 0, 0), (100, 100, 100), (255, 255, 255)]
    assert Image.open(store.fs.open(store.path("images", "grey.png"))).mode == "RGB"

    write_samples(res, store)
    back = read_samples(store)
    assert back.equals(t) and back.schema == t.schema
    grey = VQASample("grey", store.url("images", "grey.png"), "What shade?", "grey")
    assert list(iter_samples(back))[1] == grey


def test_hf_fraction_limit_and_splits(hf_saved, tmp_path):
    from datasets import Dataset, DatasetDict

    store = Store(str(tmp_path / "store"))
    res = build_samples(DatasetConfig(kind="hf", name=str(hf_saved), fraction=0.5), store)  # ceil(3.5)
    assert res.n_seen == 4 and res.table.height == 3 and res.skips == {"no_image": 1}
    res = build_samples(DatasetConfig(kind="hf", name=str(hf_saved), limit=1), store)
    assert res.table["sample_id"].to_list() == ["rgb/1"] and res.n_seen == 1

    rows = _hf_rows()
    split = {k: v[:2] for k, v in rows.items()}
    folder = tmp_path / "dict"
    DatasetDict(
        train=Dataset.from_dict(rows, features=_features()),
        test=Dataset.from_dict(split, features=_features()),
    ).save_to_disk(str(folder))
    res = build_samples(DatasetConfig(kind="hf", name=str(folder), split="test"), store)
    assert res.table["sample_id"].to_list() == ["rgb/1", "grey"]
    with pytest.raises(DatasetError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        build_samples(DatasetConfig(kind="hf", name=str(folder), split="validation"), store)


def test_hf_parquet_folder_streams_like_a_hub_dataset(hf_saved, tmp_path):
    from datasets import load_from_disk

    folder = tmp_path / "pq"
    folder.mkdir()
    load_from_disk(str(hf_saved)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    store = Store(str(tmp_path / "store"))
    res = build_samples(DatasetConfig(kind="hf", name=str(folder)), store)
    assert res.table["sample_id"].to_list() == ["rgb/1", "grey", "rgba"]
    assert res.skips == {"duplicate_id": 1, "empty_question": 1, "no_image": 1, "unreadable_image": 1}
    with pytest.raises(DatasetError, match="set dataset.limit instead"):
        build_samples(DatasetConfig(kind="hf", name=str(folder), fraction=0.5), store)


# --- shapes --------------------------------------------------------------------------------------


@pytest.fixture
def fake_world(monkeypatch) -> list[tuple[ShapesConfig, str]]:
    """Stands in for msae.world.shapes.generate_world: a tiny LLaVA-format world."""
    calls: list[tuple[ShapesConfig, str]] = []

    def generate_world(cfg: ShapesConfig, out_dir: str | Path) -> None:
        calls.append((cfg, str(out_dir)))
        out = Path(out_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(cfg.n_images):
            (out / "images" / f"{i:06d}.png").write_bytes(encode(Image.new("RGB", (8, 8), (i, 0, 0))))
            question = "" if i == 1 else f"<image>\nWhat is shown in scene {i}?"
            image = f"images/{i:06d}.png"
            records.append({"id": f"s{i}", "image": image, "conversations": conv(question, "a")})
        (out / "conversations.json").write_text(json.dumps(records))

    module = types.ModuleType("msae.world.shapes")
    module.generate_world = generate_world  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "msae.world.shapes", module)
    return calls


@pytest.mark.parametrize("store_kind", ["local", "memory"])
def test_shapes_world_is_generated_into_the_store(fake_world, tmp_path, memory_store, store_kind):
    store = Store(str(tmp_path / "store")) if store_kind == "local" else memory_store
    cfg = DatasetConfig(kind="shapes", shapes=ShapesConfig(n_images=4, seed=5))
    res = build_samples(cfg, store)
    assert len(fake_world) == 1 and fake_world[0][0] == cfg.shapes
    if store_kind == "local":
        assert fake_world[0][1] == store.path("world")
    assert res.table["sample_id"].to_list() == ["s0", "s2", "s3"]
    assert res.skips == {"empty_question": 1}
    assert res.table["question"][1] == "What is shown in scene 2?"
    expected = [store.url("world", "images", f"{i:06d}.png") for i in (0, 2, 3)]
    assert res.table["image"].to_list() == expected
    assert [_pixel(r)[0] for r in res.table["image"]] == [0, 2, 3]
