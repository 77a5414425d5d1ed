"""Load a LLaVA-NeXT checkpoint (hub id or local folder, one code path) for activation extraction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from msae.config import ModelConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The configured model cannot be used; the message names the config key."""


@dataclass
class LoadedVLM:
    """A model ready for inference plus its processor; ``config`` is what it was loaded from."""

    model: Any  # LlavaNextForConditionalGeneration
    processor: Any  # LlavaNextProcessor (or compatible)
    device: torch.device
    dtype: torch.dtype
    config: ModelConfig | None = None

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        return self.config.batch_size if self.config is not None else 8

    @property
    def name_or_path(self) -> str:
        if self.config is not None:
            return self.config.name_or_path
        return str(getattr(self.model.config, "name_or_path", "") or type(self.model).__name__)

    @property
    def revision(self) -> str | None:
        return self.config.revision if self.config is not None else None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ModelLoadError(f"model.device={device!r} is not a device: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={device!r} but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return _DTYPES[dtype]


def load_vlm(cfg: ModelConfig) -> LoadedVLM:
    """``from_pretrained`` the model and its processor; eval mode, no gradients."""
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    common = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        "local_files_only": cfg.local_files_only,
    }
    try:
        hf_config = AutoConfig.from_pretrained(cfg.name_or_path, **common)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r} cannot be loaded: {err}") from err
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "llava_next":
        raise ModelLoadError(
            f"model.name_or_path={cfg.name_or_path!r} is a {model_type!r} checkpoint; msae extracts from "
            "LLaVA-NeXT models (model_type 'llava_next', e.g. llava-hf/llama3-llava-next-8b-hf)"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation, **common}
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # load straight onto the accelerator
    model = LlavaNextForConditionalGeneration.from_pretrained(cfg.name_or_path, **kwargs)
    if device.type != "cuda":
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    processor = AutoProcessor.from_pretrained(cfg.name_or_path, **common)
    return LoadedVLM(model=model, processor=processor, device=device, dtype=dtype, config=cfg)
