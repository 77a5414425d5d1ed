"""Residual hooks, batched resumable extraction, bad inputs, fsspec stores (tiny random models)."""

from __future__ import annotations

import uuid

import numpy as np
import polars as pl
import pytest
import torch
import zarr
from PIL import Image

import msae.extract.extractor as extractor_mod
from msae.config import ExtractionConfig
from msae.extract import ExtractionError, capture_residual, extract_activations, find_decoder_layers
from msae.extract.writer import ActivationWriter, read_activations, to_float32
from msae.store import Store
from msae.vlm.build import VLMGeometry, build_llava_next, build_word_tokenizer
from msae.vlm.load import LoadedVLM
from msae.world.shapes import VOCABULARY

GEOM = VLMGeometry(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=4, text_heads=2,
                   text_intermediate=64)
QUESTIONS = ["what color is the circle ?", "how many objects are there ?", "is the square left of the cross ?"]
ANSWERS = ["red", "three", "yes"]


@pytest.fixture(scope="module")
def vlm() -> LoadedVLM:
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), GEOM, seed=0)
    return LoadedVLM(model.eval().requires_grad_(False), processor, torch.device("cpu"), torch.float32)


def _img(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def _samples(tmp_path, n: int = 10, images: list | None = None) -> pl.DataFrame:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        if images is not None:
            path = images[i]
        else:
            path = folder / f"s{i}.png"
            _img(40 + 7 * i, 64 + 5 * (i % 3), seed=i).save(path)
        rows.append({"sample_id": f"s{i}", "image": None if path is None else str(path), "question": QUESTIONS[i % 3],
                     "answer": ANSWERS[i % 3], "source_index": i})
    return pl.DataFrame(rows)


def _cfg(**kw) -> ExtractionConfig:
    return ExtractionConfig(**{"chunk_samples": 4, "rows_per_zarr_chunk": 64, **kw})


def _arrays(store: Store, layers) -> dict[int, np.ndarray]:
    return {
        layer: zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True), mode="r")[:]
        for layer in layers
    }


def _tokens(store: Store) -> pl.DataFrame:
    return store.read_parquet(store.TOKENS)


# --- hooks ---------------------------------------------------------------------------------------


def _inputs(vlm: LoadedVLM, seed: int = 0) -> dict:
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle ?"}]}],
        add_generation_prompt=True,
    )
    return dict(vlm.processor(images=[_img(50, 70, seed)], text=[text], return_tensors="pt"))


def test_hooks_match_output_hidden_states_and_stop_early(vlm):
    model = vlm.model
    inputs = _inputs(vlm)
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True).hidden_states
    layers = find_decoder_layers(model)
    assert len(layers) == GEOM.text_layers
    installed = [set(layer._forward_hooks) for layer in layers]  # transformers' own, if any

    calls: dict[str, int] = {}

    def counter(name):
        def hook(*_):
            calls[name] = calls.get(name, 0) + 1
        return hook

    handles = [layers[i].register_forward_hook(counter(f"layer{i}")) for i in range(len(layers))]
    handles.append(model.lm_head.register_forward_hook(counter("lm_head")))
    try:
        with torch.no_grad(), capture_residual(model, [0, 2]) as cap:
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert cap.stopped
    for layer in (0, 2):
        torch.testing.assert_close(cap.outputs[layer], ref[layer + 1], rtol=0, atol=0)
    assert calls == {"layer0": 1, "layer1": 1, "layer2": 1}  # layer 3 and the LM head never ran
    # our hooks are gone and the model still runs end to end
    assert [set(layer._forward_hooks) for layer in layers] == installed
    with torch.no_grad():
        again = model(**inputs, output_hidden_states=True).hidden_states
    torch.testing.assert_close(again[3], ref[3], rtol=0, atol=0)


def test_hooks_removed_on_error_and_layer_validation(vlm):
    model = vlm.model
    layers = find_decoder_layers(model)
    installed = [set(layer._forward_hooks) for layer in layers]
    with pytest.raises(ValueError, match="layers"):
        capture_residual(model, [0, 9])
    with pytest.raises(RuntimeError, match="boom"):
        with capture_residual(model, [1]):
            raise RuntimeError("boom")
    assert [set(layer._forward_hooks) for layer in layers] == installed


# --- extraction -----------------------------------------------------------------------------------


def test_extract_end_to_end_and_reuse(vlm, tmp_path, monkeypatch):
    samples = _samples(tmp_path, 10)
    store = Store(str(tmp_path / "store"))
    res = extract_activations(samples, vlm, [2, 0], store, _cfg(), progress=False, batch_size=3)
    assert res.layers == [0, 2] and not res.reused
    assert res.samples_done == 10 and res.samples_skipped == {}
    tokens = _tokens(store)
    arrays = _arrays(store, [0, 2])
    for a in arrays.values():
        assert a.shape == (tokens.height, GEOM.text_hidden) and a.dtype == np.float16
        assert np.isfinite(a).all()
    assert res.n_tokens == tokens.height
    assert res.tokens_by_modality == {k: v for k, v in tokens["modality"].value_counts().iter_rows()}
    assert res.bytes_written > 0 and res.tokens_per_s > 0
    assert not store.exists("_progress/tokens")

    # rows: samples in order, each sample's positions 0..n-1 with n = the processor's sequence length
    assert tokens["sample_id"].unique(maintain_order=True).to_list() == [f"s{i}" for i in range(10)]
    for (sid,), g in tokens.group_by("sample_id", maintain_order=True):
        i = int(sid[1:])
        row = samples.row(i, named=True)
        text = vlm.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
             {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
        )
        ids = vlm.processor(images=[Image.open(row["image"])], text=[text])["input_ids"][0]
        assert g["position"].to_list() == list(range(len(ids)))
        assert g["token_id"].to_list() == list(ids)
        assert g.filter(pl.col("view") == "base").height == 64  # 8×8 base grid

    # values: a sample from a padded batch equals its own unbatched forward (fp16 storage)
    sid = "s4"
    rows = tokens.with_row_index().filter(pl.col("sample_id") == sid)["index"].to_numpy()
    row = samples.row(4, named=True)
    text = vlm.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["question"]}]},
         {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}],
    )
    with torch.no_grad():
        hs = vlm.model(**vlm.processor(images=[Image.open(row["image"])], text=[text], return_tensors="pt"),
                       output_hidden_states=True).hidden_states
    for layer in (0, 2):
        np.testing.assert_allclose(arrays[layer][rows].astype(np.float32), hs[layer + 1][0].numpy(),
                                   atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(read_activations(store, 2, slice(0, 5)), torch.from_numpy(arrays[2][:5]))

    # same inputs again: nothing is recomputed
    def no_forward(*a, **k):
        raise AssertionError("the model ran although everything was extracted")

    monkeypatch.setattr(vlm.model, "forward", no_forward)
    again = extract_activations(samples, vlm, [0, 2], store, _cfg(), progress=False, batch_size=3)
    assert again.reused and again.n_tokens == res.n_tokens and again.samples_done == 10
    assert again.summary()["reused"] is True
    assert again.layer_summary(2)["rows"] == tokens.height
    monkeypatch.undo()

    # another fingerprint (layers) starts over and clears the old arrays
    other = extract_activations(samples, vlm, [1], store, _cfg(), progress=False, batch_size=3)
    assert not other.reused and other.n_tokens == res.n_tokens
    assert not store.exists(store.activations_name(0))


def test_layers_are_validated(vlm, tmp_path):
    samples = _samples(tmp_path, 2)
    with pytest.raises(ValueError, match="layers"):
        extract_activations(samples, vlm, [4], Store(str(tmp_path / "s")), _cfg(), progress=False)
    with pytest.raises(ValueError, match="layers"):
        extract_activations(samples, vlm, [], Store(str(tmp_path / "s")), _cfg(), progress=False)


@pytest.mark.parametrize("crash", ["commit", "append"])
def test_resume_after_crash_is_bitwise_identical(vlm, tmp_path, monkeypatch, crash):
    samples = _samples(tmp_path, 10)
    cfg = _cfg()
    clean = Store(str(tmp_path / "clean"))
    extract_activations(samples, vlm, [0, 3], clean, cfg, progress=False, batch_size=3)

    store = Store(str(tmp_path / "crashed"))

    class Crash(Exception):
        pass

    if crash == "commit":  # chunk 1's rows and token part written, its progress record not
        real = extractor_mod._commit_chunk
        calls = {"n": 0}

        def failing(store_, state):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash
            real(store_, state)

        monkeypatch.setattr(extractor_mod, "_commit_chunk", failing)
    else:  # mid-chunk: the 2nd batch of chunk 1 is never appended, the 1st is
        real_append = ActivationWriter.append
        calls = {"n": 0}

        def failing_append(self, rows):
            calls["n"] += 1
            if calls["n"] == 4:  # chunk 0 = 2 batches, chunk 1 = batch 3, then crash
                self.flush()
                raise Crash
            real_append(self, rows)

        monkeypatch.setattr(ActivationWriter, "append", failing_append)
    with pytest.raises(Crash):
        extract_activations(samples, vlm, [0, 3], store, cfg, progress=False, batch_size=3)
    monkeypatch.undo()

    state = store.read_json("_progress/extraction.json")
    assert list(state["chunks"]) == ["0"]
    partial = _arrays(store, [0])[0].shape[0]
    assert partial > state["n_rows"]  # rows beyond the committed offset exist and must be cut

    res = extract_activations(samples, vlm, [0, 3], store, cfg, progress=False, batch_size=3)
    assert res.chunks_resumed == 1 and res.samples_done == 10
    a, b = _arrays(clean, [0, 3]), _arrays(store, [0, 3])
    for layer in (0, 3):
        assert a[layer].shape == b[layer].shape
        assert np.array_equal(a[layer].view(np.uint16), b[layer].view(np.uint16))
    assert _tokens(clean).equals(_tokens(store))


def test_bad_images_are_skipped_and_converted(vlm, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    good_modes = {"grey": "L", "rgba": "RGBA", "palette": "P", "cmyk": "CMYK", "la": "LA"}
    for name, mode in good_modes.items():
        img = _img(48, 40, seed=len(paths), mode=mode)
        fmt, ext = ("JPEG", "jpg") if mode == "CMYK" else ("PNG", "png")
        p = folder / f"{name}.{ext}"
        img.save(p, format=fmt)
        paths.append(p)
    i16 = folder / "i16.png"
    Image.fromarray((np.arange(40 * 48).reshape(40, 48) * 20).astype(np.uint16)).save(i16)
    paths.append(i16)
    missing = folder / "nope.png"
    paths.append(missing)
    trunc = folder / "trunc.png"
    _img(64, 64, seed=9).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    paths.append(trunc)
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    paths.append(empty)
    notimg = folder / "text.png"
    notimg.write_text("hello")
    paths.append(notimg)

    paths.append(None)  # a text-only sample is extracted without image tokens

    samples = _samples(tmp_path, len(paths), images=paths)
    store = Store(str(tmp_path / "store"))
    res = extract_activations(samples, vlm, [1], store, _cfg(), progress=False, batch_size=4)
    assert res.samples_done == 7
    assert res.samples_skipped == {
        "missing_image": 1, "truncated_image": 1, "empty_image": 1, "unreadable_image": 1
    }
    tokens = _tokens(store)
    assert set(tokens["sample_id"].unique()) == {f"s{i}" for i in range(6)} | {f"s{len(paths) - 1}"}
    assert tokens.filter((pl.col("sample_id") == f"s{len(paths) - 1}") & (pl.col("modality") == "image")).height == 0
    assert "nope.png" in " ".join(res.skip_examples["missing_image"])

    bad = _samples(tmp_path, 3, images=[missing, trunc, empty])
    with pytest.raises(ExtractionError, match="missing_image=1.*truncated_image=1"):
        extract_activations(bad, vlm, [1], Store(str(tmp_path / "bad")), _cfg(), progress=False)


def test_processor_failure_is_skipped(vlm, tmp_path, monkeypatch):
    samples = _samples(tmp_path, 4)
    real = vlm.processor.__class__.__call__

    def flaky(self, *a, text=None, **k):
        if text and "left" in text[0]:
            raise ValueError("processor says no")
        return real(self, *a, text=text, **k)

    monkeypatch.setattr(vlm.processor.__class__, "__call__", flaky)
    res = extract_activations(samples, vlm, [0], Store(str(tmp_path / "s")), _cfg(), progress=False)
    assert res.samples_skipped == {"processor_error": 1} and res.samples_done == 3


def test_memory_store(vlm, tmp_path):
    samples = _samples(tmp_path, 5)
    store = Store(f"memory://msae-{uuid.uuid4().hex}/run")
    res = extract_activations(samples, vlm, [0, 1], store, _cfg(chunk_samples=2), progress=False, batch_size=2)
    tokens = _tokens(store)
    assert tokens.height == res.n_tokens > 0
    for a in _arrays(store, [0, 1]).values():
        assert a.shape == (tokens.height, GEOM.text_hidden)
    again = extract_activations(samples, vlm, [0, 1], store, _cfg(chunk_samples=2), progress=False)
    assert again.reused
    store.rm("")


def test_bfloat16_storage_and_max_length(vlm, tmp_path):
    samples = _samples(tmp_path, 3)
    store = Store(str(tmp_path / "bf"))
    res = extract_activations(samples, vlm, [0], store, _cfg(store_dtype="bfloat16", max_length=10),
                              progress=False)
    t = read_activations(store, 0)
    assert t.dtype == torch.bfloat16 and t.shape[0] == res.n_tokens
    raw = zarr.open_array(store=store.zarr_store(store.activations_name(0), read_only=True), mode="r")
    np.testing.assert_array_equal(to_float32(raw[:], raw.attrs["msae_dtype"]), t.float().numpy())
    tokens = _tokens(store)
    # max_length cuts text after the image but never the image tokens
    full = Store(str(tmp_path / "full"))
    extract_activations(samples, vlm, [0], full, _cfg(), progress=False)
    img_count = pl.col("modality") == "image"
    per = tokens.group_by("sample_id").agg(pl.len(), img_count.sum().alias("img")).sort("sample_id")
    per_full = _tokens(full).group_by("sample_id").agg(pl.len(), img_count.sum().alias("img")).sort("sample_id")
    assert per["img"].to_list() == per_full["img"].to_list()
    assert (per["len"] < per_full["len"]).all()
    last_img = tokens.filter(pl.col("modality") == "image").group_by("sample_id").agg(pl.col("position").max())
    assert (per.join(last_img, on="sample_id").select(pl.col("len") == pl.max_horizontal(10, pl.col("position") + 1))
            .to_series().all())


# --- loading ---------------------------------------------------------------------------------------


def test_load_vlm_from_folder_and_wrong_checkpoint(tiny_vlm_dir, tmp_path):
    from transformers import LlamaConfig

    from msae.config import ModelConfig
    from msae.vlm.load import ModelLoadError, load_vlm

    cfg = ModelConfig(name_or_path=str(tiny_vlm_dir), device="cpu", dtype="auto", local_files_only=True,
                      batch_size=2)
    loaded = load_vlm(cfg)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.batch_size == 2 and loaded.name_or_path == str(tiny_vlm_dir)
    assert len(find_decoder_layers(loaded.model)) == 3

    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(llama)
    with pytest.raises(ModelLoadError, match="model.name_or_path.*'llama'"):
        load_vlm(ModelConfig(name_or_path=str(llama), device="cpu", local_files_only=True))
    with pytest.raises(ModelLoadError, match="model.name_or_path"):
        load_vlm(ModelConfig(name_or_path=str(tmp_path / "missing"), device="cpu", local_files_only=True))
