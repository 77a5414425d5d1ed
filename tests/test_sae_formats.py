"""SAE files: our sparsify-layout round trip, sparsify <-> msae both ways, per-hookpoint repos
(local folder and the HF hub cache, offline), SAELens TopK mapping and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from msae.sae.formats import (SAEFormatError, load_pretrained, load_sae, read_metadata, resolve_pretrained,
                              save_sae)
from msae.sae.model import SparseCoder

torch.set_num_threads(1)


def _sae(arch="topk", d=16, n=48, k=5, seed=0) -> SparseCoder:
    sae = SparseCoder(d, n, k, arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g))
    return sae.eval()


def _x(d=16, n=40):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(9))


def _assert_same_tensors(a: SparseCoder, b: SparseCoder):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, arch):
    sae = _sae(arch)
    sae.threshold = 0.25
    save_sae(sae, tmp_path / "sae", {"activation_scale": 3.5, "train_tokens": 1000})
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "msae.json", "sae.safetensors"]
    back = load_sae(tmp_path / "sae")
    _assert_same_tensors(sae, back)
    assert (back.architecture, back.k, back.threshold) == (arch, 5, 0.25)
    meta = read_metadata(tmp_path / "sae")
    assert meta["activation_scale"] == 3.5 and meta["train_tokens"] == 1000
    with torch.no_grad():
        assert torch.equal(sae(_x()).reconstruction, back(_x()).reconstruction)


def test_cfg_json_has_sparsify_keys(tmp_path):
    save_sae(_sae(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg == {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True, "num_latents": 48,
                   "k": 5, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": 16}


def test_sparsify_loads_ours_and_we_load_sparsify(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    ours = _sae()
    save_sae(ours, tmp_path / "ours")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    x = _x()
    with torch.no_grad():
        a, b = ours.encode(x), theirs.encode(x)
        assert torch.equal(torch.sort(a.indices, 1).values, torch.sort(b.top_indices, 1).values)
        assert torch.allclose(ours.decode(a.values, a.indices), theirs.decode(b.top_acts, b.top_indices), atol=1e-6)
        for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"):
            assert torch.equal(ours.state_dict()[name], theirs.state_dict()[name])

    torch.manual_seed(0)
    native = sparsify.SparseCoder(16, sparsify.SparseCoderConfig(num_latents=40, k=6))
    with torch.no_grad():
        native.b_dec.normal_()
        native.encoder.bias.normal_(std=0.1)
    native.save_to_disk(tmp_path / "native")
    back = load_sae(tmp_path / "native")
    assert (back.d_in, back.num_latents, back.k, back.architecture) == (16, 40, 6, "topk")
    with torch.no_grad():
        assert torch.allclose(back(x).reconstruction, native(x).sae_out, atol=1e-6)
        assert torch.allclose(back(x).fvu, native(x).fvu, atol=1e-6)


def _repo(root: Path, hookpoints=("model.layers.1", "model.layers.2")) -> dict[str, SparseCoder]:
    saes = {}
    for i, hp in enumerate(hookpoints):
        saes[hp] = _sae(seed=i)
        save_sae(saes[hp], root / hp)
    return saes


def test_pretrained_from_a_local_folder_with_hookpoint_subfolders(tmp_path):
    saes = _repo(tmp_path / "repo")
    loaded = load_pretrained(str(tmp_path / "repo"), "model.layers.2")
    _assert_same_tensors(saes["model.layers.2"], loaded)
    # a folder that is itself one SAE
    _assert_same_tensors(saes["model.layers.1"], load_pretrained(str(tmp_path / "repo" / "model.layers.1")))
    with pytest.raises(SAEFormatError, match="model.layers.7.*model.layers.1"):
        load_pretrained(str(tmp_path / "repo"), "model.layers.7")


def test_pretrained_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """The hub code path, offline: a cache laid out as snapshot_download leaves it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    model_dir = cache / "models--lmms-lab--tiny-sae"
    (model_dir / "refs").mkdir(parents=True)
    (model_dir / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    saes = _repo(model_dir / "snapshots" / "0123456789abcdef0123456789abcdef01234567")
    folder = resolve_pretrained("lmms-lab/tiny-sae", "model.layers.2", cache_dir=str(cache), local_files_only=True)
    assert folder.name == "model.layers.2" and folder.parent.name.startswith("0123")
    loaded = load_pretrained("lmms-lab/tiny-sae", "model.layers.2", cache_dir=str(cache), local_files_only=True)
    _assert_same_tensors(saes["model.layers.2"], loaded)


def _saelens_folder(path: Path, cfg: dict, d=16, n=48, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"W_enc": torch.randn(d, n, generator=g) / 4, "W_dec": torch.randn(n, d, generator=g) / 4,
               "b_enc": torch.randn(n, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g)}
    path.mkdir(parents=True)
    save_file(tensors, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": n, **cfg}))
    return tensors


@pytest.mark.parametrize("cfg", [
    {"architecture": "topk", "k": 6, "apply_b_dec_to_input": True, "normalize_activations": "none"},
    {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6},
     "apply_b_dec_to_input": False},
])
def test_saelens_topk_maps_exactly(tmp_path, cfg):
    t = _saelens_folder(tmp_path / "lens", cfg)
    sae = load_sae(tmp_path / "lens")
    x = _x()
    # SAELens TopK: hidden = (x [- b_dec]) @ W_enc + b_enc; top-k then relu; x̂ = acts @ W_dec + b_dec
    x_in = x - t["b_dec"] if cfg["apply_b_dec_to_input"] else x
    hidden = x_in @ t["W_enc"] + t["b_enc"]
    v, i = hidden.topk(6, dim=-1)
    acts = torch.zeros_like(hidden).scatter(1, i, v.relu())
    expected = acts @ t["W_dec"] + t["b_dec"]
    with torch.no_grad():
        assert torch.allclose(sae(x).reconstruction, expected, atol=1e-5)


@pytest.mark.parametrize("cfg, match", [
    ({"architecture": "standard", "activation_fn_str": "relu"}, "not a TopK SAE"),
    ({"architecture": "jumprelu"}, "not a TopK SAE"),
    ({"architecture": "topk", "k": 4, "normalize_activations": "expected_average_only_in"}, "normalize_activations"),
])
def test_saelens_refusals_say_why(tmp_path, cfg, match):
    _saelens_folder(tmp_path / "lens", cfg)
    with pytest.raises(SAEFormatError, match=match):
        load_sae(tmp_path / "lens")


def test_unknown_folder_is_refused(tmp_path):
    with pytest.raises(SAEFormatError, match="neither sparsify"):
        load_sae(tmp_path)


def test_save_and_load_through_an_fsspec_url():
    sae = _sae("batchtopk")
    sae.threshold = 0.5
    save_sae(sae, "memory://msae-test/saes/layer=1/width=48", {"activation_scale": 2.0})
    back = load_sae("memory://msae-test/saes/layer=1/width=48")
    _assert_same_tensors(sae, back)
    assert back.threshold == 0.5
    assert read_metadata("memory://msae-test/saes/layer=1/width=48")["activation_scale"] == 2.0


def test_saelens_v6_rescale_flag_with_unit_decoder_loads_else_refuses(tmp_path):
    """SAELens v6 saves TopK SAEs with unit-norm decoder rows and the rescale flag still set."""
    cfg = {"architecture": "topk", "k": 6, "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True}
    t = _saelens_folder(tmp_path / "unit", cfg)
    from safetensors.torch import save_file

    unit = {**t, "W_dec": t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)}
    save_file({k: v.contiguous() for k, v in unit.items()}, str(tmp_path / "unit" / "sae_weights.safetensors"))
    sae = load_sae(tmp_path / "unit")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=1e-5)
    _saelens_folder(tmp_path / "scaled", cfg)  # random decoder norms: the rescale would matter
    with pytest.raises(SAEFormatError, match="rescale_acts_by_decoder_norm"):
        load_sae(tmp_path / "scaled")
