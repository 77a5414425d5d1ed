"""The VLM as a Dagster resource: loaded lazily, once per process, released on teardown."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

import dagster as dg

from msae.config import ModelConfig


class VLMResource(dg.ConfigurableResource):
    """Holds the model config; ``load()`` yields the loaded model, cached for the process.

    Under the multiprocess executor every step process builds its own copy, so steps that do not
    need the model never touch it (it is loaded only when ``load()`` is called).
    """

    model_json: str

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "VLMResource":
        return cls(model_json=cfg.model_dump_json())

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.model_validate_json(self.model_json)

    @contextmanager
    def load(self) -> Iterator["object"]:
        from msae.vlm.load import load_vlm

        vlm = _CACHE.get(self.model_json)
        if vlm is None:
            vlm = load_vlm(self.config)
            _CACHE[self.model_json] = vlm
        yield vlm

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        release_all()


_CACHE: dict[str, object] = {}


def release_all() -> None:
    """Drop cached models and free accelerator memory."""
    _CACHE.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
