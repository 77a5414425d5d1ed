"""The `concept_scores` stage as a plain function: proposals + evidence + embedders → concepts.parquet.

One row per explained latent × prompting mode (``masked`` = the method, ``whole`` = the baseline)
in ``<store>/concepts/layer=<L>/width=<W>/concepts.parquet``; columns in ``docs/formats.md``. Both
modes are scored on the *same* blurred top images against the *same* candidate set (the union of
both modes' kept concepts), so their visual scores are comparable. Where the dataset has
annotations, ``ground_truth.parquet`` beside it holds the activation-only ground-truth labels.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from typing import Any

import numpy as np
import polars as pl

from msae.config import MsaeConfig
from msae.score.classify import classify_frame
from msae.score.quality import (auroc, candidate_concepts, concept_category, concepts_agree, normalise_concept,
                                textual_scores, visual_image_scores)

log = logging.getLogger(__name__)

CONCEPTS = "concepts.parquet"
IMAGE_CHUNK = 256
"""Images blurred/loaded and embedded per step."""
IMAGE_CACHE = 512
"""Decoded images kept (an image is among several latents' top images)."""
GROUND_TRUTH = "ground_truth.parquet"


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


def score_partition(cfg: MsaeConfig, evidence: dict[int, Any], proposals: pl.DataFrame, image_text: list[Any],
                    text_embedder: Any) -> pl.DataFrame:
    """Scores of every proposal row (pure given the embedders; see module doc)."""
    from msae.data.images import load_image_rgb
    from msae.latents.render import blur_inactive, peak_window

    e = cfg.embedders
    latents = sorted(set(proposals["latent"].to_list()) & set(evidence))
    # the scorer's view of every top image (non-active patches blurred) and each sample's whole image,
    # embedded in chunks so that only embeddings, never all the images, are held at once
    top = [(lat, ex) for lat in latents for ex in evidence[lat].images[: cfg.explainer.examples]]
    whole_ids: dict[str, int] = {}
    whole_paths: list[str] = []
    for _, ex in top:
        if ex.sample_id not in whole_ids:
            whole_ids[ex.sample_id] = len(whole_paths)
            whole_paths.append(ex.image_path)
    owners_a = np.array([lat for lat, _ in top])
    image_whole_a = np.array([whole_ids[ex.sample_id] for _, ex in top], dtype=np.int64)
    load = functools.lru_cache(maxsize=IMAGE_CACHE)(load_image_rgb)  # neighbours in `top` share images
    blurred_emb: dict[str, list[np.ndarray]] = {m.name: [] for m in image_text}
    for i in range(0, len(top), IMAGE_CHUNK):
        views = [blur_inactive(load(ex.image_path), ex.patch_activations, radius=e.blur_radius,
                               threshold=ex.active_threshold) for _, ex in top[i: i + IMAGE_CHUNK]]
        for m in image_text:
            blurred_emb[m.name].append(m.embed_images(views))
    whole_emb = _concat([image_text[0].embed_images([load(path) for path in whole_paths[i: i + IMAGE_CHUNK]])
                         for i in range(0, len(whole_paths), IMAGE_CHUNK)])
    candidates = candidate_concepts(proposals["visual_concept"].to_list())
    emb = {m.name: (_concat(blurred_emb[m.name]), m.embed_texts(candidates), m.logit_scale) for m in image_text}
    cand_idx = {c: i for i, c in enumerate(candidates)}

    # textual: ±window tokens around each top text's peak
    win_owner, windows, win_sample = [], [], []
    for lat in latents:
        for t in evidence[lat].texts[: cfg.explainer.examples]:
            win_owner.append(lat)
            windows.append(peak_window(t.pieces, t.activations, size=e.text_window))
            win_sample.append(t.sample_id)
    win_owner_a, win_sample_a = np.array(win_owner), np.array(win_sample, dtype=object)
    win_emb = text_embedder.embed_texts(windows) if windows else np.zeros((0, 1), np.float32)
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
        mine = np.flatnonzero(owners_a == lat) if len(owners_a) else np.array([], int)
        for name, (img_e, con_e, scale) in emb.items():
            key = "" if name == first else f"__{_slug(name)}"
            if v is None or len(mine) == 0:
                out |= {f"visual_score{key}": None, f"visual_score_var{key}": None, f"visual_cosine{key}": None,
                        f"visual_rank{key}": None}
                continue
            prob, cos, rank = visual_image_scores(img_e[mine], np.full(len(mine), cand_idx[v]), con_e, scale)
            out |= {f"visual_score{key}": float(prob.mean()), f"visual_score_var{key}": float(prob.var()),
                    f"visual_cosine{key}": float(cos.mean()), f"visual_rank{key}": float(rank.mean())}
        wmine = np.flatnonzero(win_owner_a == lat) if len(win_owner_a) else np.array([], int)
        if t is not None and len(wmine):
            out["textual_score"] = float(textual_scores(win_emb[wmine], np.repeat(text_vec[t][None], len(wmine),
                                                                                  0)).mean())
        else:
            out["textual_score"] = None
        out["concept_cosine"] = float(text_vec[v] @ text_vec[t]) if v and t else None
        out["concepts_agree"] = concepts_agree(v, t, out["concept_cosine"], cfg.scores.agreement)
        out["visual_category"] = concept_category(v)
        out |= _detection(lat, v, t, evidence, owners_a, image_whole_a, whole_ids, whole_emb, emb[first][1],
                          cand_idx, win_owner_a, win_sample_a, win_emb, text_vec, cfg.scores.detection_negatives,
                          rng)
        rows.append(out)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    return frame.with_columns(classify_frame(frame, cfg.scores.visual_threshold,
                                             cfg.scores.textual_threshold).alias("modality"))


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


def run_concept_scores(cfg: MsaeConfig, store: Any, layer: int, width: int) -> tuple[str, dict[str, Any]]:
    """Score, label and (where annotations exist) compute ground truth; returns (data version, metadata)."""
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import load_evidence

    folder = concepts_folder(layer, width)
    proposals = store.read_parquet(folder, PROPOSALS)
    evidence = load_evidence(store, layer, width, sorted(set(proposals["latent"].to_list())))
    image_text, text = load_embedders(cfg)
    frame = score_partition(cfg, evidence, proposals, image_text, text)
    if cfg.scores.judge == "openai":  # Delphi-style detection and fuzzing by an LLM judge
        from msae.score.autointerp import judge_scores

        first = proposals.filter(pl.col("prompting") == cfg.explainer.prompting[0])
        judged = judge_scores(evidence, dict(zip(first["latent"].to_list(), first["textual_concept"].to_list())), cfg)
        frame = frame.join(judged.with_columns(pl.col("latent").cast(frame.schema["latent"])), on="latent", how="left")
    store.write_parquet(frame, folder, CONCEPTS)
    meta: dict[str, Any] = {"concepts_path": store.url(folder, CONCEPTS),
                            "embedders": [m.name for m in image_text], "text_embedder": text.name}
    masked = frame.filter(pl.col("prompting") == cfg.explainer.prompting[0])
    meta |= {f"census_{k}": int(n) for k, n in masked.group_by("modality").len().iter_rows()}
    for mode in cfg.explainer.prompting:
        s = frame.filter(pl.col("prompting") == mode)["visual_score"].drop_nulls()
        meta[f"visual_score_{mode}"] = float(s.mean()) if len(s) else None
    digest_parts = [store.read_bytes(folder, CONCEPTS)]
    if store.exists("world", "annotations.parquet"):
        from msae.score.ground_truth import ground_truth_labels

        gt = ground_truth_labels(store, layer, width, threshold=cfg.scores.gt_auroc)
        store.write_parquet(gt, folder, GROUND_TRUTH)
        digest_parts.append(store.read_bytes(folder, GROUND_TRUTH))
        meta["ground_truth_path"] = store.url(folder, GROUND_TRUTH)
        meta |= {f"gt_{k}": int(n) for k, n in gt.group_by("gt_modality").len().iter_rows()}
    return hashlib.sha256(b"".join(digest_parts)).hexdigest()[:16], meta
