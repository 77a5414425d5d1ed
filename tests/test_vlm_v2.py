"""Embedded VLM v2: vocabulary extension, masked-view descriptions, the multi-token loss, the
committed model's answers, and the planted multimodality checked from activations alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from msae.config import PROJECT_ROOT
from msae.embedded import vlm_v2
from msae.embedded.views import PATCH_SIZE
from msae.vlm.build import build_llava_next, build_word_tokenizer
from msae.world.config import ShapesConfig
from msae.world.shapes import COLORS, SHAPES, V2_WORDS, VOCABULARY, generate_scene

MODEL = PROJECT_ROOT / "data" / "shapes-llava"


def test_v2_words_extend_v1_ids():
    v1 = build_word_tokenizer([w for w in VOCABULARY if w not in V2_WORDS]).get_vocab()
    v2 = build_word_tokenizer(VOCABULARY).get_vocab()
    assert all(v2[w] == i for w, i in v1.items())
    assert sorted(v2[w] for w in V2_WORDS) == list(range(len(v1), len(v2)))


def test_masked_describe_view_is_black_outside_the_kept_patches_and_truthful():
    cfg = ShapesConfig(seed=3, n_images=1)
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        scene = generate_scene(rng, cfg)
        pix, keep, answer = vlm_v2.masked_describe_view(scene, rng)
        pm = np.kron(keep, np.ones((PATCH_SIZE, PATCH_SIZE), dtype=bool))
        assert (pix[~pm] == 0).all()
        assert (pix[pm] == np.asarray(scene.image)[pm]).all()
        if answer == "background":
            kinds.add("background")
            assert not any((m & pm).any() for m in scene.masks)
        else:
            kinds.add("object")
            for part in answer.split(" and "):
                size, color, shape = part.split()
                assert any((o.size, o.color, o.shape) == (size, color, shape) for o in scene.objects)
    assert kinds == {"background", "object"}


def test_v2_loss_covers_every_answer_token_and_aligns_colours():
    tok = build_word_tokenizer(VOCABULARY)
    model, processor = build_llava_next(tok, seed=0)
    data = vlm_v2.build_v2_data(ShapesConfig(seed=4, n_images=12, questions_per_image=2, always_ask=("describe",)),
                                processor, progress=False)
    # every sample ends with its answer and EOS; the target length counts exactly those tokens
    for i in range(len(data.q_ids)):
        ids = data.q_ids[i].tolist()
        n = int(data.q_target_len[i])
        assert ids[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(ids[-n - 1]) == ":"
    idx = torch.arange(16)
    from msae.embedded.vlm_train import _norm_consts

    loss, stats = vlm_v2.v2_loss(model, data, idx, *_norm_consts(processor), vlm_v2.color_word_ids(tok), 1.0)
    assert torch.isfinite(loss) and {"ce", "acc", "align", "align_acc"} <= set(stats)
    # alignment off: the loss is the answer cross-entropy alone
    loss0, stats0 = vlm_v2.v2_loss(model, data, idx, *_norm_consts(processor), vlm_v2.color_word_ids(tok), 0.0)
    assert float(loss0) == pytest.approx(stats0["ce"]) and "align" not in stats0
    # residual alignment at the captured layers adds its terms, one per layer
    loss2, stats2 = vlm_v2.v2_loss(model, data, idx, *_norm_consts(processor), vlm_v2.color_word_ids(tok), 1.0,
                                   residual_weight=1.0, residual_layers=(1, 3))
    assert {"res1", "res3", "word_acc1", "word_acc3"} <= set(stats2)
    assert float(loss2) == pytest.approx(float(loss) + stats2["res1"] + stats2["res3"], rel=1e-5)


def _residual_batch(word_shift: float):
    """Two samples, 4 base patches each (colours 0, 1, none, 0), text tokens "red", "blue", "the":
    image residuals are colour prototypes (+ noise); the colour words' residuals are
    ``word_shift`` x their colour's prototype plus a common text offset."""
    gen = torch.Generator().manual_seed(0)
    d, image_token, red, blue, the = 16, 4, 10, 11, 12
    proto = torch.nn.functional.normalize(torch.randn(2, d, generator=gen), dim=-1) * 5
    colours = torch.tensor([[0, 1, -100, 0], [1, 0, -100, 1]])
    ids = torch.tensor([[image_token] * 4 + [red, blue, the], [image_token] * 4 + [blue, red, the]])
    hidden = torch.randn(2, 7, d, generator=gen) * 0.1
    for b in range(2):
        for j in range(4):
            if colours[b, j] >= 0:
                hidden[b, j] += proto[colours[b, j]]
        for j, wid in enumerate(ids[b, 4:].tolist()):
            hidden[b, 4 + j] += 3.0 + (word_shift * proto[wid - red] if wid in (red, blue) else 0)
    return hidden, ids, torch.ones_like(ids), image_token, colours, torch.tensor([red, blue])


def test_residual_alignment_rewards_colour_words_along_their_patches_direction():
    """The loss is low when a colour word's residual points along its colour's patch prototype
    (and other words along none), high when the words point against them; images are the
    reference (prototypes carry no gradient), words receive it."""
    aligned = vlm_v2.residual_alignment(*_residual_batch(+4.0))
    against = vlm_v2.residual_alignment(*_residual_batch(-4.0))
    assert aligned[1]["word_acc"] == 1.0 and against[1]["word_acc"] == 0.0
    assert aligned[1]["word_cos"] > 0.5 > -0.5 > against[1]["word_cos"]
    assert float(aligned[0]) < 0.5 * float(against[0])
    hidden, *rest = _residual_batch(0.0)
    hidden.requires_grad_(True)
    vlm_v2.residual_alignment(hidden, *rest)[0].backward()
    assert hidden.grad[:, :4].abs().sum() == 0 and hidden.grad[:, 4:].abs().sum() > 0


@pytest.fixture(scope="module")
def committed():
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    if json.loads((MODEL / "eval.json").read_text()).get("format") != "msae-shapes-llava/2":
        pytest.fail("data/shapes-llava is not the v2 model: python -m msae.embedded.vlm_v2")
    return LlavaNextForConditionalGeneration.from_pretrained(MODEL).eval(), AutoProcessor.from_pretrained(MODEL)


def test_committed_model_describes_masked_objects(committed):
    model, processor = committed
    rng = np.random.default_rng(5)
    cfg = ShapesConfig(seed=99, n_images=1)
    images, truths = [], []
    from PIL import Image

    for _ in range(48):
        scene = generate_scene(rng, cfg)
        pix, _, answer = vlm_v2.masked_describe_view(scene, rng)
        images.append(Image.fromarray(pix))
        truths.append(answer)
    got = vlm_v2.generate_answers(model, processor, images, [vlm_v2.DESCRIBE_QUESTION] * len(images))
    colour_right = [g.split(" and ")[0].split()[1:2] == t.split(" and ")[0].split()[1:2]
                    for g, t in zip(got, truths, strict=True) if t != "background"]
    assert np.mean(colour_right) >= 0.8, list(zip(got, truths, strict=True))[:8]


@pytest.fixture(scope="module")
def probe(committed, tmp_path_factory):
    import sys

    sys.path.insert(0, str(PROJECT_ROOT / "benchmarks"))
    from bench_world_probe import extract_world, probe_store

    _, store = extract_world(str(tmp_path_factory.mktemp("probe") / "store"), str(MODEL), seed=4321, n_images=120,
                             layers=[1, 3])
    return probe_store(store, [1, 3])


@pytest.mark.slow
def test_colour_directions_are_shared_more_than_shape_ones(probe):
    """What the committed model holds (benchmarks/RESULTS.md, "World probe"): image probes are
    near perfect on patches; colour probes transfer to the colour words far better than shape
    probes to the shape words, at every captured layer."""
    for layer in ("1", "3"):
        colour, shape = probe[layer]["color"]["summary"], probe[layer]["shape"]["summary"]
        assert colour["n"] == len(COLORS) and shape["n"] == len(SHAPES)
        assert colour["image_mean"] >= 0.95 and shape["image_mean"] >= 0.9
        assert colour["text_median"] >= shape["text_median"] + 0.2
    assert probe["1"]["shape"]["summary"]["text_max"] <= 0.6


@pytest.mark.slow
def test_every_colour_probe_transfers_to_its_word(probe):
    """World v2's planted multimodality: a probe fit on a colour's image patches finds that colour's
    word tokens (AUROC >= 0.85) at every captured layer — the residual alignment's doing (1.000 on
    this world; 0.23-0.93 before it, docs/shapes_vlm.md)."""
    for layer in ("1", "3"):
        assert probe[layer]["color"]["summary"]["text_min"] >= 0.85


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="world v2's aim for shapes at layer 3 is not reached: a shape probe "
                   "transfers to its word with AUROC up to 0.65 there (0.6 aimed for; docs/shapes_vlm.md); strict, "
                   "so reaching it flips this test")
def test_no_shape_probe_transfers_to_its_word(probe):
    for layer in ("1", "3"):
        assert probe[layer]["shape"]["summary"]["text_max"] <= 0.6
