"""CUDA out-of-memory back-off and automatic batch size, simulated on CPU.

The model's forward is patched to raise ``torch.cuda.OutOfMemoryError`` for batches larger than a
limit; extraction must halve the batch, retry the same samples and end with exactly the rows
and token table of a run that never hit the error.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from PIL import Image

import msae.extract.extractor as extractor_mod
from msae.config import ExtractionConfig, ModelConfig
from msae.extract import extract_activations
from msae.extract.extractor import auto_batch_size, is_out_of_memory, resolve_batch_size
from msae.store import Store
from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
from msae.vlm.load import LoadedVLM
from msae.world.shapes import VOCABULARY

GEOM = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=3, text_heads=2,
                   text_intermediate=64)
LAYERS = [0, 2]


def _vlm(batch_size: int | str = 4) -> LoadedVLM:
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), GEOM, seed=0)
    cfg = ModelConfig(name_or_path="tiny", device="cpu", dtype="float32", batch_size=batch_size)
    return LoadedVLM(model.eval().requires_grad_(False), processor, torch.device("cpu"), torch.float32, cfg)


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> pl.DataFrame:
    folder = tmp_path_factory.mktemp("oom_images")
    rows = []
    for i in range(10):  # varied sizes: padded batches of different lengths
        arr = np.random.default_rng(i).integers(0, 256, (64 + 5 * (i % 3), 40 + 7 * i, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"s{i}.png")
        rows.append({"sample_id": f"s{i}", "image": str(folder / f"s{i}.png"),
                     "question": ["what color is the circle ?", "how many objects are there ?"][i % 2],
                     "answer": ["red", "three"][i % 2], "source_index": i})
    return pl.DataFrame(rows)


def _cfg() -> ExtractionConfig:
    return ExtractionConfig(chunk_samples=8, rows_per_zarr_chunk=64)


def _oom_above(model: torch.nn.Module, limit: int, seen: list[int]) -> None:
    """Patch ``model.forward``: batches over ``limit`` samples raise CUDA out-of-memory."""
    real = model.forward

    def forward(*args, **kwargs):
        n = kwargs["input_ids"].shape[0]
        seen.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} GiB (simulated)")
        return real(*args, **kwargs)

    model.forward = forward


def _outputs(store: Store) -> tuple[dict[int, np.ndarray], pl.DataFrame]:
    arrays = {layer: zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True),
                                     mode="r")[:] for layer in LAYERS}
    return arrays, store.read_parquet(store.TOKENS)


@pytest.fixture(scope="module")
def reference(samples, tmp_path_factory) -> tuple[dict[int, np.ndarray], pl.DataFrame]:
    """Unbatched (one sample per forward), no error."""
    store = Store(str(tmp_path_factory.mktemp("oom_ref") / "store"))
    extract_activations(samples, _vlm(1), LAYERS, store, _cfg(), progress=False)
    return _outputs(store)


@pytest.mark.parametrize("limit", [2, 1])
def test_oom_halves_and_matches_unbatched(samples, reference, tmp_path, limit):
    vlm = _vlm(4)
    seen: list[int] = []
    _oom_above(vlm.model, limit, seen)
    store = Store(str(tmp_path / "store"))
    res = extract_activations(samples, vlm, LAYERS, store, _cfg(), progress=False)
    assert res.batch_size == limit and res.oom_halvings == {2: 1, 1: 2}[limit]
    assert res.summary()["oom_halvings"] == res.oom_halvings
    tried = [4, 2, 1][: res.oom_halvings + 1]
    assert seen[: len(tried)] == tried  # halved on each failure, the same samples retried
    assert max(seen[len(tried):]) == limit  # and the smaller size kept for the rest of the run
    arrays, tokens = _outputs(store)
    ref_arrays, ref_tokens = reference
    assert tokens.equals(ref_tokens)  # same rows, same order, nothing lost or duplicated
    for layer in LAYERS:
        assert arrays[layer].shape == ref_arrays[layer].shape
        if limit == 1:  # the same forwards as the reference: bit-identical
            np.testing.assert_array_equal(arrays[layer], ref_arrays[layer])
        else:  # right-padded batches of 2: equal up to float16 storage rounding of kernel noise
            np.testing.assert_allclose(arrays[layer].astype(np.float32), ref_arrays[layer].astype(np.float32),
                                       atol=2e-3, rtol=2e-3)


def test_oom_result_equals_a_run_at_the_final_size(samples, tmp_path):
    """Bit-identical to a run that started at the size the back-off settled on."""
    plain = Store(str(tmp_path / "plain"))
    extract_activations(samples, _vlm(2), LAYERS, plain, _cfg(), progress=False)
    vlm = _vlm(4)
    _oom_above(vlm.model, 2, [])
    backed_off = Store(str(tmp_path / "oom"))
    extract_activations(samples, vlm, LAYERS, backed_off, _cfg(), progress=False)
    (a, ta), (b, tb) = _outputs(plain), _outputs(backed_off)
    assert ta.equals(tb)
    for layer in LAYERS:
        np.testing.assert_array_equal(a[layer], b[layer])


def test_oom_on_one_sample_and_other_errors_propagate(samples, tmp_path):
    vlm = _vlm(4)
    _oom_above(vlm.model, 0, [])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        extract_activations(samples, vlm, LAYERS, Store(str(tmp_path / "a")), _cfg(), progress=False)

    vlm = _vlm(4)
    calls: list[int] = []

    def broken(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        raise RuntimeError("shape mismatch")

    vlm.model.forward = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        extract_activations(samples, vlm, LAYERS, Store(str(tmp_path / "b")), _cfg(), progress=False)
    assert calls == [4]  # not mistaken for out-of-memory: no retry


def test_oom_then_crash_resumes_to_the_same_result(samples, reference, tmp_path, monkeypatch):
    """Resumability is untouched: a run that backed off and then died resumes without losing rows."""
    store = Store(str(tmp_path / "store"))
    real = extractor_mod._commit_chunk
    commits = []

    def dies_after_first_chunk(store_, progress):
        real(store_, progress)
        commits.append(1)
        if len(commits) == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(extractor_mod, "_commit_chunk", dies_after_first_chunk)
    vlm = _vlm(4)
    _oom_above(vlm.model, 1, [])
    with pytest.raises(KeyboardInterrupt):
        extract_activations(samples, vlm, LAYERS, store, _cfg(), progress=False)
    monkeypatch.setattr(extractor_mod, "_commit_chunk", real)
    res = extract_activations(samples, vlm, LAYERS, store, _cfg(), progress=False)
    assert res.chunks_resumed == 1 and res.oom_halvings == 1  # the last chunk: 2 samples, halved once
    arrays, tokens = _outputs(store)
    assert tokens.equals(reference[1])
    for layer in LAYERS:
        np.testing.assert_array_equal(arrays[layer], reference[0][layer])


def test_auto_batch_size(monkeypatch):
    vlm = _vlm("auto")
    assert resolve_batch_size(vlm, LAYERS) == 8  # CPU: a fixed default
    assert resolve_batch_size(vlm, LAYERS, 3) == 3  # an explicit size wins
    assert resolve_batch_size(_vlm(5), LAYERS) == 5

    # CUDA: from the free memory, capped by model.auto_batch_max (memory query faked)
    cuda = LoadedVLM(vlm.model, vlm.processor, torch.device("cuda"), torch.bfloat16,
                     vlm.config.model_copy(update={"auto_batch_max": 64}))
    text = vlm.model.config.text_config
    per_sample = 2 * (6 * text.hidden_size + 3 * text.intermediate_size + 2 * text.hidden_size) * 2_900
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(10.5 * per_sample / 0.6), 0))
    assert auto_batch_size(cuda, LAYERS, 64) == 10
    assert auto_batch_size(cuda, LAYERS, 4) == 4
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1, 0))
    assert auto_batch_size(cuda, LAYERS, 64) == 1


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(MemoryError())
