"""Explainer backend running a local vision-language model through transformers.

For machines that can hold the explainer themselves (e.g. a LLaVA-OneVision checkpoint on a GPU)
or for offline runs with a small model. It uses the same templates, parsing and cache as the
OpenAI backend, so answers from both are interchangeable except for the explainer name.

The model is loaded lazily on the first request that misses the cache: a fully cached run never
loads it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from typing import Any

from msae.config import ExplainerConfig
from msae.explain.base import ConceptKind, ExplainAnswer, ExplainRequest, Prompting
from msae.explain.cache import ExplanationCache, split_cached
from msae.explain.parse import parse_concept
from msae.explain.prompts import build_parts, load_templates

log = logging.getLogger(__name__)


def _hf_messages(request: ExplainRequest, templates: dict) -> tuple[list[dict], list[Any]]:
    """Chat messages in the processor's format plus the PIL images in placeholder order."""
    from PIL import Image

    content: list[dict] = []
    images: list[Any] = []
    for kind, value in build_parts(request, templates):
        if kind == "image":
            images.append(Image.open(io.BytesIO(value)).convert("RGB"))  # type: ignore[arg-type]
            content.append({"type": "image"})
        else:
            content.append({"type": "text", "text": value})
    return [{"role": "user", "content": content}], images


class TransformersExplainer:
    """Proposes concepts with ``AutoModelForImageTextToText.generate``, ``cfg.batch_size`` prompts at a time."""

    def __init__(
        self,
        cfg: ExplainerConfig,
        cache: ExplanationCache | None = None,
        *,
        local_files_only: bool = False,
        revision: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        if not cfg.model:
            raise ValueError("explainer.model is required for the transformers backend (hub id or folder)")
        self.cfg = cfg
        self.cache = cache
        self.name = f"transformers:{cfg.model}"
        self.templates = load_templates(cfg.prompt_dir)
        self.local_files_only = local_files_only
        self.revision = revision
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.model: Any = None
        self.processor: Any = None
        self.stats: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"TransformersExplainer(name={self.name!r}, device={self.cfg.device!r})"

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        return self.templates[(kind, prompting)].version

    def load(self) -> None:
        """Load the processor and model (idempotent)."""
        if self.model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from msae.vlm.load import resolve_device, resolve_dtype

        device = resolve_device(self.cfg.device)
        dtype = resolve_dtype(self.dtype_name, device)
        common = {"revision": self.revision, "local_files_only": self.local_files_only,
                  "trust_remote_code": self.trust_remote_code}
        self.processor = AutoProcessor.from_pretrained(self.cfg.model, **common)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only generation needs the prompt flush right
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(self.cfg.model, dtype=dtype, **common)
        self.model.to(device).eval()
        self.device = device
        log.info("loaded explainer %s on %s (%s)", self.cfg.model, device, dtype)

    def _generate(self, batch: Sequence[ExplainRequest]) -> list[str]:
        """Raw answers for one batch of prompts."""
        import torch

        texts: list[str] = []
        images: list[Any] = []
        for request in batch:
            messages, imgs = _hf_messages(request, self.templates)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            images.extend(imgs)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and self.model.dtype.is_floating_point:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        gen: dict[str, Any] = {"max_new_tokens": self.cfg.max_tokens, "pad_token_id": tokenizer.pad_token_id}
        if self.cfg.temperature > 0:
            gen.update(do_sample=True, temperature=self.cfg.temperature)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _answer(self, request: ExplainRequest, raw: str) -> ExplainAnswer:
        concept, status = parse_concept(raw, request.kind, self.cfg.max_concept_chars)
        return ExplainAnswer(request.latent, request.kind, request.prompting, concept, raw, status, self.name,
                             self.version(request.kind, request.prompting))

    def _error(self, request: ExplainRequest, err: Exception) -> ExplainAnswer:
        return ExplainAnswer(request.latent, request.kind, request.prompting, None,
                             f"{type(err).__name__}: {str(err)[:160]}", "error", self.name,
                             self.version(request.kind, request.prompting))

    def _run_batch(self, batch: list[ExplainRequest]) -> list[ExplainAnswer]:
        """Generate for a batch; if the batch fails (e.g. out of memory), fall back to one at a time."""
        try:
            raws = self._generate(batch)
            self.stats["batches"] = self.stats.get("batches", 0) + 1
            return [self._answer(r, raw) for r, raw in zip(batch, raws)]
        except Exception as err:
            if len(batch) == 1:
                log.warning("latent %d: generation failed: %s", batch[0].latent, err)
                return [self._error(batch[0], err)]
            log.warning("batch of %d failed (%s); retrying one by one", len(batch), type(err).__name__)
            self._free_memory()
            return [a for r in batch for a in self._run_batch([r])]

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def explain(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        """One answer per request, in order; cache hits skip generation, the rest run in batches."""
        self.stats = {}
        answers, todo = split_cached(self.cache, requests, self.name, self.version)
        self.stats["cached"] = len(requests) - len(todo)
        if todo:
            try:
                self.load()
            except Exception as err:  # a model that cannot load: every pending request is an error
                log.error("cannot load explainer %s: %s", self.cfg.model, err)
                for i in todo:
                    answers[i] = self._error(requests[i], err)
                todo = []
        bs = self.cfg.batch_size
        for start in range(0, len(todo), bs):
            idx = todo[start:start + bs]
            for i, answer in zip(idx, self._run_batch([requests[i] for i in idx])):
                answers[i] = answer
                self.stats[answer.status] = self.stats.get(answer.status, 0) + 1
                if self.cache is not None and answer.status != "error":
                    try:
                        self.cache.put(answer, requests[i])
                    except Exception as err:
                        log.warning("explanation cache write failed for latent %d: %s", answer.latent, err)
        log.info("%s: %d requests - generated %d in %d batches, cached %d, errors %d", self.name, len(requests),
                 len(todo), self.stats.get("batches", 0), self.stats["cached"], self.stats.get("error", 0))
        return [a for a in answers if a is not None]
