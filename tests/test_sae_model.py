"""SparseCoder: exact top-k, sparse decode = dense decode, gradients = dense autograd, FVU on a
known decomposition, unit-norm decoder rows, BatchTopK budget and threshold, exact scale folding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msae.sae.model import SparseCoder

torch.set_num_threads(1)


def _random_sae(d=16, n=64, k=4, arch="topk", seed=1) -> SparseCoder:
    sae = SparseCoder(d, n, k, arch, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.randn(n, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g))
    return sae


def _dense_reference(sae: SparseCoder, x: torch.Tensor, k: int):
    pre = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    v, i = pre.topk(k, dim=-1)
    return pre, torch.zeros_like(pre).scatter(1, i, v)


def test_encode_is_exact_topk_and_decode_matches_dense():
    sae = _random_sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vals, idx, pre = sae.encode(x, return_pre_acts=True)
        ref_pre, ref_code = _dense_reference(sae, x, 4)
        assert torch.equal(pre, ref_pre)
        assert vals.shape == idx.shape == (32, 4)
        code = torch.zeros_like(pre).scatter(1, idx, vals)
        assert torch.equal(code, ref_code)
        # the chosen ones are the k largest: every unchosen pre-activation is <= the smallest chosen
        unchosen = pre.scatter(1, idx, -1.0)
        assert bool((unchosen.max(1).values <= vals.min(1).values).all())
        recon = sae.decode(vals, idx)
        assert torch.allclose(recon, ref_code @ sae.W_dec + sae.b_dec, atol=1e-6)


def test_sparse_backward_equals_dense_autograd_including_auxk():
    sae = _random_sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    dead = torch.rand(64, generator=torch.Generator().manual_seed(3)) < 0.5
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    params = (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec)
    ours = [p.grad.clone() for p in params] + [x.grad.clone()]
    sae.zero_grad()
    x.grad = None

    pre, code = _dense_reference(sae, x, 4)
    recon = code @ sae.W_dec + sae.b_dec
    total = (x - x.mean(0)).pow(2).sum()
    err = x - recon
    fvu = err.pow(2).sum() / total
    k_aux = 16 // 2
    av, ai = torch.where(dead[None], pre, -torch.inf).topk(k_aux, dim=-1)
    e_hat = torch.zeros_like(pre).scatter(1, ai, av) @ sae.W_dec
    aux = min(int(dead.sum()) / k_aux, 1.0) * (e_hat - err.detach()).pow(2).sum() / total
    assert torch.allclose(out.fvu, fvu) and torch.allclose(out.auxk_loss, aux)
    (fvu + aux).backward()
    ref = [p.grad for p in params] + [x.grad]
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, atol=1e-6)


def test_fvu_on_a_known_decomposition():
    # 8 orthonormal directions in 16 dims; the SAE has the first 4 as latents (encoder = decoder).
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    dirs = q.T[:8]
    sae = SparseCoder(16, 4, 2)
    with torch.no_grad():
        sae.encoder.weight.copy_(dirs[:4])
        sae.W_dec.copy_(dirs[:4])
    g = torch.Generator().manual_seed(1)
    codes = torch.zeros(64, 8)
    for r in range(64):  # two of the first four directions, positive
        codes[r, torch.randperm(4, generator=g)[:2]] = torch.rand(2, generator=g) + 0.5
    explained = codes[:, :4] @ dirs[:4]
    with torch.no_grad():
        assert float(sae(explained).fvu) < 1e-10
        # add a component the SAE cannot represent: FVU = its share of the variance, exactly
        rest = torch.randn(64, 4, generator=g) @ dirs[4:]
        x = explained + rest
        total = (x - x.mean(0)).pow(2).sum()
        expected = rest.pow(2).sum() / total  # x̂ = explained exactly (rest ⟂ encoder rows)
        assert float(sae(x).fvu) == pytest.approx(float(expected), rel=1e-5)


def test_identity_sae_reconstructs_exactly():
    d = 12
    sae = SparseCoder(d, 2 * d, d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        x = torch.randn(20, d, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(sae(x).reconstruction, x, atol=1e-6)


def test_training_step_keeps_decoder_unit_norm_and_drops_parallel_gradient():
    sae = _random_sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        out = sae(x)
        out.fvu.backward()
        sae.remove_parallel_grad()
        parallel = (sae.W_dec.grad * sae.W_dec.detach()).sum(1)
        assert float(parallel.abs().max()) < 1e-6
        opt.step()
        opt.zero_grad()
        sae.normalize_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    sae = _random_sae(arch="batchtopk")
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    out = sae(x)  # training mode, grad enabled
    assert int((out.latent_acts > 0).sum()) == 4 * 32
    counts = (out.latent_acts > 0).sum(1)
    assert counts.min() != counts.max()  # per-token counts vary, unlike TopK
    assert sae.threshold > 0
    # inference: exactly the latents whose pre-activation reaches the threshold
    sae.eval()
    with torch.no_grad():
        vals, idx, pre = sae.encode(x, return_pre_acts=True)
        code = torch.zeros_like(pre).scatter(1, idx, vals)
        assert torch.equal(code > 0, pre >= sae.threshold)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_fold_input_scale_is_exact(arch):
    sae = _random_sae(arch=arch)
    sae.threshold = 0.3
    sae.eval()
    s = 7.5
    folded = sae.fold_input_scale(s)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = sae(x * s), folded(x)
        assert torch.allclose(a.reconstruction / s, b.reconstruction, atol=1e-5)
        assert torch.allclose(a.latent_acts / s, b.latent_acts, atol=1e-6)
        assert torch.equal(a.latent_indices, b.latent_indices)
        assert torch.allclose(folded.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_k_out_of_range_is_refused():
    with pytest.raises(ValueError, match="k must be"):
        SparseCoder(8, 16, 32)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_mixed_precision_step_keeps_fp32_gradients(arch):
    """The CUDA path trains under bf16 autocast; CPU autocast exercises the same dtype mixing."""
    sae = _random_sae(arch=arch)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x, dead_mask=torch.arange(64) % 2 == 0)
        loss = out.fvu + out.auxk_loss / 32
    assert out.latent_acts.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())
    assert float(out.fvu.detach()) < 2.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_backward_matches_cpu():
    sae = _random_sae()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = sae(x).reconstruction
        gpu = sae.to("cuda")(x.cuda()).reconstruction.cpu()
    assert torch.allclose(cpu, gpu, atol=1e-4)
    out = sae(x.cuda(), dead_mask=torch.ones(64, dtype=torch.bool, device="cuda"))
    (out.fvu + out.auxk_loss).backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in sae.parameters())


def test_sparse_decoder_gradients_match_embedding_bag_and_the_fallback(monkeypatch):
    """The decoder's custom backward equals embedding_bag's autograd, with the ATen op and without it."""
    from msae.sae.model import _SparseDecoder

    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    idx = torch.randint(0, 50, (37, 4), generator=g)
    v = torch.rand(37, 4, generator=g, requires_grad=True)
    grad = torch.randn(37, 16, generator=g)
    torch.nn.functional.embedding_bag(idx, w, mode="sum", per_sample_weights=v).backward(grad)
    want_v, want_w = v.grad.clone(), w.grad.clone()

    def ours():
        v.grad = w.grad = None
        _SparseDecoder.apply(v, idx, w).backward(grad)
        return v.grad.clone(), w.grad.clone()

    got_v, got_w = ours()
    assert torch.allclose(got_v, want_v, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-5)

    calls = []

    def missing(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("op not available in this build")

    monkeypatch.setattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", missing)
    got_v, got_w = ours()
    assert calls  # the fallback path really ran
    assert torch.allclose(got_v, want_v, atol=1e-5) and torch.allclose(got_w, want_w, atol=1e-5)
