"""The staged VLM training recipe on a tiny model (a few steps only) and the committed model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
from msae.embedded.vlm_train import (
    PATCH_HEADS,
    build_train_data,
    check_pixel_path,
    evaluate,
    train_vision_stage,
    train_vqa_stage,
)
from msae.world.config import ALL_QUESTION_KINDS, V1_QUESTION_KINDS, ShapesConfig
from msae.world.shapes import VOCABULARY

TINY = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, text_heads=2,
                   text_intermediate=64)  # fmt: skip
MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "shapes-llava"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), TINY, seed=0)
    data = build_train_data(ShapesConfig(seed=3, n_images=48, questions_per_image=2, question_kinds=V1_QUESTION_KINDS), processor, progress=False)
    return model, processor, data


def test_train_data_matches_processor(tiny):
    model, processor, data = tiny
    check_pixel_path(processor, data)
    assert data.q_ids.shape[0] == 96 and set(data.patch) == set(PATCH_HEADS)
    assert (data.q_ids[:, -1] == processor.tokenizer.eos_token_id).all()
    assert (data.q_ids[:, -2] == data.q_answer).all()


def test_vision_stage_reduces_loss(tiny):
    model, processor, data = tiny
    torch.manual_seed(0)
    losses = train_vision_stage(model, data, processor, steps=25, lr=1e-2, batch_size=16, seed=0, log_every=1000)
    assert len(losses) == 25
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_vqa_stage_reduces_loss(tiny):
    model, processor, data = tiny
    torch.manual_seed(0)
    losses = train_vqa_stage(model, data, processor, steps=20, lr=3e-3, batch_size=8, seed=1, log_every=1000,
                             curriculum=((0.0, ("color", "shape"), False), (0.5, None, False)))  # fmt: skip
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert all(p.requires_grad for p in model.parameters())  # the stage restores trainability


def test_evaluate_reports_per_kind_accuracy(tiny):
    model, processor, _ = tiny
    result = evaluate(model, processor, ShapesConfig(seed=99, n_images=30, question_kinds=V1_QUESTION_KINDS))
    assert set(result["per_kind"]) <= set(ALL_QUESTION_KINDS) and result["n"] == 30
    for r in result["per_kind"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] > 0 and 0 < r["chance"] < 1
    assert 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").exists(),
                    reason=f"no trained model at {MODEL_DIR} (run: python -m msae.embedded.vlm_train --out data/shapes-llava)")  # fmt: skip
def test_committed_model_answers_colour_questions():
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(MODEL_DIR)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    result = evaluate(model, processor, ShapesConfig(seed=99, n_images=100, question_kinds=("color",)))
    assert result["per_kind"]["color"]["n"] == 100
    # v2 measured 0.79 here (100 questions) and 0.88 on eval.json's 135; chance is 0.125
    assert result["per_kind"]["color"]["accuracy"] >= 0.75, result
    report = json.loads((MODEL_DIR / "eval.json").read_text())
    assert report["held_out"]["seed"] not in (report["train_world"]["seed"], 1234)
