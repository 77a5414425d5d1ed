"""Explainer backend running a local vision-language model through transformers.

Two modes (``explainer.transformers.mode``):

* ``grid`` (large chat VLMs, e.g. a LLaVA-OneVision checkpoint on a GPU): one prompt per request
  holding all top images and the instruction templates, parsed like the OpenAI backend's answers.
* ``per_image`` (small VLMs, e.g. the embedded one, which cannot follow long prompts): every top
  image is asked ``explainer.transformers.question`` ("what is shown ?") on its own, in the chat
  form the VLM was trained on, decoded greedily; the answers are combined by the fixed rule of
  :mod:`msae.explain.combine`. The request's images decide the arm: masked views (non-active
  patches black) for ``masked``, the method; the whole images for ``whole``, the baseline - the same
  model and question in both. An image that appears in several requests of one run (a whole image
  topping several latents) is asked once. **Textual concepts in this mode are not asked of the
  VLM**: it cannot read marked text, so the concept is the same rule applied to the top texts'
  peak words (the word the explainer's view marks, lower-cased). ``raw`` lists the per-image
  answers or peak words behind every concept.

Versions: grid answers carry their template's hash; per-image answers a hash of the mode, the
question, the answer length, the rule's parameters and (visual) the model's identity
(:func:`model_identity`, a content stamp for a local folder), so retraining a model in place
invalidates its cached answers. The model is loaded lazily on the first request that misses the
cache: a fully cached run (or a per-image run with textual requests only) never loads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from msae.config import ExplainerConfig
from msae.explain.base import ConceptKind, ExplainAnswer, ExplainRequest, Prompting
from msae.explain.cache import ExplanationCache, split_cached
from msae.explain.combine import Combined, CombineRule
from msae.explain.parse import is_no_concept, parse_concept
from msae.vlm.identity import model_identity
from msae.explain.prompts import build_parts, load_templates

log = logging.getLogger(__name__)

PER_IMAGE_VERSION = 1
"""Bump when the per-image prompting code changes what the VLM sees or how answers are decoded."""

def combine_rules(cfg: ExplainerConfig) -> dict[ConceptKind, CombineRule]:
    """The per-image combination rule for each kind of concept, from ``explainer.transformers``."""
    t = cfg.transformers
    common = {"min_support": t.min_support, "min_fraction": t.min_support_fraction, "max_ngram": t.max_ngram}
    return {"visual": CombineRule(stop_words=tuple(t.stop_words), **common),
            "textual": CombineRule(stop_words=tuple(t.textual_stop_words), **common)}


def per_image_version(cfg: ExplainerConfig, kind: ConceptKind, identity: str) -> str:
    """Short hash of everything a per-image answer of this kind depends on."""
    t = cfg.transformers
    if kind == "visual":
        parts: dict[str, Any] = {"question": t.question, "max_new_tokens": t.max_new_tokens, "model": identity}
    else:  # combined from peak words: neither the model nor the question is involved
        parts = {"source": "peak words"}
    payload = {"format": PER_IMAGE_VERSION, "mode": "per_image", "kind": kind,
               "rule": combine_rules(cfg)[kind].params(), "max_concept_chars": cfg.max_concept_chars, **parts}
    return "pi-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _pil(png: bytes) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _hf_messages(request: ExplainRequest, templates: dict) -> tuple[list[dict], list[Any]]:
    """Chat messages in the processor's format plus the PIL images in placeholder order."""
    content: list[dict] = []
    images: list[Any] = []
    for kind, value in build_parts(request, templates):
        if kind == "image":
            images.append(_pil(value))  # type: ignore[arg-type]
            content.append({"type": "image"})
        else:
            content.append({"type": "text", "text": value})
    return [{"role": "user", "content": content}], images


def question_messages(question: str) -> list[dict]:
    """One image then the question, the user turn the embedded VLM was trained on."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _status(concept: str | None, max_chars: int) -> tuple[str | None, str]:
    """The parser's statuses for a combined concept (a shared "none" or "nothing" declines too)."""
    if concept is None or is_no_concept(concept):
        return None, "no_concept"
    if len(concept) > max_chars:
        return None, "too_long"
    return concept, "ok"


def combined_raw(kind: ConceptKind, combined: Combined, evidence: Sequence[str], header: str) -> str:
    """The evidence behind a combined concept, first line ``Concept: …`` so that
    :func:`~msae.explain.parse.parse_concept` reads it back like any other answer."""
    shown = combined.concept if combined.concept is not None else f"No {kind} concept"
    lines = [f"Concept: {shown}",
             f"{header}; rule: an n-gram in >= {combined.required} of {combined.n}"
             + (f", chosen with support {combined.support}" if combined.concept is not None else ", none qualifies")]
    lines += [f"{i}. {e if e.strip() else '(empty)'}" for i, e in enumerate(evidence, start=1)]
    return "\n".join(lines)


class TransformersExplainer:
    """Proposes concepts with ``AutoModelForImageTextToText.generate``, ``cfg.batch_size`` prompts
    (grid) or images (per_image) at a time."""

    def __init__(
        self,
        cfg: ExplainerConfig,
        cache: ExplanationCache | None = None,
        *,
        model: str | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        ref = model or cfg.model
        if not ref:
            raise ValueError("the transformers backend needs a model: set explainer.model (hub id or folder), "
                             "or leave it unset in a pipeline config to use model.name_or_path")
        self.cfg = cfg
        self.cache = cache
        self.model_ref = str(ref)
        self.mode = cfg.transformers.mode
        self.name = f"transformers:{self.model_ref}"
        self.templates = load_templates(cfg.prompt_dir)
        self.local_files_only = local_files_only
        self.revision = revision
        self.dtype_name = dtype
        self.trust_remote_code = trust_remote_code
        self.rules = combine_rules(cfg)
        self.identity = model_identity(self.model_ref, revision) if self.mode == "per_image" else ""
        self.model: Any = None
        self.processor: Any = None
        self.stats: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"TransformersExplainer(name={self.name!r}, mode={self.mode!r}, device={self.cfg.device!r})"

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        if self.mode == "per_image":
            return per_image_version(self.cfg, kind, self.identity)
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
        self.processor = AutoProcessor.from_pretrained(self.model_ref, **common)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only generation needs the prompt flush right
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model = AutoModelForImageTextToText.from_pretrained(self.model_ref, dtype=dtype, **common)
        self.model.to(device).eval()
        self.device = device
        log.info("loaded explainer %s on %s (%s)", self.model_ref, device, dtype)

    # --- generation ------------------------------------------------------------------------------
    def _decode(self, texts: list[str], images: list[Any], max_new_tokens: int, sample: bool) -> list[str]:
        """Generated continuations of the chat prompts, special tokens (EOS, padding) stripped."""
        import torch

        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and self.model.dtype.is_floating_point:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        gen: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if sample:
            gen.update(do_sample=True, temperature=self.cfg.temperature)
        else:
            gen.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **gen)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def _generate(self, batch: Sequence[ExplainRequest]) -> list[str]:
        """grid: raw answers for one batch of prompts."""
        texts: list[str] = []
        images: list[Any] = []
        for request in batch:
            messages, imgs = _hf_messages(request, self.templates)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            images.extend(imgs)
        return self._decode(texts, images, self.cfg.max_tokens, self.cfg.temperature > 0)

    def _generate_images(self, pngs: Sequence[bytes]) -> list[str]:
        """per_image: the answer to the question for each image, greedy."""
        prompt = self.processor.apply_chat_template(question_messages(self.cfg.transformers.question),
                                                    tokenize=False, add_generation_prompt=True)
        return self._decode([prompt] * len(pngs), [_pil(p) for p in pngs],
                            self.cfg.transformers.max_new_tokens, sample=False)

    def _with_fallback(self, items: list, generate: Callable[[list], list[str]],
                       what: Callable[[list], str]) -> list[str | Exception]:
        """Generate for a batch; if the batch fails (e.g. out of memory), fall back to one at a time.
        A single item that fails gives its exception instead of an answer."""
        try:
            raws = generate(items)
            self.stats["batches"] = self.stats.get("batches", 0) + 1
            return list(raws)
        except Exception as err:
            if len(items) == 1:
                log.warning("%s: generation failed: %s", what(items), err)
                return [err]
            log.warning("batch of %d failed (%s); retrying one by one", len(items), type(err).__name__)
            self._free_memory()
            return [r for item in items for r in self._with_fallback([item], generate, what)]

    @staticmethod
    def _free_memory() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- answers ---------------------------------------------------------------------------------
    def _answer(self, request: ExplainRequest, raw: str) -> ExplainAnswer:
        concept, status = parse_concept(raw, request.kind, self.cfg.max_concept_chars)
        return ExplainAnswer(request.latent, request.kind, request.prompting, concept, raw, status, self.name,
                             self.version(request.kind, request.prompting))

    def _error(self, request: ExplainRequest, err: Exception) -> ExplainAnswer:
        return ExplainAnswer(request.latent, request.kind, request.prompting, None,
                             f"{type(err).__name__}: {str(err)[:160]}", "error", self.name,
                             self.version(request.kind, request.prompting))

    def _combined(self, request: ExplainRequest, evidence: list[str], header: str) -> ExplainAnswer:
        combined = self.rules[request.kind](evidence)
        concept, status = _status(combined.concept, self.cfg.max_concept_chars)
        return ExplainAnswer(request.latent, request.kind, request.prompting, concept,
                             combined_raw(request.kind, combined, evidence, header), status, self.name,
                             self.version(request.kind, request.prompting),
                             combined.qualifying if concept is not None else ())

    def textual_answer(self, request: ExplainRequest) -> ExplainAnswer:
        """per_image: the textual concept from the top texts' peak words (the VLM is not asked)."""
        peaks = [(ex.peak_token or "").strip().lower() for ex in request.examples]
        return self._combined(request, peaks, "peak words of the top texts (combined, not asked of the VLM)")

    def _load_or_errors(self, requests: Sequence[ExplainRequest], todo: list[int],
                        answers: list[ExplainAnswer | None]) -> list[int]:
        """Load the model for the pending requests; if it cannot load, each becomes an error."""
        if not todo:
            return todo
        try:
            self.load()
        except Exception as err:  # a model that cannot load: every pending request is an error
            log.error("cannot load explainer %s: %s", self.model_ref, err)
            for i in todo:
                answers[i] = self._error(requests[i], err)
            return []
        return todo

    def _store(self, answer: ExplainAnswer, request: ExplainRequest) -> None:
        self.stats[answer.status] = self.stats.get(answer.status, 0) + 1
        if self.cache is not None and answer.status != "error":
            try:
                self.cache.put(answer, request)
            except Exception as err:
                log.warning("explanation cache write failed for latent %d: %s", answer.latent, err)

    def explain(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        """One answer per request, in order; cache hits skip generation, the rest run in batches."""
        self.stats = {}
        if self.mode == "per_image":
            answers = self._explain_per_image(requests)
        else:
            answers = self._explain_grid(requests)
        log.info("%s (%s): %d requests - %d generate() calls, cached %d, errors %d", self.name, self.mode,
                 len(requests), self.stats.get("batches", 0), self.stats.get("cached", 0),
                 self.stats.get("error", 0))
        return answers

    def _explain_grid(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        answers, todo = split_cached(self.cache, requests, self.name, self.version)
        self.stats["cached"] = len(requests) - len(todo)
        todo = self._load_or_errors(requests, todo, answers)
        bs = self.cfg.batch_size
        for start in range(0, len(todo), bs):
            idx = todo[start:start + bs]
            batch = [requests[i] for i in idx]
            raws = self._with_fallback(batch, self._generate, lambda b: f"latent {b[0].latent}")
            for i, raw in zip(idx, raws):
                answer = self._error(requests[i], raw) if isinstance(raw, Exception) else self._answer(requests[i], raw)
                answers[i] = answer
                self._store(answer, requests[i])
        return [a for a in answers if a is not None]

    def _explain_per_image(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        answers: list[ExplainAnswer | None] = [None] * len(requests)
        visual = [i for i, r in enumerate(requests) if r.kind == "visual"]
        for i, r in enumerate(requests):
            if r.kind == "textual":  # pure and cheap: neither the model nor the cache is involved
                answer = answers[i] = self.textual_answer(r)
                self.stats[answer.status] = self.stats.get(answer.status, 0) + 1
        hits, pending = split_cached(self.cache, [requests[i] for i in visual], self.name, self.version)
        for j, hit in enumerate(hits):
            answers[visual[j]] = hit
        self.stats["cached"] = len(visual) - len(pending)
        todo = self._load_or_errors(requests, [visual[j] for j in pending], answers)
        # every distinct image once, in first-seen order (a whole image often tops several latents)
        pngs = list(dict.fromkeys(ex.image_png for i in todo for ex in requests[i].examples if ex.image_png))
        said: dict[bytes, str | Exception] = {}
        bs = self.cfg.batch_size
        for start in range(0, len(pngs), bs):
            chunk = pngs[start:start + bs]
            said.update(zip(chunk, self._with_fallback(chunk, self._generate_images, lambda _: "an image")))
        self.stats["images"] = len(pngs)
        question = self.cfg.transformers.question
        for i in todo:
            request = requests[i]
            got = [said[ex.image_png] if ex.image_png else ValueError(f"example {ex.sample_id} has no image")
                   for ex in request.examples]
            failed = next((g for g in got if isinstance(g, Exception)), None)
            answer = (self._error(request, failed) if failed is not None else
                      self._combined(request, [str(g) for g in got],
                                     f"answers to {question!r} per top image ({request.prompting})"))
            answers[i] = answer
            self._store(answer, request)
        return [a for a in answers if a is not None]
