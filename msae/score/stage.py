"""The `concept_scores` stage as a plain function: proposals + evidence + embedders → concepts.parquet.

One row per explained latent × prompting mode (``masked`` = the method, ``whole`` = the baseline)
in ``<store>/concepts/layer=<L>/width=<W>/concepts.parquet``; columns in ``docs/formats.md``.

Scores are contrastive (``msae.score.quality``). Per latent, its top images' scorer views
(non-active patches blurred) are set against ``scores.visual_controls`` *control views*: random
images of the dataset (not among its top images) carrying its top images' patch masks, blurred the
same way. Its top texts' peak windows are set against ``scores.textual_controls`` windows around
random eligible tokens of other samples, drawn from one partition-wide pool embedded once. Views,
controls and baseline draws are per latent, seeded by ``(scores.seed, latent)``, and shared by both
prompting modes, so their scores are comparable; every view is embedded once per image–text model.
Where the dataset has annotations, ``ground_truth.parquet`` beside it holds the activation-only
ground-truth labels.

Scoring (:func:`alignment_scores`: embeddings → score columns) is split from labelling
(:func:`msae.score.classify.label_frame`: thresholds and agreement → ``concepts_agree``,
``modality``). :func:`run_concept_scores` caches the score frame, the judge's scores and ground
truth under keys that leave the labelling settings out, so after a threshold edit the stage
re-runs (its code version keeps the thresholds, so Dagster marks it and its readers stale) but
only relabels.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from msae.config import MsaeConfig
from msae.manifest import layer_width_folder
from msae.score.classify import LABEL_FIELDS, label_frame
from msae.score.quality import (auroc, baseline_score, candidate_concepts, concept_category, contrastive_score,
                                draw_excluding, mask_balanced_split, normalise_concept, visual_image_scores,
                                window_baseline_draws)

log = logging.getLogger(__name__)

CONCEPTS = "concepts.parquet"
IMAGE_CHUNK = 256
"""Images blurred/loaded and embedded per step."""
IMAGE_CACHE = 512
"""Decoded images kept (views are built in image order, so each image is decoded about once)."""
GROUND_TRUTH = "ground_truth.parquet"
CONTROL_WINDOWS = 512
"""Random text windows in a partition's control pool (at least 4 × ``scores.textual_controls``)."""
CONTROL_SAMPLES = 512
"""Samples whose text tokens are read (seeded subset) to build that pool from tokens.parquet."""


@dataclass(frozen=True)
class ControlPools:
    """Where controls are drawn from: dataset images and windows around random text tokens."""

    images: list[str]
    """Unique image paths (or URLs)."""
    windows: list[tuple[str, str]]
    """(sample_id, window text)."""


def load_embedders(cfg: MsaeConfig) -> tuple[list[Any], Any]:
    """(image–text embedders, text embedder); the text embedder defaults to the first one's text tower."""
    from msae.embed.embedders import ImageTextEmbedder, TextEmbedder, TextTowerEmbedder

    e = cfg.embedders
    if not e.image_text:
        raise ValueError("embedders.image_text is empty: name at least one CLIP/ALIGN model (hub id or folder)")
    kw = {"device": e.device, "batch_size": e.batch_size, "local_files_only": cfg.model.local_files_only}
    image_text = [ImageTextEmbedder.from_pretrained(ref, **kw) for ref in e.image_text]
    text = TextEmbedder.from_pretrained(e.text, **kw) if e.text else TextTowerEmbedder(image_text[0])
    return image_text, text


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)


def _slug(name: str) -> str:
    return name.rstrip("/").split("/")[-1].replace("-", "_").replace(".", "_")


def before_only(cfg: MsaeConfig) -> bool:
    """Textual windows end at the peak (``embedders.text_window_context: before``)."""
    return cfg.embedders.text_window_context == "before"


def _one_hot(n: int, i: int) -> np.ndarray:
    a = np.zeros(n, np.float32)
    a[i] = 1.0
    return a


def random_windows(texts: Sequence[tuple[str, Sequence[str], np.ndarray]], n: int, size: int,
                   rng: np.random.Generator, answer_index: Sequence[int] | None = None,
                   before_only: bool = False) -> list[tuple[str, str]]:
    """``n`` windows (±``size`` tokens, or ``size`` before, as around a peak) centred on random
    eligible tokens.

    ``texts``: (sample_id, pieces, eligible mask). Centres are drawn uniformly over all eligible
    tokens, without replacement; fewer than ``n`` come back when there are fewer tokens.
    ``answer_index``: per text, the piece that is its answer position (-1: none), shown by its name
    as in the latents' own windows.
    """
    from msae.latents.answer_position import display_words
    from msae.latents.render import display_tokens, peak_window

    where = [(i, p) for i, (_, _, ok) in enumerate(texts) for p in np.flatnonzero(ok)]
    if not where:
        return []
    picks = rng.choice(len(where), size=min(n, len(where)), replace=False)
    out = []
    for k in sorted(picks):
        i, p = where[k]
        sample_id, pieces, _ = texts[i]
        answer = answer_index[i] if answer_index is not None else -1
        display = display_words(display_tokens(list(pieces)), np.arange(len(pieces)) == answer)
        out.append((sample_id, peak_window(list(pieces), _one_hot(len(pieces), int(p)), size=size, display=display,
                                           before_only=before_only)))
    return out


def evidence_pools(evidence: dict[int, Any], latents: Sequence[int], window: int, n_windows: int,
                   rng: np.random.Generator, before_only: bool = False) -> ControlPools:
    """Control pools from the evidence alone: the images of all top examples; windows around random
    tokens of all top texts (any token may be a centre: evidence holds no token roles)."""
    images = list(dict.fromkeys(ex.image_path for lat in latents for ex in evidence[lat].images if ex.image_path))
    by_sample = {t.sample_id: t for lat in latents for t in evidence[lat].texts}
    texts = [(t.sample_id, t.pieces, np.ones(len(t.pieces), bool)) for t in by_sample.values()]
    return ControlPools(images, random_windows(texts, n_windows, window, rng,
                                               [t.answer_index for t in by_sample.values()], before_only))


def store_pools(cfg: MsaeConfig, store: Any, rng: np.random.Generator) -> ControlPools | None:
    """Control pools from the whole dataset: every sample's image; windows around random eligible
    text tokens (not template ones unless ``latents.text_include_template``, but each answer position)
    of a seeded subset of samples, from tokens.parquet (rows pruned by pyarrow). None when the tables
    are missing."""
    from msae.latents.evidence import read_table, resolve_image, sample_texts
    from msae.store import Store

    if not (store.exists(Store.SAMPLES) and store.exists(Store.TOKENS)):
        return None
    samples = read_table(store, Store.SAMPLES, ["image"])
    if samples.height == 0:
        return None
    images = list(dict.fromkeys(resolve_image(store, im) for im in samples["image"].to_list() if im))
    chosen = np.sort(rng.choice(samples.height, size=min(CONTROL_SAMPLES, samples.height), replace=False))
    texts, answers = [], []
    for t in sample_texts(store, chosen.tolist()).values():
        ok = np.ones(len(t.pieces), bool) if cfg.latents.text_include_template else ~t.template
        if t.answer_index >= 0:
            ok[t.answer_index] = True
        texts.append((t.sample_id, t.pieces, ok))
        answers.append(t.answer_index)
    n_windows = max(CONTROL_WINDOWS, 4 * cfg.scores.textual_controls)
    return ControlPools(images, random_windows(texts, n_windows, cfg.embedders.text_window, rng, answers,
                                               before_only(cfg)))


@dataclass(frozen=True)
class _VisualPlan:
    own: np.ndarray
    """Rows of the view embeddings: the latent's top views."""
    controls: np.ndarray
    """Rows of its control views."""
    stand_ins: np.ndarray
    """[draws, n] indices into ``controls``: one control per mask, standing in for the top views."""
    rest: np.ndarray
    """[draws, K - n] indices into ``controls``: that draw's controls."""


@dataclass(frozen=True)
class _TextPlan:
    own: np.ndarray
    """Rows of the own-window embeddings."""
    controls: np.ndarray
    """Rows of the pool-window embeddings."""
    stand_ins: np.ndarray
    """[draws, n] rows of the pool-window embeddings standing in for the top windows."""
    rest: np.ndarray
    """[draws, m] rows of the pool-window embeddings: that draw's controls."""


def _plan_views(cfg: MsaeConfig, evidence: dict[int, Any], latents: Sequence[int],
                pool: list[str]) -> tuple[list[tuple[str, Any]], dict[int, _VisualPlan]]:
    """Every view to embed as (image path, example whose mask it carries), and each latent's plan."""
    s = cfg.scores
    specs: list[tuple[str, Any]] = []
    plans: dict[int, _VisualPlan] = {}
    where = {path: i for i, path in enumerate(pool)}
    for lat in latents:
        top = evidence[lat].images[: cfg.explainer.examples]
        if not top:
            continue
        rng = np.random.default_rng([s.seed, int(lat), 0])
        own_paths = np.array([where[ex.image_path] for ex in top if ex.image_path in where], dtype=np.int64)
        chosen = draw_excluding(len(pool), own_paths, s.visual_controls, rng)
        groups = np.arange(len(chosen)) % len(top)
        own = np.arange(len(specs), len(specs) + len(top))
        specs += [(ex.image_path, ex) for ex in top]
        controls = np.arange(len(specs), len(specs) + len(chosen))
        specs += [(pool[c], top[g]) for c, g in zip(chosen, groups)]
        stand_ins, rest = mask_balanced_split(groups, s.baseline_draws, rng)
        plans[lat] = _VisualPlan(own, controls, stand_ins, rest)
    return specs, plans


def _embed_views(cfg: MsaeConfig, specs: list[tuple[str, Any]], image_text: list[Any],
                 load: Callable[[str], Any]) -> dict[str, np.ndarray]:
    """Blurred views (each spec's image, its example's mask) embedded in image order, in chunks."""
    from msae.latents.render import blur_inactive

    order = sorted(range(len(specs)), key=lambda i: specs[i][0])
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {m.name: [] for m in image_text}
    for i in range(0, len(order), IMAGE_CHUNK):
        views = [blur_inactive(load(specs[j][0]), specs[j][1].patch_activations, radius=cfg.embedders.blur_radius,
                               threshold=specs[j][1].active_threshold) for j in order[i: i + IMAGE_CHUNK]]
        for m in image_text:
            parts[m.name].append(m.embed_images(views))
    for name, chunks in parts.items():
        emb = _concat(chunks)
        if len(order):
            emb = emb[np.argsort(order)]  # back to spec order
        out[name] = emb
    return out


def _plan_texts(cfg: MsaeConfig, evidence: dict[int, Any], latents: Sequence[int],
                pool: list[tuple[str, str]]) -> tuple[list[str], list[int], list[str], dict[int, _TextPlan]]:
    """Own peak windows (text, owner, sample id) and each latent's control / stand-in draws."""
    from msae.latents.render import peak_window

    s = cfg.scores
    windows, owners, samples = [], [], []
    plans: dict[int, _TextPlan] = {}
    by_sample: dict[str, list[int]] = {}
    for i, (sid, _) in enumerate(pool):
        by_sample.setdefault(sid, []).append(i)
    for lat in latents:
        texts = evidence[lat].texts[: cfg.explainer.examples]
        if not texts:
            continue
        own = np.arange(len(windows), len(windows) + len(texts))
        for t in texts:
            centre = t.peak if 0 <= t.peak < len(t.pieces) else None
            acts = _one_hot(len(t.pieces), centre) if centre is not None else t.activations
            windows.append(peak_window(t.pieces, acts, size=cfg.embedders.text_window, display=t.display(),
                                       before_only=before_only(cfg)))
            owners.append(lat)
            samples.append(t.sample_id)
        rng = np.random.default_rng([s.seed, int(lat), 1])
        mine = np.array([i for t in evidence[lat].texts for i in by_sample.get(t.sample_id, [])], dtype=np.int64)
        eligible = np.setdiff1d(np.arange(len(pool)), mine)
        controls = rng.choice(eligible, size=min(s.textual_controls, len(eligible)), replace=False).astype(np.int64)
        stand_ins, rest = window_baseline_draws(eligible, controls, len(texts), s.baseline_draws, rng)
        plans[lat] = _TextPlan(own, controls, stand_ins, rest)
    return windows, owners, samples, plans


def _nan_none(x: float) -> float | None:
    return None if x is None or np.isnan(x) else float(x)


def with_population(scored: pl.DataFrame, population: pl.DataFrame, chosen: pl.DataFrame) -> pl.DataFrame:
    """Alignment scores joined with the population-detection columns and, after selection by
    detection, the explainer's own concepts (``*_concept_proposed``)."""
    key = ["latent", "prompting"]
    out = scored.join(population.with_columns(pl.col("latent").cast(scored.schema["latent"])), on=key, how="left")
    if "visual_concept_proposed" in chosen.columns:
        out = out.join(chosen.select(*key, "visual_concept_proposed", "textual_concept_proposed")
                       .with_columns(pl.col("latent").cast(scored.schema["latent"])), on=key, how="left")
    return out


def score_partition_full(cfg: MsaeConfig, store: Any, layer: int, width: int, evidence: dict[int, Any],
                         proposals: pl.DataFrame, image_text: list[Any], text_embedder: Any,
                         pools: ControlPools | None = None) -> pl.DataFrame:
    """What the stage writes to ``concepts.parquet`` (without the LLM judge), in one uncached pass:
    population detection and concept selection (``msae.score.population``), alignment scores of the
    chosen concepts, labels."""
    from msae.score.population import score_population

    chosen, population = score_population(cfg, store, layer, width, proposals, image_text, text_embedder)
    scored = alignment_scores(cfg, evidence, chosen, image_text, text_embedder, pools)
    return label_frame(with_population(scored, population, chosen), cfg.scores)


def score_partition(cfg: MsaeConfig, evidence: dict[int, Any], proposals: pl.DataFrame, image_text: list[Any],
                    text_embedder: Any, pools: ControlPools | None = None) -> pl.DataFrame:
    """Scores and labels of every proposal row (pure given the embedders and pools; see module doc):
    :func:`alignment_scores`, then :func:`msae.score.classify.label_frame`."""
    return label_frame(alignment_scores(cfg, evidence, proposals, image_text, text_embedder, pools), cfg.scores)


def alignment_scores(cfg: MsaeConfig, evidence: dict[int, Any], proposals: pl.DataFrame, image_text: list[Any],
                     text_embedder: Any, pools: ControlPools | None = None) -> pl.DataFrame:
    """Embedding scores of every proposal row, without labels: independent of
    :data:`msae.score.classify.LABEL_FIELDS`, so a threshold edit reuses them.

    ``pools`` default to the evidence's own images and top texts (:func:`evidence_pools`).
    """
    from msae.data.images import load_image_rgb

    latents = sorted(set(proposals["latent"].to_list()) & set(evidence))
    if pools is None:
        pools = evidence_pools(evidence, latents, cfg.embedders.text_window,
                               max(CONTROL_WINDOWS, 4 * cfg.scores.textual_controls),
                               np.random.default_rng([cfg.scores.seed, 2]), before_only(cfg))
    from msae.data.images import ImageLimits

    load = functools.lru_cache(maxsize=IMAGE_CACHE)(
        functools.partial(load_image_rgb, limits=ImageLimits.from_config(cfg.dataset)))
    specs, vplans = _plan_views(cfg, evidence, latents, pools.images)
    view_emb = _embed_views(cfg, specs, image_text, load)

    # each sample's whole image, for embedding detection (own vs other latents' top images)
    top = [(lat, ex) for lat in latents for ex in evidence[lat].images[: cfg.explainer.examples]]
    whole_ids: dict[str, int] = {}
    whole_paths: list[str] = []
    for _, ex in top:
        if ex.sample_id not in whole_ids:
            whole_ids[ex.sample_id] = len(whole_paths)
            whole_paths.append(ex.image_path)
    owners_a = np.array([lat for lat, _ in top])
    image_whole_a = np.array([whole_ids[ex.sample_id] for _, ex in top], dtype=np.int64)
    whole_emb = _concat([image_text[0].embed_images([load(path) for path in whole_paths[i: i + IMAGE_CHUNK]])
                         for i in range(0, len(whole_paths), IMAGE_CHUNK)])
    candidates = candidate_concepts(proposals["visual_concept"].to_list())
    emb = {m.name: (view_emb[m.name], m.embed_texts(candidates), m.logit_scale) for m in image_text}
    cand_idx = {c: i for i, c in enumerate(candidates)}

    # textual: ±window tokens around each top text's peak, against a pool of random windows
    windows, win_owner, win_sample, tplans = _plan_texts(cfg, evidence, latents, pools.windows)
    win_owner_a, win_sample_a = np.array(win_owner), np.array(win_sample, dtype=object)
    win_emb = text_embedder.embed_texts(windows) if windows else np.zeros((0, 1), np.float32)
    pool_emb = text_embedder.embed_texts([w for _, w in pools.windows]) if pools.windows else \
        np.zeros((0, 1), np.float32)
    t_concepts = candidate_concepts(proposals["textual_concept"].to_list())
    all_texts = list(dict.fromkeys(candidates + t_concepts))
    text_vec = dict(zip(all_texts, text_embedder.embed_texts(all_texts))) if all_texts else {}
    first = image_text[0].name
    rng = np.random.default_rng(cfg.scores.seed)

    rows = []
    for r in proposals.iter_rows(named=True):
        lat = r["latent"]
        out: dict[str, Any] = {"latent": lat, "prompting": r["prompting"], "visual_concept": r["visual_concept"],
                               "textual_concept": r["textual_concept"]}
        v = normalise_concept(r["visual_concept"]) if r["visual_concept"] else None
        t = normalise_concept(r["textual_concept"]) if r["textual_concept"] else None
        for name, (img_e, con_e, scale) in emb.items():
            key = "" if name == first else f"__{_slug(name)}"
            out |= _visual_columns(vplans.get(lat) if v is not None else None, img_e, con_e,
                                   cand_idx.get(v, -1), scale, key)
        out |= _textual_columns(tplans.get(lat) if t is not None else None, win_emb, pool_emb,
                                text_vec.get(t) if t is not None else None)
        out["concept_cosine"] = float(text_vec[v] @ text_vec[t]) if v and t else None
        out["visual_category"] = concept_category(v)
        out |= _detection(lat, v, t, evidence, owners_a, image_whole_a, whole_ids, whole_emb, emb[first][1],
                          cand_idx, win_owner_a, win_sample_a, win_emb, text_vec, cfg.scores.detection_negatives,
                          rng)
        rows.append(out)
    return pl.DataFrame(rows, infer_schema_length=None)


VISUAL_COLUMNS = ("visual_score", "visual_score_var", "visual_score_random", "visual_softmax", "visual_cosine",
                  "visual_rank")
TEXTUAL_COLUMNS = ("textual_score", "textual_score_var", "textual_score_random", "textual_cosine")


def _visual_columns(plan: _VisualPlan | None, img_e: np.ndarray, con_e: np.ndarray, own_idx: int, scale: float,
                    key: str) -> dict[str, float | None]:
    """One embedder's visual columns for one concept (all None without a concept or top images)."""
    if plan is None or own_idx < 0 or len(plan.own) == 0:
        return {f"{c}{key}": None for c in VISUAL_COLUMNS}
    c = con_e[own_idx]
    own_sim, ctrl_sim = img_e[plan.own] @ c, img_e[plan.controls] @ c
    score, var = contrastive_score(own_sim, ctrl_sim)
    prob, cos, rank = visual_image_scores(img_e[plan.own], np.full(len(plan.own), own_idx), con_e, scale)
    random = baseline_score(ctrl_sim[plan.stand_ins], ctrl_sim[plan.rest]) if len(ctrl_sim) else float("nan")
    values = (score, var, random, float(prob.mean()), float(cos.mean()), float(rank.mean()))
    return {f"{col}{key}": _nan_none(x) for col, x in zip(VISUAL_COLUMNS, values)}


def _textual_columns(plan: _TextPlan | None, win_emb: np.ndarray, pool_emb: np.ndarray,
                     concept: np.ndarray | None) -> dict[str, float | None]:
    """The textual columns for one concept (all None without a concept or top texts)."""
    if plan is None or concept is None or len(plan.own) == 0:
        return dict.fromkeys(TEXTUAL_COLUMNS)
    own_sim = win_emb[plan.own] @ concept
    pool_sim = pool_emb @ concept if len(pool_emb) else np.zeros(0)
    ctrl_sim = pool_sim[plan.controls]
    score, var = contrastive_score(own_sim, ctrl_sim)
    random = baseline_score(pool_sim[plan.stand_ins], pool_sim[plan.rest]) if len(pool_sim) else float("nan")
    return {c: _nan_none(x) for c, x in zip(TEXTUAL_COLUMNS, (score, var, random, float(own_sim.mean())))}


def _detection(lat: int, v: str | None, t: str | None, evidence: dict, owners: np.ndarray, image_whole: np.ndarray,
               whole_ids: dict, whole_emb: np.ndarray, concept_emb: np.ndarray, cand_idx: dict,
               win_owner: np.ndarray, win_sample: np.ndarray, win_emb: np.ndarray, text_vec: dict, n_neg: int,
               rng: np.random.Generator) -> dict[str, float | None]:
    """Embedding detection AUROCs: own top examples vs other latents' top examples (not among own)."""
    out: dict[str, float | None] = {"visual_detection": None, "textual_detection": None}
    if v is not None and len(owners):
        own = np.array(sorted({whole_ids[ex.sample_id] for ex in evidence[lat].images if ex.sample_id in whole_ids}),
                       dtype=np.int64)
        others = np.setdiff1d(image_whole[owners != lat], own)  # sorted, unique whole-image rows
        if len(others):
            neg = rng.choice(others, size=min(n_neg, len(others)), replace=False)
            c = concept_emb[cand_idx[v]]
            out["visual_detection"] = auroc(whole_emb[own] @ c, whole_emb[neg] @ c)
    if t is not None and len(win_owner):
        own_samples = [ex.sample_id for ex in evidence[lat].texts]
        others_i = np.flatnonzero((win_owner != lat) & ~np.isin(win_sample, own_samples))
        if len(others_i):
            neg_i = rng.choice(others_i, size=min(n_neg, len(others_i)), replace=False)
            c = text_vec[t]
            out["textual_detection"] = auroc(win_emb[win_owner == lat] @ c, win_emb[neg_i] @ c)
    return out


# --- the stage: alignment scores, judge and ground truth cached apart from the labels ---------------
SCORES_REVISION = 2
"""Bump when :func:`alignment_scores` (or the judge, or ground truth) computes other values.
2: ground truth leaves partial patches out; answer positions read as their display name."""
CACHE = "_cache/concept_scores"
"""Per partition, beside ``concepts.parquet``: one entry per kind (alignment, population, judge, ground_truth),
``<kind>-<key>/``, replaced when its key changes. Scratch (``integrity.SCRATCH``), not an output."""
ENTRY_RECORD = "entry.info"
"""An entry's record (JSON; not named ``*.json``: the explainer's answer cache shares ``_cache/``
and counts its answers as the ``.json`` files under it)."""
REPORT_FIELDS = frozenset({"ablation", "bootstrap"})
"""``scores`` fields only the report reads."""


def _gt_fields() -> frozenset[str]:
    from msae.config import ScoresConfig

    return frozenset(f for f in ScoresConfig.model_fields if f.startswith("gt_"))


JUDGE_FIELDS = frozenset({"judge", "judge_model", "judge_base_url", "judge_examples"})
POPULATION_FIELDS = frozenset({"population_samples", "population_strong_fraction", "select_by_detection",
                               "selection_tolerance", "selection_population_words", "textual_selection_measure",
                               "selection_evidence_words"})
"""``scores`` fields only population detection (``msae.score.population``) reads, besides ``seed``."""
IMAGE_FIELDS = frozenset({"image_root", "allowed_image_roots", "allow_image_urls", "max_image_bytes",
                          "max_image_pixels", "image_url_timeout_s"})
"""``dataset`` fields that decide which image a score view reads and whether it loads."""


def _digest(store: Any, *parts: str) -> str | None:
    """sha256 of one stored file (None when it is missing)."""
    from msae.integrity import content_digests

    return content_digests(store, ["/".join(parts)])["/".join(parts)]


def _stage_digest(store: Any, stage: str, partition: str) -> dict[str, str | None]:
    """sha256 of every output file of an upstream stage (the files :mod:`msae.integrity` checks)."""
    from msae.integrity import content_digests, output_files

    return content_digests(store, output_files(store, stage, partition))


def _key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _evidence_files(store: Any, folder: str, layer: int, width: int) -> dict[str, str | None]:
    """What the scores read from the store: proposals, evidence (stats, top examples), samples, tokens."""
    from msae.explain.stage import PROPOSALS
    from msae.latents.evidence import latents_dir
    from msae.latents.stage import STATS, TOP
    from msae.store import Store

    base = latents_dir(layer, width)
    return {"proposals": _digest(store, folder, PROPOSALS), "stats": _digest(store, base, STATS),
            "top": _digest(store, base, TOP), "samples": _digest(store, Store.SAMPLES),
            "tokens": _digest(store, Store.TOKENS)}


def alignment_key(cfg: MsaeConfig, files: dict[str, str | None]) -> str:
    """Identity of :func:`alignment_scores`' output: every setting it reads, and the content of the
    files it reads — not :data:`LABEL_FIELDS`, the ground-truth, judge or report fields."""
    return _key({
        "revision": SCORES_REVISION, "embedders": cfg.embedders.model_dump(mode="json"),
        "scores": cfg.scores.model_dump(mode="json", exclude=LABEL_FIELDS | _gt_fields() | REPORT_FIELDS
                                        | JUDGE_FIELDS | POPULATION_FIELDS),
        "examples": cfg.explainer.examples, "text_include_template": cfg.latents.text_include_template,
        "images": cfg.dataset.model_dump(mode="json", include=IMAGE_FIELDS), "files": files,
    })


def judge_key(cfg: MsaeConfig, files: dict[str, str | None]) -> str:
    """Identity of the LLM judge's scores: its settings, prompts, seed and the files it reads."""
    from msae.score.autointerp import judge_prompt_version, load_judge_templates

    return _key({
        "revision": SCORES_REVISION, "judge": cfg.scores.model_dump(mode="json", include=JUDGE_FIELDS | {"seed"}),
        "prompts": judge_prompt_version(load_judge_templates()),
        "explainer": cfg.explainer.model_dump(mode="json", include={"model", "base_url", "prompting", "examples"}),
        "files": files,
    })


def population_key(cfg: MsaeConfig, store: Any, layer: int, width: int, files: dict[str, str | None]) -> str:
    """Identity of the population-detection scores: their settings, the judges, and the content of
    the proposals, the SAE and the layer's activations, tokens and samples."""
    from msae.score.population import POPULATION_REVISION

    return _key({
        "revision": SCORES_REVISION, "population_revision": POPULATION_REVISION,
        "scores": cfg.scores.model_dump(mode="json", include=POPULATION_FIELDS | {"seed"}),
        "embedders": cfg.embedders.model_dump(mode="json", include={"image_text", "text"}),
        "text_include_template": cfg.latents.text_include_template,
        "images": cfg.dataset.model_dump(mode="json", include=IMAGE_FIELDS),
        "sae": _stage_digest(store, "sae", layer_width_folder(layer, width)),
        "activations": _stage_digest(store, "activations", str(layer)),
        "files": {k: files[k] for k in ("proposals", "samples", "tokens")},
        # the top texts' words become readings only with selection_evidence_words
        **({"evidence": {"top": files.get("top"), "stats": files.get("stats"), "examples": cfg.explainer.examples}}
           if cfg.scores.selection_evidence_words else {}),
    })


def ground_truth_key(cfg: MsaeConfig, store: Any, layer: int, width: int) -> str:
    """Identity of ``ground_truth.parquet``: the ``gt_*`` settings and the content of the SAE, the
    layer's activations, tokens, samples and annotations (no threshold of the labels)."""
    from msae.store import Store

    return _key({
        "revision": SCORES_REVISION, "scores": cfg.scores.model_dump(mode="json", include=_gt_fields()),
        "sae": _stage_digest(store, "sae", layer_width_folder(layer, width)),
        "activations": _stage_digest(store, "activations", str(layer)),  # the layer's zarr and tokens.parquet
        "files": {"samples": _digest(store, Store.SAMPLES), "annotations": _digest(store, "world", "annotations.parquet")},
    })


class ScoreCache:
    """One partition's cached score parts (see :data:`CACHE`): files plus a record
    (:data:`ENTRY_RECORD`) written last, with the files' checksums; an entry whose files do not match is recomputed, never read."""

    def __init__(self, store: Any, folder: str) -> None:
        self.store, self.root = store, f"{folder}/{CACHE}"

    def get(self, kind: str, key: str) -> tuple[dict[str, bytes], dict[str, Any]] | None:
        entry = f"{self.root}/{kind}-{key}"
        if not self.store.exists(entry, ENTRY_RECORD):
            return None
        try:
            info = json.loads(self.store.read_bytes(entry, ENTRY_RECORD))
            files = {name: self.store.read_bytes(entry, name) for name in info["files"]}
        except Exception as err:  # noqa: BLE001 - a damaged entry is recomputed
            log.warning("score cache %s unreadable (%s): recomputing", self.store.url(entry), err)
            return None
        bad = [n for n, data in files.items() if hashlib.sha256(data).hexdigest() != info["files"][n]]
        if bad:
            log.warning("score cache %s: %s changed since written: recomputing", self.store.url(entry), bad)
            return None
        return files, info.get("meta", {})

    def put(self, kind: str, key: str, files: dict[str, bytes], meta: dict[str, Any] | None = None) -> None:
        """Store an entry and drop this kind's older entries (one per kind is kept)."""
        self.drop(kind, keep=key)
        entry = f"{self.root}/{kind}-{key}"
        for name, data in files.items():
            self.store.write_bytes(data, entry, name)
        record = {"files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}, "meta": meta or {}}
        self.store.write_bytes(json.dumps(record, indent=1).encode(), entry, ENTRY_RECORD)

    def drop(self, kind: str, keep: str | None = None) -> None:
        if not self.store.exists(self.root):
            return
        for path in self.store.fs.ls(self.store.path(self.root), detail=False):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(f"{kind}-") and name != f"{kind}-{keep}":
                self.store.fs.rm(path, recursive=True)


def _frame_bytes(frame: pl.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.write_ipc(buf)  # Arrow IPC keeps every dtype (also all-null columns) exactly
    return buf.getvalue()


def _frame(data: bytes) -> pl.DataFrame:
    return pl.read_ipc(io.BytesIO(data))


def _alignment(cfg: MsaeConfig, store: Any, cache: ScoreCache, key: str, layer: int, width: int,
               proposals: pl.DataFrame, evidence: Callable[[], dict[int, Any]],
               embedders: Callable[[], tuple[list[Any], Any]]) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The partition's alignment scores (:func:`alignment_scores`), from the cache when its key matches."""
    hit = cache.get("alignment", key)
    if hit is not None:
        log.info("concept_scores[layer=%d/width=%d]: alignment scores reused (%s); labelling only", layer, width, key)
        return _frame(hit[0]["scores.arrow"]), {**hit[1], "alignment_reused": True}
    image_text, text = embedders()
    pools = store_pools(cfg, store, np.random.default_rng([cfg.scores.seed, 2]))
    frame = alignment_scores(cfg, evidence(), proposals, image_text, text, pools)
    meta = {"embedders": [m.name for m in image_text], "text_embedder": text.name}
    cache.put("alignment", key, {"scores.arrow": _frame_bytes(frame)}, meta)
    return frame, {**meta, "alignment_reused": False}


def _population(cfg: MsaeConfig, store: Any, cache: ScoreCache, key: str, layer: int, width: int,
                proposals: pl.DataFrame, embedders: Callable[[], tuple[list[Any], Any]]
                ) -> tuple[pl.DataFrame, pl.DataFrame, bool]:
    """The partition's proposals with their concepts as scored (chosen by detection when
    ``scores.select_by_detection``) and their population-detection scores (``msae.score.population``),
    cached; (proposals, scores, reused)."""
    from msae.score.population import score_population

    hit = cache.get("population", key)
    if hit is not None:
        return _frame(hit[0]["proposals.arrow"]), _frame(hit[0]["population.arrow"]), True
    image_text, text = embedders()
    chosen, frame = score_population(cfg, store, layer, width, proposals, image_text, text)
    cache.put("population", key, {"proposals.arrow": _frame_bytes(chosen), "population.arrow": _frame_bytes(frame)})
    return chosen, frame, False


def concepts_digest(proposals: pl.DataFrame) -> str:
    """sha256 of the concepts that alignment scoring reads (they may differ from the file's after
    selection by detection)."""
    cols = proposals.select("latent", "prompting", "visual_concept", "textual_concept")
    return hashlib.sha256(_frame_bytes(cols)).hexdigest()


def _judged(cfg: MsaeConfig, cache: ScoreCache, key: str, proposals: pl.DataFrame,
            evidence: Callable[[], dict[int, Any]]) -> pl.DataFrame:
    """The LLM judge's scores, from the cache when its key matches; results with failed requests are
    not cached (the next run asks again)."""
    from msae.score.autointerp import judge_scores

    hit = cache.get("judge", key)
    if hit is not None:
        return _frame(hit[0]["judge.arrow"])
    first = proposals.filter(pl.col("prompting") == cfg.explainer.prompting[0])
    judged = judge_scores(evidence(), dict(zip(first["latent"].to_list(), first["textual_concept"].to_list())), cfg)
    if not judged["judge_status"].fill_null("").str.contains("error").any():
        cache.put("judge", key, {"judge.arrow": _frame_bytes(judged)})
    return judged


def _ground_truth(cfg: MsaeConfig, store: Any, cache: ScoreCache, layer: int, width: int) -> tuple[bytes, bool]:
    """``ground_truth.parquet``'s bytes, from the cache when its key matches; (bytes, reused)."""
    from msae.score.ground_truth import ground_truth_from_config

    key = ground_truth_key(cfg, store, layer, width)
    hit = cache.get("ground_truth", key)
    if hit is not None:
        return hit[0][GROUND_TRUTH], True
    buf = io.BytesIO()
    ground_truth_from_config(store, layer, width, cfg.scores).write_parquet(buf, compression="zstd", statistics=True)
    cache.put("ground_truth", key, {GROUND_TRUTH: buf.getvalue()})
    return buf.getvalue(), False


def run_concept_scores(cfg: MsaeConfig, store: Any, layer: int, width: int,
                       ground_truth: bool = True) -> tuple[str, dict[str, Any]]:
    """Score, label and (where annotations exist, unless ``ground_truth`` is False) compute ground
    truth; returns (data version, metadata).

    The expensive parts — embedding every view and window (:func:`alignment_scores`), the LLM judge,
    ground truth — are cached in the partition's :data:`CACHE` under keys without the labelling
    settings (:data:`msae.score.classify.LABEL_FIELDS`), so a threshold or agreement edit only
    relabels; ``concepts.parquet`` is byte for byte what a full computation writes.
    """
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import load_evidence

    folder = concepts_folder(layer, width)
    proposals = store.read_parquet(folder, PROPOSALS)
    evidence = functools.cache(lambda: load_evidence(store, layer, width, sorted(set(proposals["latent"].to_list()))))
    cache = ScoreCache(store, folder)
    files = _evidence_files(store, folder, layer, width)
    embedders = functools.cache(lambda: load_embedders(cfg))
    chosen, population, population_reused = _population(
        cfg, store, cache, population_key(cfg, store, layer, width, files), layer, width, proposals, embedders)
    files = {**files, "concepts": concepts_digest(chosen)}
    scored, meta = _alignment(cfg, store, cache, alignment_key(cfg, files), layer, width, chosen, evidence,
                              embedders)
    meta["population_reused"] = population_reused
    frame = label_frame(with_population(scored, population, chosen), cfg.scores)
    if cfg.scores.judge == "openai":  # Delphi-style detection and fuzzing by an LLM judge
        judged = _judged(cfg, cache, judge_key(cfg, files), chosen, evidence)
        frame = frame.join(judged.with_columns(pl.col("latent").cast(frame.schema["latent"])), on="latent", how="left")
    store.write_parquet(frame, folder, CONCEPTS)
    meta = {"concepts_path": store.url(folder, CONCEPTS), **meta}
    masked = frame.filter(pl.col("prompting") == cfg.explainer.prompting[0])
    meta |= {f"census_{k}": int(n) for k, n in masked.group_by("modality").len().iter_rows()}
    for mode in cfg.explainer.prompting:
        # rows whose explainer request failed have no concept (and so label "none"): counted here,
        # so a "none" from a failure is never mistaken for one the method chose
        rows = proposals.filter(pl.col("prompting") == mode)
        meta[f"explainer_failures_{mode}"] = int(
            ((rows["visual_status"] == "error") | (rows["textual_status"] == "error")).sum()) if rows.height else 0
        for col in ("visual_score", "visual_score_random", "textual_score", "textual_score_random"):
            s = frame.filter(pl.col("prompting") == mode)[col].drop_nulls()
            meta[f"{col}_{mode}"] = float(s.mean()) if len(s) else None
    digest_parts = [store.read_bytes(folder, CONCEPTS)]
    if ground_truth and store.exists("world", "annotations.parquet"):
        gt_bytes, meta["ground_truth_reused"] = _ground_truth(cfg, store, cache, layer, width)
        store.write_bytes(gt_bytes, folder, GROUND_TRUTH)
        gt = pl.read_parquet(io.BytesIO(gt_bytes))
        digest_parts.append(gt_bytes)
        meta["ground_truth_path"] = store.url(folder, GROUND_TRUTH)
        meta |= {f"gt_{k}": int(n) for k, n in gt.group_by("gt_modality").len().iter_rows()}
    return hashlib.sha256(b"".join(digest_parts)).hexdigest()[:16], meta
