"""Token map: every input position → image patch / text role, checked against what the model does.

Uses a random LLaVA-NeXT with the *real* llama3-llava-next-8b vision geometry (336-px CLIP-L/14,
its anyres pinpoints, feature layer -2) and a tiny language model.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image

from msae.config import ExtractionConfig
from msae.extract.extractor import Prepared, _Preparer, collate
from msae.extract.token_map import ImageTokenMapper, build_token_table
from msae.vlm.build import LLAMA3_LLAVA_NEXT_8B_GEOMETRY, build_llava_next, build_word_tokenizer
from msae.vlm.load import LoadedVLM
from msae.world.shapes import VOCABULARY

SIDE = 336 // 14  # 24


@pytest.fixture(scope="module")
def vlm8b() -> LoadedVLM:
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), LLAMA3_LLAVA_NEXT_8B_GEOMETRY, seed=1)
    return LoadedVLM(model.eval(), processor, torch.device("cpu"), torch.float32)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _prepare(vlm: LoadedVLM, tmp_path, w: int, h: int, question="what color is the circle ?", answer="red",
             include_answer=True) -> Prepared:
    path = tmp_path / f"img_{w}x{h}.png"
    _noise(w, h).save(path)
    prep = _Preparer(vlm, ExtractionConfig(include_answer=include_answer), ImageTokenMapper(vlm.model))
    out = prep(0, {"sample_id": f"s{w}x{h}", "image": str(path), "question": question, "answer": answer})
    assert isinstance(out, Prepared), out
    return out


def _table(vlm: LoadedVLM, p: Prepared) -> pl.DataFrame:
    prep = _Preparer(vlm, ExtractionConfig(), ImageTokenMapper(vlm.model))
    return build_token_table([p.tokens], vlm.tokenizer, prep.image_token_id, prep.special_ids)


@pytest.mark.parametrize("size", [(336, 336), (500, 300), (300, 500), (900, 120)])
def test_layout_counts_real_8b_geometry(vlm8b, tmp_path, size):
    w, h = size
    p = _prepare(vlm8b, tmp_path, w, h)
    df = _table(vlm8b, p)
    image = df.filter(pl.col("modality") == "image")
    n_image_ids = int((p.tokens.input_ids == vlm8b.model.config.image_token_id).sum())
    assert image.height == n_image_ids  # every image token is mapped, none invented

    base = image.filter(pl.col("view") == "base")
    assert base.height == SIDE * SIDE == 576
    # the base grid covered exactly once, in row-major order
    assert base["grid_row"].to_list() == [r for r in range(SIDE) for _ in range(SIDE)]
    assert base["grid_col"].to_list() == list(range(SIDE)) * SIDE
    assert base["position"].diff().drop_nulls().eq(1).all()  # contiguous, first

    tiles = image.filter(pl.col("view") == "tile")
    newlines = image.filter(pl.col("view") == "newline")
    n_rows = tiles["tile_row"].max() + 1
    n_cols = tiles["tile_col"].max() + 1
    assert newlines.height == n_rows  # one image_newline per unpadded feature row
    assert tiles.height == n_rows * n_cols
    assert tiles.select(pl.struct("tile_row", "tile_col").n_unique()).item() == tiles.height
    # the unpadded map keeps the image's aspect ratio (up to one patch row/col of rounding)
    assert abs(n_cols / n_rows - w / h) < 2 * max(w / h, 1) / min(n_rows, n_cols)
    # base tokens carry no tile coordinates and vice versa
    assert base["tile_row"].null_count() == base.height
    assert tiles["grid_row"].null_count() == tiles.height


def test_positions_match_what_the_model_scatters(vlm8b, tmp_path):
    """Decisive: the map's (view, coordinates) → the feature the model really put at that position.

    The projector output of every crop is computed independently; the language model's input
    embedding at each image position must equal the base patch (grid_row, grid_col), the tile patch
    at (tile_row, tile_col) of the unpadded map, or image_newline, as the map says.
    """
    model = vlm8b.model
    inner = model.model
    for w, h in [(500, 300), (280, 610)]:
        p = _prepare(vlm8b, tmp_path, w, h)
        df = _table(vlm8b, p)
        inputs = collate([p], 0, torch.float32, torch.device("cpu"))
        seen = {}

        def grab(_mod, args, kwargs):
            seen["embeds"] = kwargs["inputs_embeds"][0].detach().clone()
            raise KeyboardInterrupt  # nothing after the embeddings is needed

        handle = inner.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad(), pytest.raises(KeyboardInterrupt):
                model(**inputs)
        finally:
            handle.remove()
        embeds = seen["embeds"]

        # independent: vision tower → feature layer (-2) → drop CLS → projector, per crop
        with torch.no_grad():
            crops = p.pixel_values
            vt = inner.vision_tower(crops, output_hidden_states=True)
            feats = inner.multi_modal_projector(vt.hidden_states[model.config.vision_feature_layer][:, 1:])
        n_crops = feats.shape[0]
        base_feats = feats[0].reshape(SIDE, SIDE, -1)

        rows = df.to_dicts()
        base = [r for r in rows if r["view"] == "base"]
        for r in base:
            torch.testing.assert_close(embeds[r["position"]], base_feats[r["grid_row"], r["grid_col"]])
        for r in (r for r in rows if r["view"] == "newline"):
            torch.testing.assert_close(embeds[r["position"]], inner.image_newline)

        # tiles: find which (crop, patch) feature sits at each tile position (nearest neighbour)
        tiles = [r for r in rows if r["view"] == "tile"]
        pool = feats[1:].reshape(-1, feats.shape[-1])
        pos = torch.tensor([r["position"] for r in tiles])
        d = torch.cdist(embeds[pos], pool)
        best = d.argmin(1)
        assert torch.all(d.min(1).values < 1e-4)
        crop, patch = best // (SIDE * SIDE), best % (SIDE * SIDE)
        tile_rc = torch.tensor([[r["tile_row"], r["tile_col"]] for r in tiles])
        # crops are row-major tiles of the chosen pinpoint: some crops-per-row value must make
        # (tile_row, tile_col) a pure translation (the unpadding offset) of the padded layout
        for npw in (k for k in range(1, n_crops) if (n_crops - 1) % k == 0):
            padded = torch.stack(
                [(crop // npw) * SIDE + patch // SIDE, (crop % npw) * SIDE + patch % SIDE], dim=1
            )
            shift = padded - tile_rc
            if bool((shift == shift[0]).all()):
                break
        else:
            raise AssertionError("tile coordinates are not a translation of the padded anyres layout")
        assert int(shift[0].min()) == 0  # padding is removed on one axis only
        # every token's feature is distinct: no patch used twice
        assert len(set(best.tolist())) == len(tiles)


def test_text_roles_and_specials(vlm8b, tmp_path):
    p = _prepare(vlm8b, tmp_path, 400, 400, question="what color is the circle ?", answer="red")
    df = _table(vlm8b, p)
    text = df.filter(pl.col("modality") != "image")
    q = text.filter(pl.col("role") == "question")["token"].to_list()
    a = text.filter(pl.col("role") == "answer")["token"].to_list()
    t = text.filter(pl.col("role") == "template")["token"].to_list()
    assert q == ["what", "color", "is", "the", "circle", "?"]
    assert a == ["red"]
    assert t == ["<s>", "user", ":", "assistant", ":", "</s>"]
    specials = df.filter(pl.col("modality") == "special")["token"].to_list()
    assert specials == ["<s>", "</s>"]
    img = df.filter(pl.col("modality") == "image")
    assert img["role"].null_count() == img.height and img["token"].null_count() == img.height
    assert df["position"].to_list() == list(range(df.height))
    # without the answer: the prompt ends with the generation prompt
    p2 = _prepare(vlm8b, tmp_path, 400, 400, include_answer=False)
    df2 = _table(vlm8b, p2)
    assert df2.filter(pl.col("role") == "answer").height == 0
    assert df2["token"].to_list()[-2:] == ["assistant", ":"]


def test_layout_is_cached_per_size(vlm8b):
    m = ImageTokenMapper(vlm8b.model)
    a = m.layout((300, 500))
    assert m.layout((300, 500)) is a
    assert len(m.layout((500, 300))) != len(a) or m.layout((500, 300)) is not a


class _FakeProcessor:
    """apply_chat_template of a Llama-3-style template that trims the content (as llava-hf's does)."""

    TEMPLATE = (
        "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|end|>\n\n"
        "{% for c in m['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] | trim }}<|eot|>{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %}<|start|>assistant<|end|>\n\n{% endif %}"
    )

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        import jinja2

        return jinja2.Template(self.TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>"
        )


@pytest.mark.parametrize("question", ["what is it ?", "  padded question ?  "])
def test_chat_renderer_spans(question):
    from msae.extract.token_map import ChatRenderer

    r = ChatRenderer(_FakeProcessor(), include_answer=True).render(question, "a cat", has_image=True)
    assert r.text.startswith("<s><|start|>user<|end|>\n\n<image>\n")
    assert r.text.endswith("<|start|>assistant<|end|>\n\na cat<|eot|>")
    assert r.text[slice(*r.question)] == question.strip()
    assert r.text[slice(*r.answer)] == "a cat"
    r2 = ChatRenderer(_FakeProcessor(), include_answer=False).render(question, "a cat", has_image=False)
    assert r2.answer is None and "<image>" not in r2.text and r2.text.endswith("assistant<|end|>\n\n")
