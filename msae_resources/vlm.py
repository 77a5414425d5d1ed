"""The VLM as a Dagster resource: loaded lazily, once per process, released on teardown.

Which weights: the configured ``model`` — or, when the config watches for checkpoints
(``checkpoints:``), one checkpoint per run: the one the checkpoint sensor pinned in the run's tags
(:data:`CHECKPOINT_TAGS`), else the newest one when the run starts. Every step of a run that
loads the model (extraction, the SAE's loss recovered) therefore reads the same checkpoint.

GPU behaviour: dtype and device come from :mod:`msae.vlm.load` (``auto``: bfloat16 on CUDA);
``model.device_map`` spreads a model too large for one GPU over several (accelerate); batch size
``auto`` and the halving on CUDA out-of-memory live in the extractor. Only one model is cached
at a time, so switching checkpoints frees the previous one's GPU memory first.
"""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from msae.checkpoints import Checkpoint, checkpoint_source, model_for_checkpoint
from msae.config import CheckpointsConfig, ModelConfig

logger = logging.getLogger("msae.vlm")

GPU_POOL = "gpu"
"""Dagster pool of every step that uses the accelerator: loading the VLM (extraction, the SAE's loss
recovered, the transformers explainer), SAE training, latent statistics, CLIP/ALIGN scoring and the
random-SAE controls. ``dagster.yaml`` gives each pool one slot (``concurrency.pools.default_limit: 1``),
so these steps take turns on the one GPU, across runs too; raise it with
``dagster instance concurrency set gpu N`` on a machine whose GPU memory holds N such steps at once."""

# Run tags the checkpoint sensor sets; any run carrying them loads exactly that checkpoint.
CHECKPOINT_TAGS = {
    "id": "msae/checkpoint",
    "name_or_path": "msae/checkpoint_path",
    "revision": "msae/checkpoint_revision",
    "version": "msae/checkpoint_version",
}


def checkpoint_tags(ckpt: Checkpoint) -> dict[str, str]:
    """Run tags that pin ``ckpt`` (strings only, as Dagster wants)."""
    return {tag: str(getattr(ckpt, field) or "") for field, tag in CHECKPOINT_TAGS.items()}


def checkpoint_from_tags(tags: Mapping[str, str]) -> Checkpoint | None:
    """The checkpoint a run was pinned to, or None if its tags do not name one."""
    if not tags.get(CHECKPOINT_TAGS["id"]) or not tags.get(CHECKPOINT_TAGS["name_or_path"]):
        return None
    values = {field: tags.get(tag, "") for field, tag in CHECKPOINT_TAGS.items()}
    return Checkpoint(id=values["id"], name_or_path=values["name_or_path"],
                      revision=values["revision"] or None, version=values["version"] or values["id"])


class VLMResource(dg.ConfigurableResource):
    """Holds the model config; ``load()`` yields the loaded model, cached for the process.

    Under the multiprocess executor every step process builds its own copy, so steps that do not
    need the model never touch it (it is loaded only when ``load()`` is called).
    """

    model_json: str
    checkpoints_json: str | None = None
    _pinned: Checkpoint | None = PrivateAttr(default=None)

    @classmethod
    def from_config(cls, cfg: ModelConfig, checkpoints: CheckpointsConfig | None = None) -> "VLMResource":
        return cls(model_json=cfg.model_dump_json(),
                   checkpoints_json=checkpoints.model_dump_json() if checkpoints is not None else None)

    @property
    def config(self) -> ModelConfig:
        """The configured model (before any checkpoint is substituted)."""
        return ModelConfig.model_validate_json(self.model_json)

    @property
    def checkpoints(self) -> CheckpointsConfig | None:
        return CheckpointsConfig.model_validate_json(self.checkpoints_json) if self.checkpoints_json else None

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        run = context.dagster_run
        self._pinned = checkpoint_from_tags(run.tags) if run is not None else None
        if self._pinned is not None and context.log is not None:
            context.log.info(f"vlm: run pinned to checkpoint {self._pinned.id} ({self._pinned.name_or_path})")

    def checkpoint(self) -> Checkpoint | None:
        """The checkpoint this run uses; None when no checkpoints are watched (the model as configured).

        Pinned by the run's tags if the sensor launched it; otherwise the newest ready one, looked up
        once and then kept, so a checkpoint appearing mid-run does not change what later steps load.
        Before any checkpoint exists the configured model is used.
        """
        if self._pinned is None and (watched := self.checkpoints) is not None:
            self._pinned = checkpoint_source(watched).latest()
            if self._pinned is None:
                logger.warning("no checkpoint ready in %s yet: using model.name_or_path", watched.location)
        return self._pinned

    def resolved_model(self) -> ModelConfig:
        """The model config that is actually loaded (the checkpoint substituted in)."""
        return model_for_checkpoint(self.config, self.checkpoint())

    @contextmanager
    def load(self) -> Iterator[Any]:
        cfg = self.resolved_model()
        key = cfg.model_dump_json()
        vlm = _CACHE.get(key)
        if vlm is None:
            release_all()  # one model at a time: a new checkpoint must not share the GPU with the old one
            vlm = load_model(cfg)
            _CACHE[key] = vlm
        yield vlm

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        release_all()


_CACHE: dict[str, object] = {}


def load_model(cfg: ModelConfig) -> Any:
    """``load_vlm`` on one device, or spread over the GPUs with ``model.device_map``."""
    from msae.vlm.load import load_vlm

    return load_vlm(cfg) if cfg.device_map is None else load_spread(cfg)


def load_spread(cfg: ModelConfig) -> Any:
    """Load with accelerate's ``device_map`` (a model larger than one GPU); inputs go to the GPU
    holding the input embeddings, accelerate moves activations between the others."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    from msae.vlm.load import LoadedVLM, ModelLoadError, resolve_dtype

    if not torch.cuda.is_available():
        raise ModelLoadError(f"model.device_map={cfg.device_map!r} needs CUDA GPUs; set it to null on this machine")
    dtype = resolve_dtype(cfg.dtype, torch.device("cuda"))
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "local_files_only": cfg.local_files_only}
    model_type = getattr(AutoConfig.from_pretrained(cfg.name_or_path, **common), "model_type", None)
    if model_type != "llava_next":
        raise ModelLoadError(f"model.name_or_path={cfg.name_or_path!r} is a {model_type!r} checkpoint; msae "
                             "extracts from LLaVA-NeXT models (model_type 'llava_next')")
    model = LlavaNextForConditionalGeneration.from_pretrained(
        cfg.name_or_path, dtype=dtype, attn_implementation=cfg.attn_implementation,
        device_map=cfg.device_map, **common,
    )
    model.eval()
    model.requires_grad_(False)
    device = model.get_input_embeddings().weight.device
    processor = AutoProcessor.from_pretrained(cfg.name_or_path, **common)
    return LoadedVLM(model=model, processor=processor, device=device, dtype=dtype, config=cfg)


def release_all() -> None:
    """Drop cached models and free accelerator memory."""
    _CACHE.clear()
    gc.collect()
    torch = sys.modules.get("torch")  # not imported: nothing was loaded, and a reused step stays cheap
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
