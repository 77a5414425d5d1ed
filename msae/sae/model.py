"""A small, readable sparse autoencoder: TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024).

Shapes: ``x`` is ``[batch, d_in]``; the code is sparse, returned as ``(values, indices)`` of shape
``[batch, k]`` (TopK) or ``[batch, k_max]`` padded with zeros (BatchTopK).

The parameters carry EleutherAI sparsify's names so its on-disk layout is a plain state dict
(see :mod:`msae.sae.formats`)::

    encoder.weight [num_latents, d_in]   encoder.bias [num_latents]
    W_dec          [num_latents, d_in]   b_dec        [d_in]

Encoding: ``pre = relu(encoder(x - b_dec))`` then

* ``topk``: the k largest entries of each row;
* ``batchtopk`` at train time: the ``k * batch`` largest entries of the whole batch (a token may get
  more or fewer than k); the smallest selected value of each batch feeds an exponential moving
  average, ``threshold``. At inference (``model.eval()``) every latent with ``pre >= threshold`` is
  active — the per-token rule BatchTopK is meant to approximate (Bussmann et al. 2024 §3), which
  keeps a token's code independent of the rest of its batch. Until a threshold has been estimated
  (``threshold == 0``) inference falls back to per-token top-k.

Decoding never builds a dense ``[batch, num_latents]`` matrix: it is one ``F.embedding_bag`` over
the active rows of ``W_dec``. The encoder's backward is likewise sparse (:class:`_SparseEncoder`):
only the selected latents receive gradient, so the weight gradient is a sparse ``[num_latents,
batch]`` (``batch * k`` non-zeros) times ``[batch, d_in]`` product instead of a dense matmul; the
decoder's weight gradient is the same kind of product (:class:`_SparseDecoder`). The encoder's
forward stays one dense matmul: every pre-activation is needed to pick the top k.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Architecture = Literal["topk", "batchtopk"]


class EncoderOutput(NamedTuple):
    values: Tensor
    """Activations of the selected latents, ``[batch, k]`` (zeros pad BatchTopK rows)."""
    indices: Tensor
    """Their latent ids, ``[batch, k]`` (int64)."""
    pre_acts: Tensor | None
    """``relu(encoder(x - b_dec))``, ``[batch, num_latents]``; only when asked for (AuxK needs it)."""


class ForwardOutput(NamedTuple):
    latent_acts: Tensor
    latent_indices: Tensor
    reconstruction: Tensor
    fvu: Tensor
    """sum ||x - x̂||² / sum ||x - mean(x)||² over the batch (scalar)."""
    auxk_loss: Tensor
    """AuxK loss (scalar; 0 when no dead mask is given or no latent is dead)."""


def _sparse_t_mm(indices: Tensor, values: Tensor, dense: Tensor, num_rows: int) -> Tensor:
    """``Sᵀ · dense`` for the sparse ``[batch, num_rows]`` matrix ``S[b, indices[b, j]] = values[b, j]``:
    row ``r`` of the result sums ``values[b, j] * dense[b]`` over the slots with ``indices[b, j] == r``.
    One sparse-dense matmul, ``[num_rows, d]``."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
    s_t = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), values.reshape(-1),
                                  (num_rows, batch), check_invariants=False)
    return torch.sparse.mm(s_t, dense)


class _SparseEncoder(torch.autograd.Function):
    """Selected pre-activations ``relu(W[idx] · x_in + b[idx])`` with a sparse backward.

    The forward receives the values already computed (without grad) during selection and only
    returns them; the backward touches just the ``batch * k`` selected encoder rows: the weight
    gradient is a sparse-dense matmul ``Gᵀ x_in`` and the input gradient an ``embedding_bag`` of
    the selected rows, instead of two dense matmuls with ``[batch, num_latents]`` operands.
    """

    @staticmethod
    def forward(ctx, x_in: Tensor, weight: Tensor, bias: Tensor, values: Tensor, indices: Tensor):
        ctx.save_for_backward(x_in, weight, indices, values > 0)
        return values.clone()

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x_in, weight, indices, positive = ctx.saved_tensors
        g = grad_values * positive  # relu (and BatchTopK's masked slots): no gradient at 0
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, mode="sum", per_sample_weights=g.to(weight.dtype))
            grad_x = grad_x.to(x_in.dtype)
        if ctx.needs_input_grad[1]:
            # grad_W = Gᵀ x_in with G the sparse [batch, num_latents] gradient: one sparse-dense
            # matmul (about 10x faster on CPU than materialising the [batch·k, d_in] products).
            grad_w = _sparse_t_mm(indices, g.to(weight.dtype), x_in.to(weight.dtype), weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, indices.reshape(-1), g.reshape(-1).to(weight.dtype))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecoder(torch.autograd.Function):
    """``sum_j values[:, j] * weight[indices[:, j]]`` (one ``embedding_bag``) with a sparse weight gradient.

    ``embedding_bag``'s own backward sorts the ``batch * k`` indices and accumulates the weight
    gradient slot by slot (on CPU about 2x the time of one sparse-dense matmul at k = 64, the AuxK
    pass); here it is ``Sᵀ grad`` like the encoder's. The gradient of ``values`` is the one
    ``embedding_bag``'s autograd computes, by the same ATen op.
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, weight: Tensor):
        ctx.save_for_backward(values, indices, weight)
        return F.embedding_bag(indices, weight, mode="sum", per_sample_weights=values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, indices, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            batch, k = indices.shape
            offsets = torch.arange(0, batch * k, k, device=indices.device)
            bag_of_slot = torch.arange(batch, device=indices.device).repeat_interleave(k)
            try:  # the op embedding_bag's own autograd uses (ATen-internal: guarded below)
                grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    grad, weight, indices.reshape(-1), offsets, bag_of_slot, 0, -1)  # mode 0: sum
            except (AttributeError, RuntimeError):  # not in this torch build: the same dot products, chunked
                grad_values = torch.cat([(weight[indices[i:i + 256]] * grad[i:i + 256, None]).sum(-1).reshape(-1)
                                         for i in range(0, batch, 256)])
            grad_values = grad_values.view(batch, k).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = _sparse_t_mm(indices, values.to(weight.dtype), grad, weight.shape[0])
        return grad_values, None, grad_w


class SparseCoder(nn.Module):
    """TopK / BatchTopK sparse autoencoder with unit-norm decoder rows and a pre-encoder bias."""

    def __init__(
        self,
        d_in: int,
        num_latents: int,
        k: int,
        architecture: Architecture = "topk",
        *,
        seed: int = 0,
        init: bool = True,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        """``init=False`` leaves the weights uninitialised (for loading; use ``device="meta"``)."""
        super().__init__()
        if architecture not in ("topk", "batchtopk"):
            raise ValueError(f"architecture must be 'topk' or 'batchtopk', got {architecture!r}")
        if not 0 < k <= num_latents:
            raise ValueError(f"k must be in [1, num_latents={num_latents}], got {k}")
        self.d_in, self.num_latents, self.k, self.architecture = d_in, num_latents, k, architecture
        # skip_init: no throw-away default init (it would also draw from the global RNG)
        self.encoder = torch.nn.utils.skip_init(nn.Linear, d_in, num_latents, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(num_latents, d_in, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        # BatchTopK inference threshold (a plain attribute, saved in msae.json: sparsify's loader
        # is strict about the tensors in sae.safetensors).
        self.threshold: float = 0.0
        self.threshold_momentum = 0.01
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Gao et al.: encoder = decoderᵀ at init, decoder rows unit-norm, biases zero."""
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.d_in)
        w = torch.empty(self.num_latents, self.d_in).uniform_(-bound, bound, generator=gen)
        self.encoder.weight.copy_(w)
        self.encoder.bias.zero_()
        self.W_dec.copy_(w)
        self.b_dec.zero_()
        self.normalize_decoder()

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold:.4g}" if self.architecture == "batchtopk" else ""
        return f"d_in={self.d_in}, num_latents={self.num_latents}, k={self.k}, architecture={self.architecture}{extra}"

    # --- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # --- encode / decode --------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """``relu(encoder(x - b_dec))``, dense ``[batch, num_latents]``."""
        return F.relu(F.linear(x.to(self.dtype) - self.b_dec, self.encoder.weight, self.encoder.bias))

    def encode(self, x: Tensor, *, return_pre_acts: bool = False) -> EncoderOutput:
        """Sparse code of ``x``: ``(values, indices[, pre_acts])``; differentiable in ``values``.

        ``x`` is cast to the model's dtype (under CUDA autocast the matmul then runs in bf16)."""
        x = x.to(self.dtype)
        x_in = x - self.b_dec
        grad = torch.is_grad_enabled()
        with torch.no_grad():
            pre = F.relu(F.linear(x_in, self.encoder.weight, self.encoder.bias))
            values, indices = self._select(pre, update_threshold=grad)
        if grad:
            values = _SparseEncoder.apply(x_in, self.encoder.weight, self.encoder.bias, values, indices)
        return EncoderOutput(values, indices, pre if return_pre_acts else None)

    def _select(self, pre: Tensor, update_threshold: bool = False) -> tuple[Tensor, Tensor]:
        if self.architecture == "topk":
            return pre.topk(self.k, dim=-1, sorted=False)
        if self.training:
            # BatchTopK: keep the k * batch largest activations of the whole batch.
            n_keep = min(self.k * pre.shape[0], pre.numel())
            thresh = pre.flatten().topk(n_keep, sorted=False).values.min()
            thresh = torch.clamp(thresh, min=torch.finfo(pre.dtype).tiny)
            if update_threshold:  # a training step: update the inference threshold (EMA)
                t = float(thresh)
                m = self.threshold_momentum
                self.threshold = t if self.threshold == 0 else (1 - m) * self.threshold + m * t
        elif self.threshold > 0:
            thresh = torch.tensor(self.threshold, dtype=pre.dtype, device=pre.device)
        else:
            return pre.topk(self.k, dim=-1, sorted=False)
        keep = pre >= thresh
        k_max = max(int(keep.sum(-1).max()), 1)
        values, indices = pre.topk(min(k_max, self.num_latents), dim=-1, sorted=False)
        return values * (values >= thresh), indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """``sum_j values[:, j] * W_dec[indices[:, j]] + b_dec`` via one ``embedding_bag``."""
        return self._decode_rows(values, indices) + self.b_dec

    def _decode_rows(self, values: Tensor, indices: Tensor) -> Tensor:
        """``sum_j values[:, j] * W_dec[indices[:, j]]`` (no ``b_dec``)."""
        w = self.W_dec
        values = values.to(w.dtype)
        if torch.is_grad_enabled() and (values.requires_grad or w.requires_grad):
            return _SparseDecoder.apply(values, indices, w)
        return F.embedding_bag(indices, w, mode="sum", per_sample_weights=values)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, *, dead_mask: Tensor | None = None, auxk_k: int | None = None) -> ForwardOutput:
        """Reconstruct ``x``; with ``dead_mask`` ([num_latents] bool) also compute the AuxK loss.

        AuxK (Gao et al. App. B.1): the ``k_aux`` (default d_in/2) largest pre-activations among
        dead latents reconstruct the residual ``x - x̂``; scaled by min(n_dead / k_aux, 1) and
        normalised like the FVU. The caller weights it (1/32 in the paper).
        """
        need_pre = dead_mask is not None and bool(dead_mask.any())
        enc = self.encode(x, return_pre_acts=need_pre)
        recon = self.decode(enc.values, enc.indices)
        xf = x.float()
        err = xf - recon.float()
        total_variance = (xf - xf.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = err.pow(2).sum() / total_variance

        auxk = recon.new_zeros((), dtype=torch.float32)
        if need_pre:
            assert enc.pre_acts is not None and dead_mask is not None
            n_dead = int(dead_mask.sum())
            k_aux = auxk_k or x.shape[-1] // 2
            scale = min(n_dead / k_aux, 1.0)
            k_aux = min(k_aux, n_dead)
            # top k_aux among the dead columns only (not a topk over all of them with the live ones at -inf)
            dead_ids = dead_mask.nonzero().squeeze(1)
            aux_vals, aux_pos = enc.pre_acts.index_select(1, dead_ids).topk(k_aux, dim=-1, sorted=False)
            aux_idx = dead_ids[aux_pos]
            aux_vals = aux_vals.clamp_min(0)
            if torch.is_grad_enabled():  # unlike sparsify, AuxK also trains the encoder (as in the paper)
                x_in = x.to(self.dtype) - self.b_dec
                aux_vals = _SparseEncoder.apply(x_in, self.encoder.weight, self.encoder.bias, aux_vals, aux_idx)
            e_hat = self._decode_rows(aux_vals, aux_idx)
            auxk = scale * (e_hat.float() - err.detach()).pow(2).sum() / total_variance
        return ForwardOutput(enc.values, enc.indices, recon, fvu, auxk)

    # --- constraints --------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        norm = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(norm + torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to the row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # --- units ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> "SparseCoder":
        """A copy that takes raw inputs ``x`` where this one was trained on ``scale * x``.

        Exact: the same latents fire (activations divided by ``scale``), the decoder rows stay
        unit-norm, and the reconstruction is this model's divided by ``scale``.
        """
        out = SparseCoder(self.d_in, self.num_latents, self.k, self.architecture, init=False,
                          device=self.device, dtype=self.dtype)
        out.load_state_dict(self.state_dict())
        out.encoder.bias.div_(scale)
        out.b_dec.div_(scale)
        out.threshold = self.threshold / scale
        return out.train(self.training)
