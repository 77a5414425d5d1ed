"""Evidence loading, cards and the index page on a tiny hand-built latent_stats store."""

import io

import numpy as np
import polars as pl
import pytest
from PIL import Image

from msae.latents.cards import CARD_WIDTH, CELL, fit_image, render_card, stat_summary, write_cards
from msae.latents.evidence import LatentEvidence, latents_dir, load_evidence
from msae.latents.index_html import build_index, write_index
from msae.store import Store

LAYER, WIDTH = 1, 16


def _png_bytes(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _top_row(latent, modality, rank, sample_index, sample_id, score, **extra) -> dict:
    row = {"latent": latent, "modality": modality, "rank": rank, "sample_index": sample_index,
           "sample_id": sample_id, "score": score, "active_count": 1, "mean_activation": 0.1,
           "max_activation": 1.0, "peak_position": None, "grid_rows": None, "grid_cols": None,
           "patch_activations": None, "text_positions": None, "text_activations": None}
    row.update(extra)
    if row["text_activations"] is not None:
        row["text_activations"] = [float(a) for a in row["text_activations"]]
    return row


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    """Three samples (two images relative to the store, one non-square; one absolute local path),
    latents 0–3; in a local folder and in an fsspec memory:// store."""
    s = Store(str(tmp_path / "store") if request.param == "local" else f"memory://cards-{tmp_path.name}")
    s.write_bytes(_png_bytes((64, 64), (200, 30, 40)), "world/images/a.png")
    s.write_bytes(_png_bytes((40, 28), (30, 160, 60)), "world/images/c.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere/b.png").write_bytes(_png_bytes((64, 64), (20, 60, 210)))
    s.write_parquet(pl.DataFrame({
        "sample_id": ["s0", "s1", "s2"],
        "image": ["world/images/a.png", str(tmp_path / "elsewhere/b.png"), "world/images/c.png"],
        "question": ["what color is the circle?", "how many objects are there?", "is there a square?"],
        "answer": ["red", "two", "yes"],
        "source_index": [0, 1, 2],
    }), Store.SAMPLES)
    # tokens of samples 0 and 1 (shuffled rows): special, image and text (template/question/answer)
    rows = []
    for index, sid, words in [(0, "s0", ["what", "color", "is", "the", "circle", "?"]),
                              (1, "s1", ["how", "many", "objects", "are", "there", "?"])]:
        rows.append((index, sid, 0, "<s>", "special", "template"))
        rows.append((index, sid, 1, "user", "text", "template"))
        rows += [(index, sid, 2 + k, "<image>", "image", None) for k in range(4)]
        rows += [(index, sid, 6 + k, w, "text", "question") for k, w in enumerate(words)]
        rows.append((index, sid, 12, "assistant", "text", "template"))
        rows.append((index, sid, 13, "red" if index == 0 else "two", "text", "answer"))
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    s.write_parquet(pl.DataFrame(rows, schema={"sample_index": pl.Int32, "sample_id": pl.String,
                                               "position": pl.Int32, "token": pl.String,
                                               "modality": pl.String, "role": pl.String}, orient="row"),
                    Store.TOKENS)
    stats = pl.DataFrame({
        "latent": [0, 1, 2, 3], "selected": [True] * 4, "dead": [False, False, True, False],
        "explained": [True, True, False, True],
        "freq_image": [0.01, 0.0, 0.0, 0.2], "freq_text": [0.0, 0.03, 0.0, 0.1],
        "max_image": [1.5, 0.0, 0.0, 2.0], "max_text": [0.0, 2.5, 0.0, 1.0],
        "modality_score": [1.0, 0.0, float("nan"), 0.6],
    }, schema_overrides={"latent": pl.Int32})
    s.write_parquet(stats, latents_dir(LAYER, WIDTH), "stats.parquet")
    acts_a = np.zeros(64, dtype=np.float32)
    acts_a[[9, 10, 17]] = [1.0, 2.0, 0.5]
    acts_c = np.zeros(9, dtype=np.float32)
    acts_c[4] = 0.7
    text_pos = [1, 6, 7, 8, 9, 10, 11, 12, 13]
    top = [
        _top_row(3, "image", 1, 2, "s2", 1.0, grid_rows=3, grid_cols=3, patch_activations=acts_c.tolist()),
        _top_row(3, "image", 0, 0, "s0", 3.0, grid_rows=8, grid_cols=8, patch_activations=acts_a.tolist(),
                 active_count=3, max_activation=2.0),
        # peak_position given: the answer token, though a template token (position 1) is as high
        _top_row(3, "text", 0, 0, "s0", 0.9, peak_position=13, text_positions=text_pos,
                 text_activations=[0.9, 0, 0, 0, 0, 0.3, 0, 0, 0.9]),
        _top_row(0, "image", 0, 1, "s1", 2.0, grid_rows=8, grid_cols=8,
                 patch_activations=np.eye(8, dtype=np.float32).ravel().tolist()),
        # no peak_position: first argmax (two ties at "objects" and "?")
        _top_row(1, "text", 0, 1, "s1", 2.5, text_positions=text_pos,
                 text_activations=[0, 0, 0, 2.5, 0, 0, 2.5, 0, 0]),
    ]
    s.write_parquet(pl.DataFrame(top, schema={
        "latent": pl.Int32, "modality": pl.String, "rank": pl.Int16, "sample_index": pl.Int32,
        "sample_id": pl.String, "score": pl.Float64, "active_count": pl.Int32, "mean_activation": pl.Float32,
        "max_activation": pl.Float32, "peak_position": pl.Int32, "grid_rows": pl.Int16, "grid_cols": pl.Int16,
        "patch_activations": pl.List(pl.Float32), "text_positions": pl.List(pl.Int32),
        "text_activations": pl.List(pl.Float32)}), latents_dir(LAYER, WIDTH), "top_examples.parquet")
    return s


def test_latents_dir():
    assert latents_dir(24, 131072) == "latents/layer=24/width=131072"


def test_load_evidence_defaults_to_explained(store, tmp_path):
    evidence = load_evidence(store, LAYER, WIDTH)
    assert sorted(evidence) == [0, 1, 3]
    ev = evidence[3]
    assert ev.latent == 3 and ev.stats["freq_image"] == 0.2 and ev.stats["explained"]
    assert [e.sample_id for e in ev.images] == ["s0", "s2"]  # rank order
    first = ev.images[0]
    assert first.image_path == store.url("world/images/a.png")
    assert first.patch_activations.shape == (8, 8)
    assert first.patch_activations[1, 1] == 1.0 and first.patch_activations[1, 2] == 2.0
    assert first.patch_activations[2, 1] == 0.5 and first.patch_activations.sum() == 3.5
    assert (first.score, first.active_count, first.max_activation) == (3.0, 3, 2.0)
    assert (first.question, first.answer) == ("what color is the circle?", "red")
    assert ev.images[1].patch_activations.shape == (3, 3)
    assert evidence[0].images[0].image_path == str(tmp_path / "elsewhere/b.png")  # absolute stays


def test_load_evidence_text_examples(store):
    evidence = load_evidence(store, LAYER, WIDTH, latents=[3, 1])
    text = evidence[3].texts[0]
    assert text.pieces == ["user", "what", "color", "is", "the", "circle", "?", "assistant", "red"]
    assert text.activations.tolist() == pytest.approx([0.9, 0, 0, 0, 0, 0.3, 0, 0, 0.9])
    assert text.peak == 8 and text.pieces[text.peak] == "red"  # the ranked peak_position
    assert text.image_path.endswith("world/images/a.png") and text.answer == "red"
    tie = evidence[1].texts[0]
    assert tie.peak == 3 and tie.pieces[tie.peak] == "objects"
    assert evidence[1].images == [] and evidence[3].texts[0].sample_index == 0


def test_load_evidence_latent_without_examples(store):
    evidence = load_evidence(store, LAYER, WIDTH, latents=[2])
    assert evidence[2].images == [] and evidence[2].texts == [] and evidence[2].stats["dead"]


def test_load_evidence_without_top_examples(store):
    store.rm(latents_dir(LAYER, WIDTH), "top_examples.parquet")
    evidence = load_evidence(store, LAYER, WIDTH)
    assert sorted(evidence) == [0, 1, 3] and all(not e.images and not e.texts for e in evidence.values())


def test_stat_summary_short_strings():
    summary = stat_summary({"freq_image": 0.2, "freq_text": None, "max_image": 2.0, "max_text": 1.25,
                            "modality_score": float("nan")})
    assert summary == {"freq img": "2.00e-01", "freq txt": "–", "max img": "2", "max txt": "1.25",
                       "modality": "–"}


def test_fit_image_upscales_small_with_nearest():
    small = Image.new("RGB", (64, 64), (1, 2, 3))
    small.putpixel((0, 0), (255, 0, 0))
    big = fit_image(small)
    assert big.size == (128, 128)
    assert big.getpixel((1, 1)) == (255, 0, 0) and big.getpixel((2, 2)) == (1, 2, 3)
    assert fit_image(Image.new("RGB", (640, 480))).size == (192, 144)
    assert fit_image(Image.new("RGB", (150, 100))).size == (150, 100)


def _png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_render_card_png(store):
    evidence = load_evidence(store, LAYER, WIDTH)
    card = _png(render_card(evidence[3]))
    assert card.format == "PNG" and card.width == CARD_WIDTH
    # header + two image rows (≥128 px each) + one text block
    assert card.height >= 2 * 128 + 60
    arr = np.array(card.convert("RGB"))
    # the 64-px red image is shown at 128 px in the first column; its masked view keeps 2×1 red
    # patches (16 px each at 2×) in the second
    red = np.all(arr == (200, 30, 40), axis=-1)
    first, second = red[:, :CELL + 12], red[:, CELL + 12:2 * CELL + 20]
    assert first.sum(axis=1).max() == 128 and first.sum(axis=0).max() == 128
    assert second.sum(axis=1).max() == 32 and second.sum() == 16 * 16 * 2 + 16 * 16


def test_render_card_without_images_or_texts(store, tmp_path):
    evidence = load_evidence(store, LAYER, WIDTH)
    text_only = _png(render_card(evidence[1], title="latent 1 (text only)"))
    image_only = _png(render_card(evidence[0]))
    empty = _png(render_card(LatentEvidence(7, {}, [], [])))
    assert text_only.width == image_only.width == empty.width == CARD_WIDTH
    assert empty.height < text_only.height < image_only.height
    missing = evidence[0].images[0].__class__(**{**evidence[0].images[0].__dict__,
                                                 "image_path": str(tmp_path / "nope.png")})
    assert _png(render_card(LatentEvidence(0, {}, [missing], []))).width == CARD_WIDTH


def test_write_cards(store):
    evidence = load_evidence(store, LAYER, WIDTH)
    names = write_cards(store, LAYER, WIDTH, evidence, limit=2)
    assert names == ["cards/latent_000000.png", "cards/latent_000001.png"]
    for name in names:
        assert _png(store.read_bytes(latents_dir(LAYER, WIDTH), name)).width == CARD_WIDTH
    assert len(write_cards(store, LAYER, WIDTH, evidence, limit=None)) == 3


def test_build_index_escapes_and_links(store):
    entries = [
        {"latent": 3, "card": "cards/latent_000003.png", "stats": {"freq img": "2.00e-01"},
         "concept_visual": "red <circles> & \"discs\"", "concept_textual": "colours", "modality": "multimodal"},
        {"latent": 12, "card": "cards/latent_000012.png", "stats": {}},
    ]
    page = build_index(entries, "latents <layer 1>")
    assert "<title>latents &lt;layer 1&gt;</title>" in page
    assert "red &lt;circles&gt; &amp; &quot;discs&quot;" in page and "<circles>" not in page
    assert page.count('class="card"') == 2
    assert 'href="cards/latent_000003.png"' in page and 'src="cards/latent_000012.png"' in page
    assert "modality-multimodal" in page and "http" not in page.replace("http-equiv", "")
    name = write_index(store, LAYER, WIDTH, entries)
    assert name == "latents/layer=1/width=16/index.html"
    assert store.read_bytes(name).decode().startswith("<!DOCTYPE html>")
