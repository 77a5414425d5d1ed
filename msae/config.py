"""The whole pipeline's configuration: one YAML file -> one validated pydantic model.

Resolution order (first match wins):
1. ``MSAE_CONFIG``: path to a YAML file;
2. ``MSAE_PROFILE``: name of a built-in profile in ``msae/profiles`` (``embedded`` or ``paper``);
3. the ``embedded`` profile.
``MSAE_STORE`` overrides the ``store`` key of whichever file was chosen (tests and CI use it).

Every section forbids unknown keys, so a typo fails loudly with the key's dotted path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from msae.world.config import ShapesConfig

PROFILES = ("embedded", "paper")

logger = logging.getLogger("msae.config")


class _Section(BaseModel):
    # validate_default: a default goes through the same validators (normalising, sorting) as a value
    # read from a file, so a config and its dump round-trip to the same code versions
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def fingerprint(self) -> str:
        """Short stable hash of this section, used in Dagster code versions and manifests."""
        return config_hash(self)


def config_hash(*parts: BaseModel | dict | str | int | None, length: int = 10) -> str:
    """Stable short hash of config sections (key order independent)."""
    payload = [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class DatasetConfig(_Section):
    """Which VQA samples to run the VLM on."""

    kind: Literal["shapes", "llava", "hf"] = Field(
        description="shapes: the synthetic world; llava: local LLaVA-format JSON/JSONL or folder; "
        "hf: a Hugging Face dataset, streamed."
    )
    path: str | None = Field(
        None,
        description="llava: a .json/.jsonl file, or a folder holding one (plus the images).",
    )
    image_root: str | None = Field(
        None,
        description="Folder that relative `image` paths resolve against, and the dataset's image root: every "
        "image reference must resolve (after `..` and symlinks) inside it or inside allowed_image_roots. "
        "llava default: the JSON file's folder; hf default: the dataset folder when `name` is a local folder "
        "(hub datasets have none: their images arrive as bytes); shapes: always the world folder in the store.",
    )
    allowed_image_roots: list[str] = Field(
        default_factory=list,
        description="Further folders (or fsspec URL prefixes such as s3://bucket/images) that image references "
        "may point into, e.g. images shared by several datasets. `file://` references are paths like any other.",
    )
    allow_image_urls: bool = Field(
        False,
        description="Fetch http(s):// image references (with httpx, bounded by max_image_bytes and "
        "image_url_timeout_s, never sending credentials). Off: such samples are skipped as 'url_not_allowed'.",
    )
    max_image_bytes: int = Field(
        64 * 1024 * 1024, gt=0, strict=True,
        description="Skip (as 'image_too_large') an image file or download larger than this many bytes.",
    )
    max_image_pixels: int = Field(
        89_478_485, gt=0, strict=True,
        description="Skip (as 'image_too_large') an image whose header declares more pixels than this "
        "(checked before decoding; default: PIL's own limit). PIL itself refuses more than twice its "
        "Image.MAX_IMAGE_PIXELS whatever this says.",
    )
    image_url_timeout_s: float = Field(
        30.0, gt=0, description="allow_image_urls: seconds one image download may take in all."
    )
    name: str | None = Field(None, description="hf: dataset id or local dataset folder.")
    subset: str | None = Field(None, description="hf: configuration name, if the dataset has several.")
    split: str = Field("train", description="hf: split to stream.")
    fraction: float | None = Field(
        None, gt=0, le=1, description="Keep the first fraction of the split (e.g. 0.15 as in the paper)."
    )
    limit: int | None = Field(None, gt=0, description="Keep at most this many samples.")
    revision: str | None = Field(None, description="hf: dataset revision.")
    shapes: ShapesConfig | None = Field(None, description="shapes: the world's generator settings.")

    @model_validator(mode="after")
    def _kind_fields(self) -> "DatasetConfig":
        if self.kind == "llava" and not self.path:
            raise ValueError("dataset.path is required when dataset.kind is 'llava'")
        if self.kind == "hf" and not self.name:
            raise ValueError("dataset.name is required when dataset.kind is 'hf'")
        if self.kind == "shapes" and self.shapes is None:
            object.__setattr__(self, "shapes", ShapesConfig())
        if self.kind != "shapes" and self.shapes is not None:
            raise ValueError(f"dataset.shapes is only valid with kind 'shapes', not {self.kind!r}")
        if any(not r.strip() for r in self.allowed_image_roots):
            raise ValueError("dataset.allowed_image_roots holds an empty entry; name each folder explicitly")
        urls = [r for r in self.allowed_image_roots if r.lower().startswith(("http://", "https://"))]
        if urls:
            raise ValueError(
                f"dataset.allowed_image_roots holds URLs {urls}; http(s) images are governed by "
                "dataset.allow_image_urls, not by roots"
            )
        return self

    @property
    def has_annotations(self) -> bool:
        """Whether the dataset brings ground-truth patch annotations (``<store>/world/annotations.parquet``,
        written by ``vqa_samples``): only the shapes world does; LLaVA-format and hf datasets do not."""
        return self.kind == "shapes"


class ModelConfig(_Section):
    """The VLM whose residual stream is read. Local folders and HF hub ids go through one path."""

    name_or_path: str = Field(description="HF hub id or local folder saved with save_pretrained.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: bfloat16 on CUDA if supported, float32 on CPU."
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, …")
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    batch_size: Annotated[int, Field(gt=0, strict=True)] | Literal["auto"] = Field(
        8,
        description="Samples per forward pass, or auto: as many as the free GPU memory should hold (at most "
        "auto_batch_max; 8 on CPU). Either way a CUDA out-of-memory halves the batch and retries it.",
    )
    auto_batch_max: int = Field(64, gt=0, strict=True, description="batch_size auto: the largest batch tried.")
    device_map: str | None = Field(
        None,
        description="A model too large for one GPU: 'auto', 'balanced' or 'sequential' spreads it over the "
        "visible GPUs (accelerate); None keeps the whole model on `device`.",
    )
    trust_remote_code: bool = Field(False, description="Only turn on for checkpoints you trust.")
    local_files_only: bool = Field(
        False, description="Never contact the hub (offline runs; the embedded model sets it)."
    )


class ExtractionConfig(_Section):
    """What the VLM is fed and how its activations are written."""

    include_answer: bool = Field(True, description="Append the answer after the templated question.")
    chunk_samples: int = Field(
        64, gt=0, strict=True, description="Samples per resumable chunk (the unit of checkpointing)."
    )
    rows_per_zarr_chunk: int = Field(4096, gt=0, strict=True, description="Token rows per zarr chunk.")
    max_length: int | None = Field(
        None, gt=0, strict=True, description="Truncate text tokens beyond this length (image tokens are never cut)."
    )
    too_long: Literal["skip", "truncate"] = Field(
        "skip",
        description="A sample longer than the model's context (its text config's max_position_embeddings; "
        "image tokens + text, after max_length): skip it (counted as 'too_long' with the other skipped samples) "
        "or truncate its text to fit. Image tokens are never cut: a sample whose image tokens alone do not fit "
        "is always skipped.",
    )
    store_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype of the stored activations."
    )


class SAEConfig(_Section):
    """Sparse autoencoders trained or loaded per layer × width (used by the `sae` stage)."""

    source: Literal["train", "pretrained"] = "train"
    architecture: Literal["topk", "batchtopk"] = "topk"
    k: int = Field(16, gt=0, strict=True, description="Active latents per token.")
    pretrained: str | None = Field(
        None, description="pretrained: local folder or HF repo in sparsify layout."
    )
    hookpoint_template: str = Field(
        "model.layers.{layer}", description="Subfolder of a pretrained repo for a layer."
    )
    token_budget: int = Field(2_000_000, gt=0, strict=True, description="Training tokens per SAE.")
    lr: float | None = Field(None, gt=0, description="None: scale with width as in Gao et al.")
    batch_size: int = Field(1024, gt=0, strict=True, description="Tokens per SAE training step.")
    train_on: Literal["image", "text", "both"] = "both"
    seed: StrictInt = 0
    # --- training details (source: train); defaults follow Gao et al. 2024 / sparsify -----------
    include_special: bool = Field(
        False, description="train_on both: also train on special tokens (BOS, image markers, …)."
    )
    include_template: bool = Field(False, description="Also train on chat-template tokens (role 'template').")
    auxk_coef: float = Field(
        1 / 32, ge=0, description="Weight of the AuxK loss on dead latents (Gao et al.: 1/32; 0 turns it off)."
    )
    auxk_k: int | None = Field(
        None, gt=0, strict=True, description="Dead latents AuxK uses per token; None: d_model / 2."
    )
    dead_after_tokens: int | None = Field(
        None, gt=0, strict=True,
        description="A latent silent for this many training tokens is dead (for AuxK); "
        "None: token_budget / 10, at most 10M.",
    )
    lr_warmup_fraction: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming up the LR.")
    lr_schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="LR after warm-up: linear or cosine decay to 0 at the end of the budget, or constant."
    )
    b_dec_init: Literal["geometric_median", "mean"] = Field(
        "geometric_median", description="Initial pre-encoder bias, from a sample of training tokens."
    )
    init_sample_tokens: int = Field(
        16384, gt=0, strict=True,
        description="Tokens sampled to estimate the normalisation scale and the initial b_dec.",
    )
    buffer_rows: int = Field(
        65536, gt=0, strict=True, description="Rows shuffled together in memory (whole zarr chunks are read)."
    )
    checkpoint_every: int = Field(1000, gt=0, strict=True, description="Training steps between resumable checkpoints.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of samples (not tokens) held out from training for evaluation."
    )
    eval_tokens: int = Field(100_000, gt=0, strict=True, description="At most this many held-out tokens are evaluated.")
    dense_threshold: float = Field(
        0.1, gt=0, le=1, description="A latent firing on more than this share of held-out tokens is dense."
    )
    loss_samples: int = Field(
        16, ge=0, strict=True,
        description="Held-out samples run through the VLM to measure the next-token loss recovered with the "
        "SAE spliced in (clean / SAE / zero-ablated); 0 turns it off (the VLM is then not loaded).",
    )
    loss_tokens: Literal["text", "answer"] = Field(
        "text",
        description="Loss recovered: next-token loss over every text token (not image placeholders or padding), "
        "or only the answer's tokens (for VLMs trained on answers only, like the embedded one).",
    )
    # --- asset checks (thresholds only: changing them re-checks but never retrains) -----------------
    check_max_fvu: float = Field(
        0.5, gt=0, description="Asset check `fvu`: held-out FVU (all tokens) must be at most this."
    )
    check_max_dead_fraction: float = Field(
        0.5, ge=0, le=1,
        description="Asset check `dead_fraction`: share of latents never firing on held-out tokens, at most this.",
    )


class LatentsConfig(_Section):
    """Which latents to analyse and how their top samples are ranked (the `latent_stats` stage)."""

    select: Literal["all", "first", "sample"] = "all"
    n: int | None = Field(None, gt=0, strict=True, description="first/sample: number of latents.")
    top_k: int = Field(5, gt=0, strict=True, description="Top samples kept per latent and modality.")
    ranking: Literal["active_patches", "max", "mean"] = Field(
        "active_patches",
        description="active_patches: the paper's rule (most active base-grid patches, then mean).",
    )
    seed: StrictInt = 0
    active_fraction: float = Field(
        0.0, ge=0, lt=1, description="A base-grid patch counts as active when its activation exceeds this fraction "
        "of the sample's largest one. 0 is the method's rule (any positive activation); on models whose latents "
        "also fire weakly everywhere, a fraction keeps masks, rankings and IoUs to where the latent really fires.")
    batch_samples: int = Field(64, gt=0, strict=True, description="Samples encoded per step of the streaming pass.")
    text_include_template: bool = Field(
        False, description="Let chat-template tokens count as a sample's peak text token (they are always shown; "
        "each sample's answer position, the template token right before the answer, always counts)."
    )
    cards: int | None = Field(
        None, ge=0, strict=True,
        description="Latent cards (PNG) to draw per layer × width; None: one per explained latent.",
    )

    @model_validator(mode="after")
    def _n_needed(self) -> "LatentsConfig":
        if self.select in ("first", "sample") and self.n is None:
            raise ValueError(f"latents.select is {self.select!r}: set latents.n (how many latents)")
        return self


def _default_stop_words() -> list[str]:
    from msae.explain.combine import DEFAULT_STOP_WORDS

    return list(DEFAULT_STOP_WORDS)


class TransformersExplainerConfig(_Section):
    """How the transformers backend asks its VLM (see msae.explain.transformers_backend)."""

    mode: Literal["grid", "per_image"] = Field(
        "grid",
        description="grid: one prompt holding all top images and the instruction templates (large chat VLMs); "
        "per_image: ask `question` of each top image alone and combine the answers by a fixed rule "
        "(msae.explain.combine) - for small VLMs such as the embedded one, which cannot follow long prompts.",
    )
    question: str = Field(
        "what is shown ?", description="per_image: the question asked of every top image (masked or whole)."
    )
    max_new_tokens: int = Field(8, gt=0, description="per_image: answer length cap (grid uses explainer.max_tokens).")
    min_support: int = Field(
        3, ge=1, description="per_image: an n-gram must occur in at least min(min_support, "
        "ceil(min_support_fraction × answers)) answers to be the concept.")
    min_support_fraction: float = Field(
        0.6, gt=0, le=1, description="per_image: the support needed when there are fewer answers (see min_support)."
    )
    max_ngram: int = Field(3, ge=1, le=8, description="per_image: longest concept, in words.")
    stop_words: list[str] = Field(
        default_factory=_default_stop_words,
        description="per_image: words that never make (or sit inside) a visual concept; punctuation never does.",
    )
    textual_stop_words: list[str] = Field(
        default_factory=list,
        description="per_image: the same for textual concepts (combined from the top texts' peak words); empty "
        "because a latent firing on 'the' is textual in the ground truth.",
    )

    @field_validator("question")
    @classmethod
    def _question(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("explainer.transformers.question is empty: give the question asked of each image, "
                             "e.g. 'what is shown ?'")
        return v

    @field_validator("stop_words", "textual_stop_words")
    @classmethod
    def _stop_words(cls, v: list[str]) -> list[str]:
        out = [w.strip().lower() for w in v]
        if any(not w or len(w.split()) > 1 for w in out):
            raise ValueError(f"stop words must be single non-empty words, got {v}")
        return sorted(set(out))


class ExplainerConfig(_Section):
    """Who proposes a concept per latent (the `concepts` stage)."""

    backend: Literal["dissection", "openai", "transformers"] = "dissection"
    model: str | None = Field(
        None, description="openai: model name; transformers: hub id or folder, None: the analysed VLM itself "
        "(model.name_or_path, with its revision, dtype and trust_remote_code).")
    base_url: str | None = Field(None, description="openai: server URL, e.g. http://localhost:8000/v1.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: name of the env var holding the key (the key is never stored)."
    )
    max_concept_chars: int = Field(40, gt=0, description="Longer concepts are dropped.")
    prompting: list[Literal["masked", "whole"]] = Field(
        default_factory=lambda: ["masked", "whole"],
        description="masked: only active patches shown (the method); whole: whole images (the baseline).",
    )
    examples: int = Field(5, gt=0, description="Top examples shown per prompt.")
    prompt_dir: str | None = Field(
        None, description="Folder with prompt templates overriding the built-in ones (same file names)."
    )
    concurrency: int = Field(4, gt=0, description="openai: requests in flight at once.")
    timeout_s: float = Field(
        120.0, gt=0, description="openai: deadline of one HTTP attempt (connect, sending, headers and the whole "
        "body); a retry gets a new one.")
    max_response_bytes: int = Field(
        1_048_576, gt=0, strict=True,
        description="openai: largest response body read (bytes); a larger one (by its Content-Length, or while "
        "it streams) is an error answer, not retried.")
    max_retries: int = Field(4, ge=0, description="openai: retries on timeouts, 429 and 5xx (exponential back-off).")
    backoff_s: float = Field(1.0, ge=0, description="openai: first back-off delay; doubles per retry.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(128, gt=0, description="openai/transformers: answer length cap.")
    device: str = Field("auto", description="transformers: auto, cpu, cuda, …")
    batch_size: int = Field(
        4, gt=0, description="transformers: prompts (grid) or images (per_image) per generate() call.")
    min_iou: float = Field(
        0.2, ge=0, le=1, description="dissection: below this best IoU the answer is 'No visual concept'."
    )
    min_enrichment: float = Field(
        2.0, ge=1, description="dissection: below this peak-word enrichment the answer is 'No textual concept'."
    )
    transformers: TransformersExplainerConfig = Field(
        default_factory=TransformersExplainerConfig, description="transformers: grid or per-image prompting."
    )

    @model_validator(mode="after")
    def _greedy_per_image(self) -> "ExplainerConfig":
        if self.transformers.mode == "per_image" and self.temperature > 0:
            raise ValueError(
                f"explainer.temperature is {self.temperature}, but explainer.transformers.mode 'per_image' decodes "
                "greedily (its answers are combined by a deterministic rule): set explainer.temperature: 0")
        return self


class EmbeddersConfig(_Section):
    """Image–text and text–text embedders used to score concepts (the `concept_scores` stage)."""

    image_text: list[str] = Field(default_factory=list, description="CLIP/ALIGN ids or local folders.")
    text: str | None = Field(None, description="Sentence embedder id or folder; None: the first image_text model's "
                             "text tower.")
    blur_radius: float = Field(5.0, ge=0)
    text_window: int = Field(5, ge=0, description="Tokens each side of the peak for textual scoring (before it "
                             "only, with text_window_context: before).")
    text_window_context: Literal["around", "before"] = Field(
        "around", description="The tokens textual scoring embeds with the peak: around (text_window each side, as "
        "in the method) or before (the text_window tokens before the peak, and the peak: a causal model's activation "
        "at a token depends on nothing after it, and an embedder that pools the last token then reads the peak).")
    device: str = Field("auto", description="auto, cpu, cuda, …")
    batch_size: int = Field(64, gt=0)


class CheckpointsConfig(_Section):
    """Where new checkpoints of the VLM appear; `checkpoint_sensor` re-runs the pipeline on each one.

    The checkpoint is kept out of the partition key (design guide): it is the observable source
    asset `vlm_checkpoint`, whose data version is the checkpoint's revision or content stamp.
    """

    watch: Literal["folder", "hf_repo"] = Field(
        description="folder: a local folder whose subfolders (or itself) are save_pretrained checkpoints; "
        "hf_repo: a Hugging Face model repo whose branch `revision` is followed."
    )
    location: str = Field(description="folder: an absolute path; hf_repo: a hub repo id (owner/name).")
    revision: str = Field("main", description="hf_repo: the branch or tag to follow.")
    pattern: str = Field("*", description="folder: glob of checkpoint subfolder names, e.g. 'checkpoint-*'.")
    order: Literal["name", "mtime"] = Field(
        "name",
        description="folder: newest = last in natural name order (checkpoint-900 < checkpoint-1000) or the "
        "most recently modified.",
    )
    settle_s: float = Field(
        60.0, ge=0,
        description="folder: a checkpoint counts only once none of its files changed for this long "
        "(a trainer may still be writing it).",
    )
    interval_s: int = Field(300, ge=1, description="Seconds between two looks of the sensor.")
    cron: str | None = Field(
        None,
        description="Schedule option: look only at these cron times (5 fields, e.g. '0 3 * * *' for 03:00 daily) "
        "instead of every interval_s.",
    )
    timezone: str = Field("UTC", description="Time zone of `cron`.")
    enabled: bool = Field(
        False,
        description="Start the sensor switched on; otherwise turn it on in the UI (Automation) or with "
        "`dagster sensor start checkpoint_sensor`.",
    )

    @model_validator(mode="after")
    def _location(self) -> "CheckpointsConfig":
        if self.watch == "folder":
            expanded = os.path.expanduser(self.location)
            if not os.path.isabs(expanded):
                raise ValueError(
                    f"checkpoints.location {self.location!r} must be an absolute folder path when watch is 'folder'"
                )
            object.__setattr__(self, "location", expanded)
        elif "/" not in self.location or self.location.startswith(("/", ".")):
            raise ValueError(f"checkpoints.location {self.location!r}: watch 'hf_repo' needs a hub repo id, owner/name")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError(f"checkpoints.cron {self.cron!r}: write 5 cron fields, e.g. '0 3 * * *'")
        return self


class ScoresConfig(_Section):
    """How concepts are scored and latents labelled (the `concept_scores` and `report` stages)."""

    visual_threshold: float = Field(
        0.75, ge=0, le=1, description="A visual concept is aligned when its visual score (AUROC of the "
        "concept's image-text cosine on the latent's top views vs control views: random images with the same "
        "masks; 0.5 = chance) is at least this. Profiles choose it on a calibration world, never the evaluated one.")
    textual_threshold: float = Field(
        0.75, ge=0, le=1, description="A textual concept is aligned when its textual score (AUROC of the "
        "concept's cosine with the latent's peak windows vs windows around random tokens of other samples; "
        "0.5 = chance) is at least this. Profiles choose it on a calibration world, never the evaluated one.")
    visual_controls: int = Field(
        20, ge=2, description="Visual score: control views per latent (random dataset images, not among its top "
        "images, each with one of its top images' patch masks transplanted and blurred the same way).")
    textual_controls: int = Field(
        50, ge=1, description="Textual score: control windows per latent (around random eligible text tokens of "
        "samples other than its top texts').")
    baseline_draws: int = Field(
        30, ge=1, description="Random-image / random-window baselines (visual_score_random, textual_score_random): "
        "draws of random stand-ins for the latent's top examples, scored like them and averaged.")
    agreement: float = Field(
        0.8, ge=-1, le=1, description="Visual and textual concepts agree (-> multimodal) when equal, one contains "
        "the other's words, or their text embeddings have at least this cosine.")
    ablation: list[float] = Field(
        default_factory=lambda: [0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
        description="Thresholds swept in the report (both thresholds set to each value; AUROC scale, 0.5 = chance).")
    gt_auroc: float = Field(0.9, gt=0.5, le=1, description="Ground truth: AUROC a latent must reach to be grounded.")
    gt_precision: float = Field(
        0.8, gt=0, le=1, description="Ground truth: a concept is also grounded when at least this share of the "
        "latent's strong tokens (see gt_strong_fraction) show it (with gt_min_firing and gt_min_lift).")
    gt_strong_fraction: float = Field(
        0.5, gt=0, le=1, description="Ground truth: a token is a strong activation of a latent when its activation "
        "is at least this fraction of the latent's largest activation in that modality.")
    gt_min_firing: int = Field(
        20, ge=1, description="Ground truth: strong tokens a latent needs in a modality for the precision rule.")
    gt_min_lift: float = Field(
        2.0, ge=1, description="Ground truth: the precision rule also needs precision ≥ this × the concept's share "
        "of the population (background covers most patches: any latent's strong patches are mostly background).")
    gt_min_positive: int = Field(
        20, ge=1, description="Ground truth: a concept is measured only with at least this many positive and "
        "negative tokens.")
    gt_census_aurocs: list[float] = Field(
        default_factory=lambda: [0.8, 0.9, 0.95],
        description="Ground truth: AUROC thresholds at which the report also shows the ground-truth census.")
    visual_population_threshold: float = Field(
        0.0, ge=0, le=1, description="Label gate: a visual concept is aligned only when it also detects where the "
        "latent fires across the dataset — AUROC of cos(concept, whole image) for the images the latent fires "
        "strongly on, over population_samples samples — at least this (0: no gate). Chosen on a calibration world.")
    textual_population_threshold: float = Field(
        0.0, ge=0, le=1, description="Label gate: as visual_population_threshold, for the textual concept against "
        "the words of the text tokens the latent fires strongly on (0: no gate).")
    textual_coverage_threshold: float = Field(
        0.0, ge=0, le=1, description="Label gate, second route for text: the textual concept also passes when the "
        "latent's activation separates the tokens showing the concept from all others with at least this AUROC "
        "(coverage; textual_population_coverage), over at least population_min_positives such tokens (0: off).")
    textual_precision_threshold: float = Field(
        0.0, ge=0, le=1, description="Label gate, third route for text: the textual concept also passes when at "
        "least this share of the tokens the latent fires strongly on show it (its word, or one of a phrase's words; "
        "textual_population_precision), over at least population_min_positives such tokens (0: off).")
    textual_coverage_alone_threshold: float = Field(
        0.0, ge=0, le=1, description="Label rule, text: the textual concept is also aligned — without the contrast "
        "score — when its coverage (textual_population_coverage: the latent's activation ranks the tokens showing "
        "the concept above all others) is at least this, over at least population_min_positives such tokens. "
        "For a latent that fires weakly on every occurrence of a word and hardest elsewhere, its top texts peak "
        "elsewhere, so a contrast on them cannot see the word; coverage over the population can (0: off).")
    population_min_positives: int = Field(
        20, ge=1, description="Label gate: a population detection counts only with at least this many items the "
        "latent fires strongly on (fewer cannot support an AUROC; the latent is then not aligned in that modality).")
    select_by_detection: bool = Field(
        False, description="Concept selection: replace each concept by the reading of the explainer's answer (its "
        "qualifying n-grams, the phrases inside the concept) whose population detection is best, the simplest "
        "within selection_tolerance (explain-simulate-score style; msae.score.population). The explainer's own "
        "stays in *_concept_proposed. Off: the explainer's concept, as in the method.")
    selection_tolerance: float = Field(
        0.02, ge=0, le=1, description="Concept selection: readings within this much of the best detection AUROC "
        "count as tied and the one with the fewest words wins.")
    selection_population_words: int = Field(
        0, ge=0, description="Concept selection, textual: also offer as readings the this-many most frequent words "
        "among the tokens the latent fires strongly on over the detection population (the 'top tokens' list of "
        "SAE dashboards; 0: off). A latent whose few largest activations sit on one word (its top texts all "
        "peak there) but whose strong activations mostly sit on another is then named by the latter when it "
        "detects better. Only where the explainer proposed a textual concept.")
    selection_evidence_words: bool = Field(
        False, description="Concept selection, textual: also offer as readings the words the latent is active on "
        "in its top texts (the explainer.examples texts the explainer was shown). Only where the explainer "
        "proposed a textual concept.")
    textual_selection_measure: Literal["similarity", "coverage"] = Field(
        "similarity", description="Concept selection, textual: what 'detects best' means for a textual reading. "
        "'similarity': the AUROC of the text embedder's similarity of each token's word to the reading, for the "
        "latent's strong tokens against the rest (textual_population_auroc). 'coverage': the AUROC of the "
        "latent's own activation for the tokens whose word is the reading (or one of its words) against all "
        "other tokens (textual_population_coverage) — the reading that best predicts where the latent fires, "
        "as in explain-simulate-score; it needs no embedder, so a name the embedder separates poorly from its "
        "neighbours (a function word, '<answer position>') is judged by exact matches.")
    population_samples: int = Field(
        2000, gt=0, description="Population detection: samples (a seeded subset) whose images and text tokens are "
        "the detection population.")
    population_strong_fraction: float = Field(
        0.5, gt=0, le=1, description="Population detection: an item is a positive when the latent's activation on it "
        "is at least this fraction of its largest one over the population, in that modality.")
    bootstrap: int = Field(1000, gt=0, description="Bootstrap resamples for confidence intervals.")
    seed: int = 0
    detection_negatives: int = Field(
        10, ge=1, description="Embedding detection: non-activating examples per latent (other latents' top ones).")
    judge: Literal["none", "openai"] = Field(
        "none", description="LLM-judged detection and fuzzing (Delphi-style) through an OpenAI-compatible "
        "server: none (offline default) or openai (uses judge_model / judge_base_url, else the explainer's).")
    judge_model: str | None = Field(None, description="judge: model name; None: explainer.model.")
    judge_base_url: str | None = Field(None, description="judge: server URL; None: explainer.base_url.")
    judge_examples: int = Field(
        10, ge=2, description="judge: examples per prompt (half activating across quantiles, half not).")


class ControlsConfig(_Section):
    """Controls run beside the pipeline (the report shows them next to the real results)."""

    random_sae: bool = Field(
        True, description="Run latent stats, concepts, scores and ground truth on a random-weight SAE of each "
        "trained SAE's shape (msae.controls); its labels should collapse to the prior.")
    seed: int = Field(0, description="Seed of the random SAEs.")
    latents: int | None = Field(
        128, gt=0, description="Latents of each random SAE explained (a seeded sample; None: all).")
    dissection_oracle: bool = Field(
        True, description="Where annotations exist, also explain the real SAE's latents with the dissection backend "
        "(it reads the ground-truth masks: an oracle row in the report, not a method).")

    @property
    def enabled(self) -> bool:
        return self.random_sae or self.dissection_oracle


class WorldSeedsConfig(_Section):
    """The synthetic world's disjoint seeds: what trained the VLM, what calibrates, what evaluates.

    Thresholds and rules are chosen on the calibration world (``msae calibrate``) and applied
    unchanged to the evaluation world, which is the embedded run's ``dataset.shapes.seed``.
    """

    vlm_training: list[int] = Field([0, 2, 3], description="World seeds the embedded VLM was trained on.")
    vlm_validation: list[int] = Field([98, 99], description="World seeds that watched and evaluated its training.")
    calibration: int = Field(4321, description="World seed on which thresholds and rules are chosen.")
    evaluation: int = Field(1234, description="World seed of the embedded run; nothing is tuned on it.")

    @model_validator(mode="after")
    def _disjoint(self) -> "WorldSeedsConfig":
        groups = {"vlm_training": set(self.vlm_training), "vlm_validation": set(self.vlm_validation),
                  "calibration": {self.calibration}, "evaluation": {self.evaluation}}
        names = list(groups)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if groups[a] & groups[b]:
                    raise ValueError(f"world_seeds.{a} and world_seeds.{b} share seeds {sorted(groups[a] & groups[b])}")
        return self


class RuntimeConfig(_Section):
    """How each step process uses the CPU (:mod:`msae.runtime`). Speed only, never results: no stage's
    code version reads this section, so changing it recomputes nothing."""

    threads: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = Field(
        "auto",
        description="torch CPU threads per step process (torch.set_num_threads). auto: OMP_NUM_THREADS (else "
        "MKL_NUM_THREADS) when set, else the cores this process may use divided by step_concurrency. A number "
        "wins over both.",
    )
    interop_threads: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = Field(
        "auto",
        description="torch's inter-op pool (torch.set_num_interop_threads); auto: as many as threads. torch "
        "only takes it before its first parallel work: later it is left as it is (logged).",
    )
    step_concurrency: Annotated[int, Field(ge=1, strict=True)] | Literal["auto"] = Field(
        "auto",
        description="Step processes that may run side by side on this machine (threads auto shares the cores "
        "among them). auto: MSAE_STEP_CONCURRENCY when set, else what the Dagster run's executor allows "
        "(in_process: 1; multiprocess: max_concurrent, by default the CPU count, at most the run's steps), else 1. "
        "Several runs at once (UI backfills): set it to their number.",
    )

    @field_validator("threads", "interop_threads", "step_concurrency", mode="before")
    @classmethod
    def _count_or_auto(cls, v: Any, info: Any) -> Any:
        """One message a user can act on (instead of one per member of the union)."""
        if isinstance(v, str) and v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"must be a whole number >= 1 or 'auto' (e.g. runtime.{info.field_name}: 2)")
        return v


class MsaeConfig(_Section):
    """The whole pipeline."""

    store: str = Field(description="Output root: local folder or fsspec URL (s3://, gs://, memory://).")
    dataset: DatasetConfig
    model: ModelConfig
    layers: list[StrictInt] = Field(min_length=1, description="Decoder layers (0-based) whose output is read.")
    widths: list[StrictInt] = Field(min_length=1, description="SAE widths (number of latents).")
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    sae: SAEConfig = Field(default_factory=SAEConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)
    explainer: ExplainerConfig = Field(default_factory=ExplainerConfig)
    embedders: EmbeddersConfig = Field(default_factory=EmbeddersConfig)
    scores: ScoresConfig = Field(default_factory=ScoresConfig)
    checkpoints: CheckpointsConfig | None = Field(
        None, description="Watch for new VLM checkpoints and re-run on each (see docs/paper_scale.md); None: off."
    )
    controls: ControlsConfig = Field(default_factory=ControlsConfig)
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="CPU threads per step process (speed only; in no code version).")
    world_seeds: WorldSeedsConfig | None = Field(
        None, description="shapes only: the world's training / calibration / evaluation seeds (checked disjoint).")

    @model_validator(mode="after")
    def _world_seed_role(self) -> "MsaeConfig":
        ws, shapes = self.world_seeds, self.dataset.shapes
        if ws is None or shapes is None:
            return self
        if shapes.seed not in (ws.calibration, ws.evaluation):
            raise ValueError(f"dataset.shapes.seed {shapes.seed} is neither world_seeds.evaluation ({ws.evaluation}) "
                             f"nor world_seeds.calibration ({ws.calibration})")
        return self

    @model_validator(mode="after")
    def _dissection_needs_annotations(self) -> "MsaeConfig":
        """The dissection explainer reads the annotation masks; without them the concepts stage could
        only fail, after the VLM pass and the SAEs. (The oracle control and ground truth just skip.)"""
        if self.explainer.backend == "dissection" and not self.dataset.has_annotations:
            default = "" if "backend" in self.explainer.model_fields_set else " (the default)"
            raise ValueError(
                f"explainer.backend 'dissection'{default} reads ground-truth patch annotations, which "
                f"dataset.kind {self.dataset.kind!r} does not have (only 'shapes' does): set explainer.backend to "
                "'openai' (with explainer.model and explainer.base_url) or 'transformers'")
        return self

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if any(layer < 0 for layer in v):
            raise ValueError(f"layers must be >= 0 (0 is the first decoder layer), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"layers has duplicates: {v}")
        return sorted(v)

    @field_validator("widths")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w <= 0 for w in v):
            raise ValueError(f"widths must be positive, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"widths has duplicates: {v}")
        return sorted(v)

    @model_validator(mode="after")
    def _k_fits_widths(self) -> "MsaeConfig":
        """Each SAE keeps ``sae.k`` of its ``width`` latents active, so k can never exceed a width."""
        small = [w for w in self.widths if w < self.sae.k]
        if small:
            raise ValueError(f"sae.k: {self.sae.k} active latents per token is more than widths {small} have; "
                             f"choose sae.k <= {min(self.widths)} (the smallest width) or drop those widths")
        return self


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the offending key."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid msae config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg, given = e["msg"], e.get("input")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see README 'Configuration')"
        elif e["type"] == "int_type":  # strict integers: say what was given instead (true, 2.0, "8")
            msg = f"must be a whole number (e.g. 8), not {type(given).__name__}"
        if e["type"] != "extra_forbidden" and isinstance(given, (bool, int, float, str)):
            msg += f" (got {given!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>", base: Path | None = None) -> MsaeConfig:
    """Validate a raw mapping; errors name every bad key by its dotted path.

    ``base``: relative local paths resolve against it (see :func:`resolve_local_paths`) before the
    checks that read the model's own config (:func:`check_against_model`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid msae config ({source}): top level must be a mapping")
    try:
        cfg = MsaeConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    if base is not None:
        cfg = resolve_local_paths(cfg, base)
    check_against_model(cfg, source)
    return cfg


def _local_model_config(model: ModelConfig) -> tuple[dict[str, Any], Path] | None:
    """The model's config.json and its folder, if readable without the network: a local folder or the HF cache.

    Never downloads: a hub id not in the cache gives None (the extraction stage checks it then)."""
    folder = Path(model.name_or_path).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model.name_or_path, "config.json", revision=model.revision)
        except Exception as err:  # noqa: BLE001 - not a repo id, no cache, …: nothing to check against
            logger.debug("model %r: no cached config.json (%s)", model.name_or_path, err)
            return None
        if not isinstance(cached, str):
            logger.debug("model %r: config.json not in the local cache; depth not checked", model.name_or_path)
            return None
        path = Path(cached)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.debug("model %r: config.json unreadable (%s); depth not checked", model.name_or_path, err)
        return None
    return (data, path.parent) if isinstance(data, dict) else None


def model_depth(model: ModelConfig) -> int | None:
    """Decoder layers of the model's language model (``text_config.num_hidden_layers``), if known locally."""
    found = _local_model_config(model)
    if found is None:
        return None
    data, folder = found
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    n = text.get("num_hidden_layers")
    if n is None:  # saved as a diff against the defaults: let transformers fill them in (local files only)
        try:
            from transformers import AutoConfig

            hf = AutoConfig.from_pretrained(folder, local_files_only=True)
            n = getattr(getattr(hf, "text_config", None) or hf, "num_hidden_layers", None)
        except Exception as err:  # noqa: BLE001 - an unusual config: the stage checks the layers instead
            logger.debug("model %r: num_hidden_layers unknown (%s)", model.name_or_path, err)
            return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_against_model(cfg: MsaeConfig, source: str = "<dict>") -> None:
    """``layers`` within the model's depth, when its config can be read locally (never downloads)."""
    n = model_depth(cfg.model)
    if n is None:
        return
    bad = [layer for layer in cfg.layers if layer >= n]
    if bad:
        shown = bad[0] if len(bad) == 1 else bad
        raise ConfigError(
            f"invalid msae config ({source}):\n  layers: {shown} is beyond the model's {n} layers (0–{n - 1}); "
            f"choose layers < {n} (model.name_or_path: {cfg.model.name_or_path})"
        )


def profile_text(name: str) -> str:
    if name not in PROFILES:
        raise ConfigError(f"MSAE_PROFILE={name!r} is not a built-in profile; choose one of {PROFILES}")
    return resources.files("msae.profiles").joinpath(f"{name}.yaml").read_text()


def load_config(path: str | os.PathLike | None = None, profile: str | None = None) -> MsaeConfig:
    """Load from an explicit path/profile, else from MSAE_CONFIG / MSAE_PROFILE (see module doc)."""
    path = path or os.environ.get("MSAE_CONFIG") or None
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (from MSAE_CONFIG or the path given)")
        text, source = p.read_text(), str(p)
    else:
        name = profile or os.environ.get("MSAE_PROFILE") or "embedded"
        text, source = profile_text(name), f"profile {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {source} is not valid YAML: {err}") from None
    store_override = os.environ.get("MSAE_STORE")
    if store_override and isinstance(data, dict):
        data["store"] = store_override
    base = Path(path).resolve().parent if path else PROJECT_ROOT
    return parse_config(data, source, base)


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _is_url(ref: str) -> bool:
    return "://" in ref


def resolve_local_paths(cfg: MsaeConfig, base: Path) -> MsaeConfig:
    """Make relative local paths absolute against ``base`` so every process sees the same files.

    ``store`` is always a path or URL. ``model.name_or_path`` and ``dataset.path``/``name`` may be
    hub ids, so they are only resolved when the relative path exists under ``base``.
    """
    updates: dict[str, Any] = {}
    if not _is_url(cfg.store) and not Path(cfg.store).is_absolute():
        updates["store"] = str((base / cfg.store).resolve())

    def existing(ref: str | None) -> str | None:
        if ref and not _is_url(ref) and not Path(ref).is_absolute() and (base / ref).exists():
            return str((base / ref).resolve())
        return None

    if (m := existing(cfg.model.name_or_path)) is not None:
        updates["model"] = cfg.model.model_copy(update={"name_or_path": m})
    ds_updates = {k: v for k in ("path", "name", "image_root") if (v := existing(getattr(cfg.dataset, k)))}
    if ds_updates:
        updates["dataset"] = cfg.dataset.model_copy(update=ds_updates)
    return cfg.model_copy(update=updates) if updates else cfg
