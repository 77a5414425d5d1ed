"""SAEs on disk: EleutherAI sparsify's layout (read and written), SAELens (read), HF hub repos.

sparsify layout — one folder per SAE, what ``sparsify.SparseCoder.load_from_disk`` reads::

    cfg.json          {"activation": "topk", "expansion_factor", "normalize_decoder", "num_latents",
                       "k", "multi_topk", "skip_connection", "transcode", "d_in"}
    sae.safetensors   encoder.weight [n, d]  encoder.bias [n]  W_dec [n, d]  b_dec [d]
    msae.json         ours, ignored by sparsify: architecture, BatchTopK threshold, the activation
                      scale used in training, train/eval numbers

Weights are always stored in raw activation units (the training scale is folded in, see
:meth:`SparseCoder.fold_input_scale`), so sparsify and msae compute the same code from the same
activations. A BatchTopK SAE loaded by sparsify runs as plain TopK with the same k.

A hub repo (e.g. ``lmms-lab/llama3-llava-next-8b-hf-sae-131k``) holds one such folder per hookpoint
(``model.layers.24/``); :func:`load_pretrained` downloads only that folder.

SAELens layout: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``. TopK SAEs map exactly; ReLU, JumpReLU and gated SAEs
have no TopK equivalent and are refused with a message saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fsspec.core import url_to_fs
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from msae.sae.model import SparseCoder

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
SAELENS_WEIGHTS = "sae_weights.safetensors"
META = "msae.json"
META_VERSION = 1


class SAEFormatError(ValueError):
    """A checkpoint msae cannot turn into a TopK/BatchTopK SparseCoder; the message says why."""


# --- sparsify -------------------------------------------------------------------------------------
def _is_url(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def _read_text(path: str | Path, name: str) -> str | None:
    fs, root = url_to_fs(str(path))
    target = f"{root.rstrip('/')}/{name}"
    return fs.cat_file(target).decode() if fs.isfile(target) else None


def _load_tensors(path: str | Path, name: str, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not _is_url(path):
        return load_file(str(Path(str(path).removeprefix("file://")) / name), device=str(device))
    fs, root = url_to_fs(str(path))
    return {k: v.to(device) for k, v in load_bytes(fs.cat_file(f"{root.rstrip('/')}/{name}")).items()}


def save_sae(sae: SparseCoder, path: str | Path, metadata: dict[str, Any] | None = None) -> str | Path:
    """Write ``sae`` in sparsify's layout plus ``msae.json`` (architecture, threshold, metadata).

    ``path``: a local folder or an fsspec URL (``s3://…``, ``memory://…``)."""
    fs, root = url_to_fs(str(path))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    tensors = {
        "encoder.weight": sae.encoder.weight, "encoder.bias": sae.encoder.bias,
        "W_dec": sae.W_dec, "b_dec": sae.b_dec,
    }
    fs.pipe_file(f"{root}/{SPARSIFY_WEIGHTS}",
                 save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))
    cfg = {
        "activation": "topk", "expansion_factor": max(1, sae.num_latents // sae.d_in),
        "normalize_decoder": True, "num_latents": sae.num_latents, "k": sae.k, "multi_topk": False,
        "skip_connection": False, "transcode": False, "d_in": sae.d_in,
    }
    fs.pipe_file(f"{root}/{SPARSIFY_CFG}", json.dumps(cfg).encode())
    meta = {"format_version": META_VERSION, "architecture": sae.architecture, "threshold": sae.threshold,
            **(metadata or {})}
    fs.pipe_file(f"{root}/{META}", json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """``msae.json`` of a saved SAE ({} for checkpoints written by other tools)."""
    text = _read_text(path, META)
    return json.loads(text) if text else {}


def load_sparsify(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> SparseCoder:
    """A sparsify folder (``cfg.json`` + ``sae.safetensors``; local or fsspec URL) as a SparseCoder."""
    text = _read_text(path, SPARSIFY_CFG)
    if text is None:
        raise SAEFormatError(f"{path}: no {SPARSIFY_CFG}")
    cfg = json.loads(text)
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: activation {cfg['activation']!r} is not supported (only 'topk')")
    for flag in ("skip_connection", "transcode"):
        if cfg.get(flag):
            raise SAEFormatError(f"{path}: {flag}=true (a transcoder / skip SAE) is not supported")
    d_in = int(cfg["d_in"])
    n = int(cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor", 32)))
    state = _load_tensors(path, SPARSIFY_WEIGHTS, device)
    dtype = dtype or next(iter(state.values())).dtype
    meta = read_metadata(path)
    sae = SparseCoder(d_in, n, int(cfg["k"]), meta.get("architecture", "topk"), init=False, device="meta",
                      dtype=dtype)
    extra = set(state) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    if extra:
        raise SAEFormatError(f"{path}: unexpected tensors {sorted(extra)} (skip connections are not supported)")
    if "W_dec" not in state:
        raise SAEFormatError(f"{path}: no decoder (W_dec) in {SPARSIFY_WEIGHTS}")
    sae.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    sae.threshold = float(meta.get("threshold", 0.0))
    return sae.eval()


# --- SAELens --------------------------------------------------------------------------------------
def load_saelens(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SparseCoder:
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) with a TopK activation."""
    text = _read_text(path, SPARSIFY_CFG)
    if text is None:
        raise SAEFormatError(f"{path}: no {SPARSIFY_CFG}")
    cfg = json.loads(text)
    arch = str(cfg.get("architecture") or "standard").lower()
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "").lower()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if not (arch in ("topk", "batchtopk") or act == "topk"):
        kind = act or arch
        raise SAEFormatError(
            f"{path}: SAELens architecture {arch!r} / activation {kind!r} is not a TopK SAE; msae's "
            "analysis assumes k active latents per token (use a TopK SAE, or train one: sae.source: train)")
    if not k:
        raise SAEFormatError(f"{path}: TopK SAELens config without k")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise SAEFormatError(f"{path}: normalize_activations={norm!r} is not supported (only 'none')")
    state = _load_tensors(path, SAELENS_WEIGHTS, "cpu")
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - set(state)
    if missing:
        raise SAEFormatError(f"{path}: {SAELENS_WEIGHTS} lacks {sorted(missing)}")
    extra = set(state) - {"W_enc", "W_dec", "b_enc", "b_dec"}
    if extra:
        raise SAEFormatError(f"{path}: unsupported extra tensors {sorted(extra)}")
    w_enc, w_dec, b_enc, b_dec = (state[n].float() for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    d_in, d_sae = w_enc.shape
    if w_dec.shape != (d_sae, d_in):
        raise SAEFormatError(f"{path}: W_dec shape {tuple(w_dec.shape)} != (d_sae, d_in) = {(d_sae, d_in)}")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # Rescaling by decoder norms is the identity when the rows are unit-norm, which is how SAELens v6
        # saves TopK SAEs (the norms are folded in, the flag stays in cfg.json). Anything else would
        # need the rescale reproduced; refuse rather than load something subtly different.
        worst = float((w_dec.norm(dim=1) - 1).abs().max())
        if worst > 1e-3:
            raise SAEFormatError(f"{path}: rescale_acts_by_decoder_norm=true with decoder rows of norm != 1 "
                                 f"(off by up to {worst:.3g}) is not supported")
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes W_enc·x + b_enc; msae encodes W_enc·(x - b_dec) + b -> b = b_enc + W_enc·b_dec.
        b_enc = b_enc + b_dec @ w_enc
    dtype = dtype or state["W_enc"].dtype
    sae = SparseCoder(d_in, d_sae, int(k), "topk", init=False, device="meta", dtype=dtype)
    sae.load_state_dict({"encoder.weight": w_enc.T.contiguous().to(dtype), "encoder.bias": b_enc.to(dtype),
                         "W_dec": w_dec.to(dtype), "b_dec": b_dec.to(dtype)}, assign=True)
    return sae.to(device).eval()


# --- any folder, any repo -------------------------------------------------------------------------
def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> SparseCoder:
    """Load a folder (local or fsspec URL) in sparsify or SAELens layout, detected from the files."""
    fs, root = url_to_fs(str(path))
    has = lambda name: fs.isfile(f"{root.rstrip('/')}/{name}")  # noqa: E731
    if has(SPARSIFY_WEIGHTS) and has(SPARSIFY_CFG):
        return load_sparsify(path, device, dtype)
    if has(SAELENS_WEIGHTS) and has(SPARSIFY_CFG):
        return load_saelens(path, device, dtype)
    raise SAEFormatError(f"{path}: neither sparsify ({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}) nor SAELens "
                         f"({SPARSIFY_CFG} + {SAELENS_WEIGHTS}) files found")


def resolve_pretrained(ref: str, hookpoint: str | None = None, *, revision: str | None = None,
                       cache_dir: str | None = None, local_files_only: bool = False) -> Path:
    """The folder holding one SAE: ``ref[/hookpoint]`` locally, else downloaded from the HF hub.

    From the hub only ``<hookpoint>/*`` is fetched (a 131k-latent repo holds one SAE per layer).
    ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) uses the local hub cache only.
    """
    local = Path(ref).expanduser()
    if local.exists():
        base = local
    else:
        from huggingface_hub import snapshot_download

        base = Path(snapshot_download(ref, allow_patterns=[f"{hookpoint}/*"] if hookpoint else None,
                                      revision=revision, cache_dir=cache_dir, local_files_only=local_files_only))
    if hookpoint and (base / hookpoint).is_dir():
        return base / hookpoint
    if (base / SPARSIFY_CFG).is_file():
        return base
    found = sorted(p.parent.name for p in base.glob(f"*/{SPARSIFY_CFG}"))
    raise SAEFormatError(f"{ref}: no SAE for hookpoint {hookpoint!r}; hookpoints present: {found or 'none'}")


def load_pretrained(ref: str, hookpoint: str | None = None, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, revision: str | None = None, cache_dir: str | None = None,
                    local_files_only: bool = False) -> SparseCoder:
    """Load a pretrained SAE from a local folder or HF repo (sparsify or SAELens layout)."""
    folder = resolve_pretrained(ref, hookpoint, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only)
    return load_sae(folder, device, dtype)
