"""The `concepts` stage as a plain function: evidence → explainer requests → proposals.parquet.

Per explained latent and prompting mode (``masked``: only active patches shown, the method;
``whole``: whole images, the baseline of earlier SAE methods) one visual and one textual concept.
The textual prompt does not depend on how images are shown beyond marginal context, so it is asked
once per latent (with the masked images) and shared by both modes' rows.
Output ``<store>/concepts/layer=<L>/width=<W>/proposals.parquet`` (columns in ``PROPOSAL_SCHEMA``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from msae.config import ExplainerConfig, ModelConfig, MsaeConfig
from msae.data.images import DEFAULT_LIMITS, ImageLimits
from msae.explain.base import ExplainAnswer, ExplainExample, Explainer, ExplainRequest

log = logging.getLogger(__name__)

PROPOSALS = "proposals.parquet"
PROPOSAL_SCHEMA = {
    "latent": pl.Int32, "prompting": pl.Utf8,
    "visual_concept": pl.Utf8, "textual_concept": pl.Utf8,
    "visual_status": pl.Utf8, "textual_status": pl.Utf8,
    "visual_raw": pl.Utf8, "textual_raw": pl.Utf8,
    "explainer": pl.Utf8, "visual_prompt_version": pl.Utf8, "textual_prompt_version": pl.Utf8,
    "visual_candidates": pl.List(pl.Utf8), "textual_candidates": pl.List(pl.Utf8),
}
RUNTIME_ONLY = {"concurrency", "timeout_s", "max_retries", "backoff_s", "batch_size", "device", "api_key_env",
                "max_response_bytes"}
"""Explainer settings that change how answers are fetched, not what they are: left out of versions."""


def concepts_folder(layer: int, width: int) -> str:
    return f"concepts/layer={layer}/width={width}"


def explainer_model(cfg: ExplainerConfig, model: ModelConfig | None) -> dict[str, Any]:
    """The transformers backend's model: ``explainer.model``, else the analysed VLM itself (with
    the pipeline's revision, dtype and trust_remote_code). ``ref`` is None when neither is known."""
    if cfg.model or model is None:
        return {"ref": cfg.model, "revision": None, "dtype": "auto", "trust_remote_code": False}
    return {"ref": model.name_or_path, "revision": model.revision, "dtype": model.dtype,
            "trust_remote_code": model.trust_remote_code}


def explainer_fingerprint(cfg: ExplainerConfig, model: ModelConfig | None = None) -> dict[str, Any]:
    """What the proposals depend on: settings that shape answers, the prompt templates' text and,
    for the transformers backend, the identity of the explainer's model (``model``: the pipeline's
    VLM, which an unset ``explainer.model`` stands for)."""
    settings = cfg.model_dump(mode="json", exclude=RUNTIME_ONLY)
    if cfg.backend != "transformers":
        settings.pop("transformers")  # only that backend reads it
    if cfg.backend == "dissection":
        return settings
    from msae.explain.prompts import load_templates

    templates = load_templates(cfg.prompt_dir)
    out = {**settings, "prompt_dir": None,  # where the templates live does not matter, their text does
           "templates": {"/".join(k): t.version for k, t in sorted(templates.items())}}
    if cfg.backend == "transformers":
        from msae.explain.combine import RULE_VERSION
        from msae.vlm.identity import model_identity

        out["combine_rule"] = RULE_VERSION
        m = explainer_model(cfg, model)
        out["model_identity"] = model_identity(m["ref"], m["revision"]) if m["ref"] else None
    return out


def make_explainer(cfg: MsaeConfig, store: Any, layer: int, width: int) -> Explainer:
    """The configured backend; API-backed ones get a per-partition answer cache."""
    e = cfg.explainer
    if e.backend == "dissection":
        return dissection_from_store(e, store)
    from msae.explain.cache import ExplanationCache

    cache = ExplanationCache(store, f"{concepts_folder(layer, width)}/_cache")
    if e.backend == "openai":
        from msae.explain.openai_backend import OpenAIExplainer

        return OpenAIExplainer(e, cache)
    from msae.explain.transformers_backend import TransformersExplainer

    m = explainer_model(e, cfg.model)
    return TransformersExplainer(e, cache, model=m["ref"], local_files_only=cfg.model.local_files_only,
                                 revision=m["revision"], dtype=m["dtype"], trust_remote_code=m["trust_remote_code"])


def dissection_from_store(cfg: ExplainerConfig, store: Any) -> Explainer:
    from pathlib import PurePath

    from msae.explain.dissection import AnnotationGrids, DissectionExplainer, word_shares
    from msae.latents.render import display_tokens

    if not store.exists("world", "annotations.parquet"):
        raise ValueError("explainer.backend 'dissection' needs ground-truth patch annotations "
                         "(<store>/world/annotations.parquet), which only the `shapes` dataset has: "
                         "use explainer.backend 'openai' or 'transformers' for other datasets")
    grids = AnnotationGrids.from_table(store.read_parquet("world", "annotations.parquet"))
    samples = store.read_parquet(store.SAMPLES)
    sample_image = {sid: PurePath(img).stem for sid, img in zip(samples["sample_id"], samples["image"])}
    tokens = store.read_parquet(store.TOKENS).filter(
        (pl.col("modality") == "text") & (pl.col("role").fill_null("") != "template"))
    shares = word_shares(tokens, display_tokens(tokens["token"].to_list()))
    return DissectionExplainer(cfg, grids, sample_image, shares)


# --- requests ------------------------------------------------------------------------------------
def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _text_example(t: Any) -> ExplainExample:
    """A top text with its evidence peak marked (see :func:`build_requests`)."""
    from msae.latents.render import mark_peak, peak_index

    if not t.pieces:
        return ExplainExample(t.sample_id, None, "", peak_token=None)
    peak = t.peak if 0 <= t.peak < len(t.pieces) else peak_index(t.activations)
    acts = np.zeros(len(t.pieces), dtype=np.float32)
    acts[peak] = 1.0
    display = t.display()  # the answer position reads as its name (msae.latents.answer_position)
    return ExplainExample(t.sample_id, None, mark_peak(t.pieces, acts, display=display),
                          peak_token=display[peak].strip())


def build_requests(evidence: dict[int, Any], cfg: ExplainerConfig,
                   image_limits: ImageLimits = DEFAULT_LIMITS) -> list[ExplainRequest]:
    """Visual requests per prompting mode and one textual request per latent.

    A top text's marked word is its evidence peak (which honours template eligibility, as on the
    cards), so the word the explainer's view marks and ``peak_token`` are always the same token.
    """
    from msae.data.images import load_image_rgb
    from msae.latents.render import mask_inactive

    requests = []
    # an image often tops several latents; read under the dataset's limits, as extraction read it
    image = functools.lru_cache(maxsize=512)(functools.partial(load_image_rgb, limits=image_limits))
    for latent, ev in sorted(evidence.items()):
        images = ev.images[: cfg.examples]
        loaded = [image(ex.image_path) for ex in images]
        for prompting in cfg.prompting:
            examples = tuple(
                ExplainExample(ex.sample_id,
                               _png(mask_inactive(img, ex.patch_activations, ex.active_threshold)
                                    if prompting == "masked" else img),
                               f"Question: {ex.question} Answer: {ex.answer}",
                               np.where(ex.patch_activations > ex.active_threshold, ex.patch_activations, 0.0))
                for ex, img in zip(images, loaded))
            if examples:
                requests.append(ExplainRequest(latent, "visual", prompting, examples))
        texts = ev.texts[: cfg.examples]
        t_examples = tuple(_text_example(t) for t in texts)
        if t_examples:
            requests.append(ExplainRequest(latent, "textual", cfg.prompting[0], t_examples))
    return requests


def proposals_frame(latents: Sequence[int], answers: Sequence[ExplainAnswer], cfg: ExplainerConfig,
                    explainer: Explainer) -> pl.DataFrame:
    """One row per latent × prompting; missing evidence of a kind gives status 'no_examples'."""
    visual = {(a.latent, a.prompting): a for a in answers if a.kind == "visual"}
    textual = {a.latent: a for a in answers if a.kind == "textual"}
    rows = []
    for latent in latents:
        t = textual.get(latent)
        for prompting in cfg.prompting:
            v = visual.get((latent, prompting))
            rows.append({
                "latent": latent, "prompting": prompting,
                "visual_concept": v.concept if v else None, "textual_concept": t.concept if t else None,
                "visual_status": v.status if v else "no_examples", "textual_status": t.status if t else "no_examples",
                "visual_raw": v.raw if v else None, "textual_raw": t.raw if t else None,
                "explainer": explainer.name,
                "visual_prompt_version": explainer.version("visual", prompting),
                "textual_prompt_version": explainer.version("textual", cfg.prompting[0]),
                "visual_candidates": list(v.candidates) if v else [],
                "textual_candidates": list(t.candidates) if t else [],
            })
    return pl.DataFrame(rows, schema=PROPOSAL_SCHEMA)


FAILURE_EXAMPLES = 5
"""Failed requests named (latent, kind, prompting, reason) in the metadata; the rest are only counted."""


def failure_summary(requests: Sequence[ExplainRequest], answers: Sequence[ExplainAnswer]) -> dict[str, Any]:
    """Failed and missing explainer requests, for the stage's metadata and its check.

    ``incomplete`` > 0 keeps the manifest from being reused (:func:`msae.manifest.current_manifest`),
    so a rerun asks again; answers that arrived are cached, so it re-sends only the failed ones.
    A request without an answer (a backend that dropped it) counts as failed too.
    """
    answered = {(a.latent, a.kind, a.prompting) for a in answers}
    failed = [(a.latent, a.kind, a.prompting, a.raw or "unknown") for a in answers if a.status == "error"]
    failed += [(r.latent, r.kind, r.prompting, "no answer") for r in requests
               if (r.latent, r.kind, r.prompting) not in answered]
    reasons: dict[str, int] = {}
    for *_, reason in failed:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "explainer_failures": len(failed), "incomplete": len(failed),
        "explainer_failure_reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "explainer_failure_examples": [f"latent {lat} {kind}/{prompting}: {reason}"
                                       for lat, kind, prompting, reason in sorted(failed)[:FAILURE_EXAMPLES]],
    }


def run_concepts(cfg: MsaeConfig, store: Any, layer: int, width: int) -> tuple[str, dict[str, Any]]:
    """Propose concepts for every explained latent; returns (data version, metadata).

    Failed requests (status 'error') leave rows without a concept and make the metadata's
    ``incomplete`` the number of them: the stage is then not reused, and the next run re-sends them.
    """
    from msae.latents.evidence import load_evidence
    from msae.latents.stage import STATS, latents_folder

    stats = store.read_parquet(latents_folder(layer, width), STATS)
    latents = stats.filter(pl.col("explained"))["latent"].to_list()
    evidence = load_evidence(store, layer, width, latents)
    explainer = make_explainer(cfg, store, layer, width)
    requests = build_requests(evidence, cfg.explainer, ImageLimits.from_config(cfg.dataset))
    answers = explainer.explain(requests)
    frame = proposals_frame(latents, answers, cfg.explainer, explainer)
    folder = concepts_folder(layer, width)
    store.write_parquet(frame, folder, PROPOSALS)
    digest = hashlib.sha256(store.read_bytes(folder, PROPOSALS)).hexdigest()[:16]
    status = frame.group_by("prompting", "visual_status").len().sort("prompting", "visual_status")
    failures = failure_summary(requests, answers)
    if failures["explainer_failures"]:
        log.warning("concepts[layer=%d/width=%d]: %d of %d explainer requests failed (%s); the stage is "
                    "recorded as incomplete and the next run re-sends only those", layer, width,
                    failures["explainer_failures"], len(requests), failures["explainer_failure_reasons"])
    meta = {
        "latents": len(latents), "requests": len(requests), "explainer": explainer.name,
        "errors": failures["explainer_failures"], **failures,
        "proposals_path": store.url(folder, PROPOSALS),
        **{f"visual_{r['prompting']}_{r['visual_status']}": r["len"] for r in status.iter_rows(named=True)},
        **{f"textual_{k}": int(v) for k, v in zip(*np.unique(
            frame.filter(pl.col("prompting") == cfg.explainer.prompting[0])["textual_status"].to_numpy(),
            return_counts=True))},
    }
    return digest, meta
