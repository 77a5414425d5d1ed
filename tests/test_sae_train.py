"""Training, streaming, evaluation and loss-recovered, against planted features and known numbers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
import zarr

from msae.config import SAEConfig
from msae.sae import train as train_mod
from msae.sae.evaluate import evaluate_sae, heldout_rows, loss_recovered
from msae.sae.formats import load_sae, read_metadata, save_sae
from msae.sae.model import SparseCoder
from msae.sae.planted import feature_recovery, make_planted, modality_recovery, write_zarr
from msae.sae.stream import ActivationStream, heldout_mask, modality_mask
from msae.sae.train import train_rows, train_sae

torch.set_num_threads(1)


class CountingArray:
    """A zarr array that records the row ranges read (to check nothing reads the whole array)."""

    def __init__(self, arr):
        self.arr, self.reads = arr, []
        self.shape, self.chunks, self.dtype = arr.shape, arr.chunks, arr.dtype

    def __getitem__(self, key):
        self.reads.append((key.start, key.stop))
        return self.arr[key]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    data = make_planted(32_768, 64, 64, active=4, seed=0)
    arr = write_zarr(str(tmp_path_factory.mktemp("planted") / "layer=0.zarr"), data.activations, chunk_rows=2048)
    return data, arr


def _small_cfg(**kw) -> SAEConfig:
    base = dict(k=6, token_budget=300_000, batch_size=256, buffer_rows=8192, seed=0)
    return SAEConfig(**{**base, **kw})


def test_topk_recovers_planted_features_and_their_modality(planted):
    data, arr = planted
    res = train_sae(arr, data.tokens, _small_cfg(), 64, progress=False)
    rec = feature_recovery(res.model.W_dec.detach(), data.truth)
    assert rec.mean_max_cos >= 0.9, rec.mean_max_cos
    assert rec.fraction_above(0.9) >= 0.85
    mod = modality_recovery(res.model, data.activations, data.tokens, data.truth, rec)
    assert mod.mean_abs_error_mass < 0.1 and mod.label_accuracy >= 0.85, mod
    # the returned model takes raw activations: scale folded in, decoder rows unit-norm
    assert res.scale > 0 and torch.allclose(res.model.W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    assert res.log["fvu"][-1] < 0.3 and res.log["fvu"][-1] < res.log["fvu"][0]
    ev = evaluate_sae(res.model, arr, data.tokens, cfg=_small_cfg())
    assert ev.fvu < 0.3 and ev.n_image > 0 and ev.n_text > 0 and 5 < ev.l0 <= 6


def test_batchtopk_trains_and_keeps_its_threshold(planted, tmp_path):
    data, arr = planted
    res = train_sae(arr, data.tokens, _small_cfg(architecture="batchtopk", token_budget=150_000), 64,
                    progress=False)
    assert res.model.threshold > 0
    assert feature_recovery(res.model.W_dec.detach(), data.truth).mean_max_cos > 0.8
    save_sae(res.model, tmp_path / "sae", res.metadata())
    back = load_sae(tmp_path / "sae")
    assert back.architecture == "batchtopk" and back.threshold == res.model.threshold
    assert read_metadata(tmp_path / "sae")["activation_scale"] == res.scale


def test_resume_after_a_kill_ends_at_the_same_weights(planted, tmp_path, monkeypatch):
    data, arr = planted
    cfg = _small_cfg(token_budget=256 * 12, checkpoint_every=4, dead_after_tokens=256 * 2)
    full = train_sae(arr, data.tokens, cfg, 64, progress=False)

    real_lr_at = train_mod.lr_at

    def killing_lr_at(step, *a):
        if step == 6:
            raise KeyboardInterrupt("killed in the middle of step 6")
        return real_lr_at(step, *a)

    monkeypatch.setattr(train_mod, "lr_at", killing_lr_at)
    with pytest.raises(KeyboardInterrupt):
        train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert (tmp_path / "ckpt" / "LATEST").read_text() == "step-000000004"
    monkeypatch.setattr(train_mod, "lr_at", real_lr_at)
    resumed = train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert resumed.resumed_from_step == 4 and resumed.n_steps == 12
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.log["step"].to_list() == full.log["step"].to_list()
    # a finished run's checkpoint short-circuits a rerun
    again = train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt"), progress=False)
    assert again.resumed_from_step == 12
    assert torch.equal(again.model.W_dec, full.model.W_dec)
    # nor does other data of the same shape (activations re-extracted from retrained weights)
    with pytest.warns(UserWarning, match="ignoring checkpoint"):
        fresh = train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt-data"), progress=False,
                          data_version="v1", max_steps=4)
        assert train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt-data"), progress=False,
                         data_version="v1").resumed_from_step == 4
        moved = train_sae(arr, data.tokens, cfg, 64, checkpoint_dir=str(tmp_path / "ckpt-data"), progress=False,
                          data_version="v2", max_steps=1)
    assert fresh.resumed_from_step == 0 and moved.resumed_from_step == 0
    # another config does not resume from it
    with pytest.warns(UserWarning, match="ignoring checkpoint"):
        other = train_sae(arr, data.tokens, cfg.model_copy(update={"k": 5}), 64,
                          checkpoint_dir=str(tmp_path / "ckpt"), progress=False, max_steps=1)
    assert other.resumed_from_step == 0


def test_row_selection_and_sample_split(planted):
    data, _ = planted
    tok = data.tokens
    cfg = _small_cfg(eval_fraction=0.2)
    held = heldout_mask(tok, 0.2, seed=0)
    held_samples = set(tok.filter(pl.Series(held))["sample_id"])
    train_samples = set(tok.filter(pl.Series(~held))["sample_id"])
    assert held_samples and not held_samples & train_samples
    assert 0.1 < len(held_samples) / tok["sample_id"].n_unique() < 0.3
    assert np.array_equal(held, heldout_mask(tok.reverse(), 0.2, seed=0)[::-1])  # order-independent
    rows = train_rows(tok, cfg)
    picked = tok[rows]
    assert set(picked["modality"]) == {"image", "text"} and "template" not in set(picked["role"])
    assert not set(picked["sample_id"]) & held_samples
    img = train_rows(tok, cfg.model_copy(update={"train_on": "image"}))
    assert set(tok[img]["modality"]) == {"image"}
    ev_rows = heldout_rows(tok, cfg)
    assert set(tok[ev_rows]["sample_id"]) <= held_samples and set(tok[ev_rows]["modality"]) == {"image", "text"}
    assert modality_mask(tok, "both", include_special=True, include_template=True).sum() == tok.height


def test_stream_is_shuffled_bounded_deterministic_and_resumable(planted):
    data, arr = planted
    counting = CountingArray(arr)
    rows = np.flatnonzero(modality_mask(data.tokens, "text"))
    stream = ActivationStream(counting, rows, batch_size=100, buffer_rows=4096, seed=3, prefetch=False)
    per_epoch = stream.batches_per_epoch(0)
    it = stream.batches()
    first = [next(it) for _ in range(per_epoch)]
    it.close()
    # every read is one zarr chunk; nothing near the whole array at once
    assert all(stop - start <= arr.chunks[0] for start, stop in counting.reads)
    epoch = torch.cat(first).numpy()
    expected = data.activations[rows].astype(np.float32)
    # no row twice within an epoch, nearly all rows used, all of them selected rows
    uniq = np.unique(epoch, axis=0)
    assert len(uniq) == len(epoch) >= 0.9 * len(rows)
    expected_uniq = np.unique(expected, axis=0)
    assert len(np.unique(np.concatenate([uniq, expected_uniq]), axis=0)) == len(expected_uniq)
    # shuffled across chunks: the first batch mixes rows from several samples far apart
    assert not np.array_equal(epoch[:100], expected[:100])
    again = ActivationStream(arr, rows, batch_size=100, buffer_rows=4096, seed=3, prefetch=True).batches(0)
    assert all(torch.equal(next(again), b) for b in first)
    resumed = ActivationStream(arr, rows, batch_size=100, buffer_rows=4096, seed=3).batches(per_epoch - 3)
    assert all(torch.equal(next(resumed), b) for b in first[-3:])
    nxt = next(resumed)  # into epoch 1: a new order
    assert not torch.equal(nxt, first[0])


def _toy_table(n_rows: int) -> pl.DataFrame:
    mod = np.where(np.arange(n_rows) % 3 == 0, "image", "text")
    return pl.DataFrame({"sample_id": [f"s{i // 10}" for i in range(n_rows)], "position": np.arange(n_rows) % 10,
                         "modality": mod, "role": ["question"] * n_rows})


def test_evaluate_numbers_on_known_saes():
    d, n_rows = 8, 600
    x = np.random.default_rng(0).standard_normal((n_rows, d)).astype(np.float32) + 0.5
    tok = _toy_table(n_rows)
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(128, d), dtype="float32")
    arr[:] = x
    rows = np.arange(n_rows)
    identity = SparseCoder(d, 2 * d, d)
    zero = SparseCoder(d, 2 * d, 1)
    eye = torch.eye(d)
    with torch.no_grad():
        identity.encoder.weight.copy_(torch.cat([eye, -eye]))
        identity.W_dec.copy_(torch.cat([eye, -eye]))
        for p in zero.parameters():
            p.zero_()
    ev = evaluate_sae(identity, arr, tok, rows, batch_size=64)
    assert ev.fvu < 1e-10 and ev.fvu_image < 1e-10 and ev.dead_fraction == 0.0 and ev.dense_fraction == 1.0
    assert ev.l0 == pytest.approx(d, abs=1e-9)
    ev0 = evaluate_sae(zero, arr, tok, rows, batch_size=64)

    def fvu_of_zero(sub):  # x̂ = 0: FVU = Σ||x||² / Σ||x - mean||²
        return (sub ** 2).sum() / ((sub - sub.mean(0)) ** 2).sum()

    img = tok["modality"].to_numpy() == "image"
    assert ev0.fvu == pytest.approx(fvu_of_zero(x.astype(np.float64)), rel=1e-9)
    assert ev0.fvu_image == pytest.approx(fvu_of_zero(x[img].astype(np.float64)), rel=1e-9)
    assert ev0.fvu_text == pytest.approx(fvu_of_zero(x[~img].astype(np.float64)), rel=1e-9)
    assert (ev0.n_image, ev0.n_text, ev0.dead_fraction, ev0.l0) == (200, 400, 1.0, 0.0)


def test_loss_recovered_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = 32
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=d, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    identity = SparseCoder(d, 2 * d, d)
    eye = torch.eye(d)
    zero = SparseCoder(d, 2 * d, 1)
    with torch.no_grad():
        identity.encoder.weight.copy_(torch.cat([eye, -eye]))
        identity.W_dec.copy_(torch.cat([eye, -eye]))
        for p in zero.parameters():
            p.zero_()
    perfect = loss_recovered(model, {"input_ids": ids, "attention_mask": mask}, 1, identity.eval())
    assert perfect.zero_ablated != pytest.approx(perfect.clean, abs=1e-3)
    assert perfect.with_sae == pytest.approx(perfect.clean, abs=1e-5)
    assert perfect.recovered == pytest.approx(1.0, abs=1e-3)
    useless = loss_recovered(model, {"input_ids": ids, "attention_mask": mask}, 1, zero.eval())
    assert useless.recovered == pytest.approx(0.0, abs=1e-6)
    assert useless.clean == pytest.approx(perfect.clean)


def test_loss_recovered_on_a_tiny_llava_next():
    """The VLM path: pixel_values + image_sizes, and the language model's layers, not the vision tower's."""
    from PIL import Image

    from msae.sae.evaluate import decoder_layers
    from msae.vlm.build import IMAGE, VLMGeometry, build_llava_next, build_word_tokenizer
    from msae.world.shapes import VOCABULARY

    geometry = VLMGeometry(vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=2, text_heads=2,
                           text_intermediate=64)
    model, processor = build_llava_next(build_word_tokenizer(VOCABULARY), geometry, seed=0)
    assert decoder_layers(model) is model.model.language_model.layers
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    inputs = processor(images=[image], text=[f"{IMAGE} " + " ".join(list(VOCABULARY)[:6])], return_tensors="pt")
    d = 32
    identity = SparseCoder(d, 2 * d, d)
    with torch.no_grad():
        identity.encoder.weight.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
        identity.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)]))
    out = loss_recovered(model, dict(inputs), 1, identity.eval())
    assert out.with_sae == pytest.approx(out.clean, abs=1e-5) and out.zero_ablated != pytest.approx(out.clean)


def test_progress_lines_leave_training_bitwise_unchanged(planted):
    """The SAE asset's progress lines: one per tenth of the steps with the latest logged FVU, and
    the same weights as training without them."""
    data, arr = planted
    cfg = _small_cfg(token_budget=51_200)  # 200 steps
    quiet = train_sae(arr, data.tokens, cfg, 64, progress=False)
    lines: list[str] = []
    loud = train_sae(arr, data.tokens, cfg, 64, progress=False, report=lines.append)
    assert torch.equal(loud.model.W_dec, quiet.model.W_dec) and torch.equal(loud.model.b_dec, quiet.model.b_dec)
    assert len(lines) == 10 and lines[-1].startswith("SAE width 64: step 200/200 (100 %)")
    assert lines[0].startswith("SAE width 64: step 20/200 (10 %)") and "fvu " in lines[-1]


def test_progress_report_boundaries_and_resume():
    from msae.runtime import ProgressReport

    clock = iter(range(100)).__next__
    out: list[str] = []
    rep = ProgressReport(out.append, "x", 50, start=22, every=0.25, clock=lambda: float(clock()))
    for done in range(23, 51):
        rep.update(done)
    # resumed at 22 of 50: boundaries 25, 37.5 -> 38, 50; elapsed counts from the resume
    assert [line.split(",")[0] for line in out] == ["x 25/50 (50 %)", "x 38/50 (76 %)", "x 50/50 (100 %)"]
    assert out[0] == "x 25/50 (50 %), 1 s, ~8 s left"
    with pytest.raises(ValueError, match="every"):
        ProgressReport(out.append, "x", 10, every=0)
