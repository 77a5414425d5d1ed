"""Choose the embedded default's evidence rule and thresholds on the calibration world, never the evaluation one.

The synthetic world has three disjoint seed groups (``world_seeds`` in the config): the worlds the
embedded VLM was trained on, a *calibration* world and the *evaluation* world the embedded run
reports on. ``python -m msae.calibrate`` runs the whole pipeline (the Dagster CLI, like ``make
demo``) on the calibration world into its own store, then chooses, in this order and only there:

1. **Evidence** — the ranking of top images (``latents.ranking``) and ``latents.active_fraction``:
   for every candidate, the top-``top_k`` images of each ground-truth visual or multimodal latent;
   the *hit rate* is the fraction of those images that contain the latent's ground-truth visual
   concept (an object with that colour / shape / size / pair, or any background patch), and the
   *mask precision* the fraction of their active patches (what the explainer is shown) whose
   annotation is that concept. The candidate with the highest product of the two, pooled, wins
   (ties: the earlier candidate in :data:`EVIDENCE_CANDIDATES`). If it differs from the calibration run's setting, the concept
   stages are re-run with it.
2. **Text window and thresholds** — ``embedders.text_window`` (the tokens each side of the peak
   that textual scoring embeds; :data:`TEXT_WINDOWS`) and ``scores.visual_threshold`` /
   ``scores.textual_threshold`` on a grid: the combination with the highest macro-F1 of the
   pipeline's labels against ground truth, pooled over every layer × width (ties: the earlier
   window, then the threshold pair closest to the grid's centre). Each window rescores the
   calibration run's proposals; nothing is explained again.

The result, with every candidate's figure, is written to ``data/calibration/embedded.json``; the
embedded profile carries the chosen values (a test checks that they agree).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from msae.config import PROJECT_ROOT, MsaeConfig, parse_config, profile_text

CALIBRATION_FILE = PROJECT_ROOT / "data" / "calibration" / "embedded.json"
EVIDENCE_CANDIDATES: tuple[tuple[str, float], ...] = (
    ("active_patches", 0.0), ("active_patches", 0.3), ("active_patches", 0.5), ("max", 0.0), ("max", 0.3),
    ("max", 0.5),
)
"""(latents.ranking, latents.active_fraction): the method's rule first, so it wins ties."""
THRESHOLD_GRID: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
TEXT_WINDOWS: tuple[int, ...] = (5, 2, 1)


def calibration_config_data(profile: str = "embedded", store: str = "outputs/calibration") -> dict[str, Any]:
    """The profile's config with the calibration world's seed and a store of its own."""
    data = yaml.safe_load(profile_text(profile))
    seeds = data.get("world_seeds") or {}
    if "calibration" not in seeds:
        raise ValueError(f"profile {profile!r} names no world_seeds.calibration")
    data["dataset"]["shapes"]["seed"] = seeds["calibration"]
    data["store"] = str((PROJECT_ROOT / store).resolve()) if not Path(store).is_absolute() else store

    def absolute(ref: str) -> str:  # the config file will live in the store, not the repository root
        return str((PROJECT_ROOT / ref).resolve()) if (PROJECT_ROOT / ref).exists() else ref

    data["model"]["name_or_path"] = absolute(data["model"]["name_or_path"])
    emb = data.get("embedders") or {}
    if emb.get("image_text"):
        emb["image_text"] = [absolute(r) for r in emb["image_text"]]
    if emb.get("text"):
        emb["text"] = absolute(emb["text"])
    return data


# --- evidence ---------------------------------------------------------------------------------------
def evidence_candidates(cfg: MsaeConfig, store: Any, gts: dict[tuple[int, int], pl.DataFrame]) -> list[dict]:
    """Hit rate of every (ranking, active_fraction) candidate, pooled over the partitions."""
    from msae.data.samples import sample_image_ids
    from msae.latents.stats import compute_latent_stats
    from msae.sae.formats import load_sae
    from msae.sae.stage import open_layer
    from msae.score.evidence_quality import evidence_quality, image_concepts, patch_concepts

    samples = store.read_parquet(store.SAMPLES)
    sample_image = sample_image_ids(samples)
    concepts_of = image_concepts(store.read_parquet("world", "objects.parquet"))
    patches_of = patch_concepts(store.read_parquet("world", "annotations.parquet"))
    tokens = store.read_parquet(store.TOKENS)
    rows = []
    for ranking, fraction in EVIDENCE_CANDIDATES:
        lcfg = cfg.latents.model_copy(update={"ranking": ranking, "active_fraction": fraction})
        total = {"images": 0, "hits": 0, "active_patches": 0, "on_concept": 0}
        for (layer, width), gt in gts.items():
            sae = load_sae(store.url(store.sae_name(layer, width)))
            top = compute_latent_stats(sae, open_layer(store, layer), tokens, lcfg, device="cpu").top_examples
            for k, v in evidence_quality(top, gt, sample_image, concepts_of, patches_of).items():
                total[k] += v
        hit = total["hits"] / total["images"] if total["images"] else float("nan")
        precision = total["on_concept"] / total["active_patches"] if total["active_patches"] else float("nan")
        rows.append({"ranking": ranking, "active_fraction": fraction, "hit_rate": hit,
                     "mask_precision": precision, "score": hit * precision, **total})
        print(f"evidence {ranking} / {fraction}: hit rate {hit:.3f}, mask precision {precision:.3f}", flush=True)
    return rows


# --- thresholds -------------------------------------------------------------------------------------
def threshold_sweep(frames: list[tuple[pl.DataFrame, pl.DataFrame]], mode: str = "masked") -> list[dict]:
    """Pooled macro-F1 of the labels against ground truth for every threshold pair of the grid."""
    from sklearn.metrics import f1_score

    from msae.score.classify import classify_frame

    rows = []
    for vt in THRESHOLD_GRID:
        for tt in THRESHOLD_GRID:
            y_true: list[str] = []
            y_pred: list[str] = []
            for concepts, gt in frames:
                c = concepts.filter(pl.col("prompting") == mode)
                c = c.with_columns(classify_frame(c, vt, tt).alias("label"))
                j = gt.select("latent", "gt_modality").join(c.select(pl.col("latent").cast(gt.schema["latent"]),
                                                                     "label"), on="latent", how="left")
                y_true += j["gt_modality"].to_list()
                y_pred += j["label"].fill_null("none").to_list()
            labels = sorted(set(y_true))
            rows.append({"visual_threshold": vt, "textual_threshold": tt,
                         "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))})
    return rows


def choose_thresholds(sweep: list[dict]) -> dict:
    centre = float(np.median(THRESHOLD_GRID))
    best = max(r["macro_f1"] for r in sweep)
    tied = [r for r in sweep if r["macro_f1"] >= best - 1e-12]
    return min(tied, key=lambda r: (abs(r["visual_threshold"] - centre) + abs(r["textual_threshold"] - centre),
                                    r["visual_threshold"], r["textual_threshold"]))


def text_window_candidates(cfg: MsaeConfig, store: Any, keys: list[tuple[int, int]]) -> list[dict]:
    """Per :data:`TEXT_WINDOWS` value: the calibration run's proposals rescored with it, the
    threshold sweep and its best pair."""
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import load_evidence
    from msae.score.stage import GROUND_TRUTH, load_embedders, score_partition, store_pools

    image_text, text = load_embedders(cfg)
    inputs = []
    for k in keys:
        proposals = store.read_parquet(concepts_folder(*k), PROPOSALS)
        evidence = load_evidence(store, *k, sorted(set(proposals["latent"].to_list())))
        inputs.append((proposals, evidence, store.read_parquet(concepts_folder(*k), GROUND_TRUTH)))
    out = []
    for window in TEXT_WINDOWS:
        wcfg = cfg.model_copy(update={"embedders": cfg.embedders.model_copy(update={"text_window": window})})
        pools = store_pools(wcfg, store, np.random.default_rng([wcfg.scores.seed, 2]))
        frames = [(score_partition(wcfg, ev, prop, image_text, text, pools), gt) for prop, ev, gt in inputs]
        sweep = threshold_sweep(frames, cfg.explainer.prompting[0])
        out.append({"text_window": window, "best": choose_thresholds(sweep), "sweep": sweep})
        print(f"text_window {window}: best {out[-1]['best']}", flush=True)
    return out


# --- driver -----------------------------------------------------------------------------------------
def _materialize(config_path: Path) -> None:
    env = {**os.environ, "MSAE_CONFIG": str(config_path)}
    subprocess.run([sys.executable, "-m", "msae_assets.materialize"], check=True, cwd=PROJECT_ROOT, env=env)


def run(store_dir: str = "outputs/calibration", out: Path = CALIBRATION_FILE) -> dict:
    from msae.score.ground_truth import ground_truth_from_config
    from msae.store import Store

    data = calibration_config_data(store=store_dir)
    cfg = parse_config(data)
    store = Store(cfg.store)
    cfg_path = Path(store.root) / "calibration_config.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
    _materialize(cfg_path)
    cfg = parse_config(data)
    keys = [(layer, width) for layer in cfg.layers for width in cfg.widths]
    gts = {k: ground_truth_from_config(store, *k, cfg.scores) for k in keys}
    evidence = evidence_candidates(cfg, store, gts)
    best_ev = max(evidence, key=lambda r: (np.nan_to_num(r["score"], nan=-1.0), -evidence.index(r)))
    if (best_ev["ranking"], best_ev["active_fraction"]) != (cfg.latents.ranking, cfg.latents.active_fraction):
        data["latents"] = {**data.get("latents", {}), "ranking": best_ev["ranking"],
                           "active_fraction": best_ev["active_fraction"]}
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        _materialize(cfg_path)
        cfg = parse_config(data)
    windows = text_window_candidates(cfg, store, keys)
    best_w = max(windows, key=lambda r: (r["best"]["macro_f1"], -windows.index(r)))
    best_t, sweep = best_w["best"], best_w["sweep"]
    result = {
        "format": "msae-calibration/1",
        "world_seed": cfg.dataset.shapes.seed,
        "partitions": [f"{a}|{b}" for a, b in keys],
        "chosen": {"latents.ranking": best_ev["ranking"], "latents.active_fraction": best_ev["active_fraction"],
                   "embedders.text_window": best_w["text_window"],
                   "scores.visual_threshold": best_t["visual_threshold"],
                   "scores.textual_threshold": best_t["textual_threshold"]},
        "evidence_candidates": evidence,
        "text_window_candidates": [{"text_window": r["text_window"], **r["best"]} for r in windows],
        "threshold_sweep_best": best_t,
        "threshold_sweep": sweep,
        "gt_census": {f"{a}|{b}": dict(gts[(a, b)].group_by("gt_modality").len().iter_rows()) for a, b in keys},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["chosen"], indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m msae.calibrate", description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="outputs/calibration")
    ap.add_argument("--out", default=str(CALIBRATION_FILE))
    args = ap.parse_args(argv)
    run(args.store, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
