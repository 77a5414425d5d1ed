"""Shared fixtures: a tiny random LLaVA-NeXT saved to disk and configs pointing at temp stores.

Nothing here downloads anything; models are random-initialised with the shapes world's
vocabulary so they load through the same ``from_pretrained`` path as a hub checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

# one torch thread in the test process and in the CLI processes tests start (the assets' thread
# rule honours OMP_NUM_THREADS): the suite shares a small machine with whatever else runs on it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from msae.config import PROJECT_ROOT  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A random default-geometry LlavaNext (64-px images, 8×8 base grid) with a saved processor."""
    from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
    from msae.world.shapes import VOCABULARY

    out = tmp_path_factory.mktemp("tiny_vlm")
    geometry = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=3, text_heads=2,
                           text_intermediate=64)
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), geometry, seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture
def tiny_config_data(tmp_path, tiny_vlm_dir) -> dict:
    """A raw config for a whole pipeline run on 8 shapes scenes with the tiny VLM."""
    return {
        "store": str(tmp_path / "store"),
        "dataset": {"kind": "shapes", "shapes": {"seed": 7, "n_images": 8}},
        "model": {"name_or_path": str(tiny_vlm_dir), "dtype": "float32", "device": "cpu", "batch_size": 4,
                  "local_files_only": True},
        "layers": [0, 2],
        "widths": [16],
        "extraction": {"chunk_samples": 4, "rows_per_zarr_chunk": 256},
        # a few seconds of SAE training on ~1k tokens; two held-out samples for loss recovered
        "sae": {"k": 4, "token_budget": 8192, "batch_size": 128, "lr": 0.01, "buffer_rows": 2048,
                "init_sample_tokens": 1024, "eval_fraction": 0.25, "loss_samples": 2},
        "latents": {"cards": 4},
        # the small CLIP trained on the shapes world, committed in data/ (no download)
        "embedders": {"image_text": [str(PROJECT_ROOT / "data" / "shapes-clip")], "device": "cpu"},
        "scores": {"bootstrap": 200},
    }
