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
2. **Text window and label rule** — ``embedders.text_window`` and ``text_window_context`` (the
   tokens each side of the peak, or before it, that textual scoring embeds; :data:`TEXT_WINDOWS`),
   the contrast thresholds ``scores.visual_threshold`` / ``scores.textual_threshold`` and the population gate
   (``scores.visual_population_threshold`` / ``textual_population_threshold`` /
   ``textual_coverage_threshold`` / ``textual_precision_threshold`` /
   ``population_min_positives``, :mod:`msae.score.population`) on grids: the combination with the
   highest macro-F1 of the pipeline's labels against ground truth, pooled over every layer × width,
   over the classes with at least :data:`MIN_CLASS_SUPPORT` ground-truth latents (ties: the
   earlier window, then :func:`choose_thresholds`). Each window rescores the calibration
   run's proposals; nothing is explained again.

Between the two, **concept selection** (``scores.select_by_detection``, ``selection_tolerance``;
:mod:`msae.score.population`): off, or on at each of :data:`SELECTION_TOLERANCES`; the candidate
with the highest exact concept match of the ground-truth-grounded latents, pooled, wins (ties:
the earlier candidate, so off, then the smaller tolerance). With selection on, the textual
readings may then also take the latent's most frequent strong words
(``scores.selection_population_words``, each of :data:`SELECTION_POPULATION_WORDS` at the chosen
tolerance; ties: the earlier, so none).

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
from msae.score.population import POPULATION_COLUMNS

CALIBRATION_FILE = PROJECT_ROOT / "data" / "calibration" / "embedded.json"
EVIDENCE_CANDIDATES: tuple[tuple[str, float], ...] = (
    ("active_patches", 0.0), ("active_patches", 0.3), ("active_patches", 0.5), ("max", 0.0), ("max", 0.3),
    ("max", 0.5),
)
"""(latents.ranking, latents.active_fraction): the method's rule first, so it wins ties."""
THRESHOLD_GRID: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
POPULATION_GRID: tuple[float, ...] = (0.0, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
"""Population-gate thresholds swept (``scores.*_population_threshold``; 0: no gate)."""
MIN_CLASS_SUPPORT = 10
"""Ground-truth classes with fewer latents (pooled) are left out of the calibration objective: a
class of one latent is 1/k of a macro-F1 over k classes, and chasing it moves every threshold
(the calibration world has one ground-truth multimodal latent)."""
SELECTION_TOLERANCES: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1)
"""``scores.selection_tolerance`` values tried (with selection off as the first candidate)."""
SELECTION_POPULATION_WORDS: tuple[int, ...] = (0, 1, 3)
"""``scores.selection_population_words`` candidates, tried at the chosen tolerance (0 first: ties keep it off)."""
TEXTUAL_READINGS: tuple[tuple[str, bool], ...] = (("similarity", False), ("coverage", False), ("similarity", True),
                                                  ("coverage", True))
"""(``scores.textual_selection_measure``, ``scores.selection_evidence_words``) candidates, tried at the
chosen tolerance and number of population words (the method's first: ties keep it)."""
MIN_POSITIVES_GRID: tuple[int, ...] = (5, 10, 20, 40)
"""``scores.population_min_positives`` values swept."""
SELECTION_KEYS: tuple[str, ...] = ("select_by_detection", "selection_tolerance", "selection_population_words",
                                   "textual_selection_measure", "selection_evidence_words")
"""The ``scores`` fields concept selection's calibration chooses (each candidate row holds them all)."""
COVERAGE_ALONE_GRID: tuple[float, ...] = (0.0, 0.9, 0.925, 0.95, 0.975)
"""``scores.textual_coverage_alone_threshold`` values swept at the best gate (0: off, first so ties keep it off)."""
LABEL_RULE_KEYS: tuple[str, ...] = ("visual_threshold", "textual_threshold", "visual_population_threshold",
                                    "textual_population_threshold", "textual_coverage_threshold",
                                    "textual_precision_threshold", "textual_coverage_alone_threshold",
                                    "population_min_positives")
"""The ``scores`` fields the sweep chooses (contrast thresholds first)."""
TEXT_WINDOWS: tuple[tuple[int, str], ...] = ((5, "around"), (2, "around"), (1, "around"), (5, "before"),
                                            (2, "before"), (1, "before"))
"""(``embedders.text_window``, ``embedders.text_window_context``) candidates: the method's first."""


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
def _encode(labels: list[str], classes: list[str]) -> np.ndarray:
    where = {c: i for i, c in enumerate(classes)}
    return np.array([where[x] for x in labels], dtype=np.int64)


def _macro_f1_batch(cm: np.ndarray, present: np.ndarray) -> np.ndarray:
    """sklearn's ``f1_score(average="macro", zero_division=0)`` over the ground truth's classes
    ``present``, for each of a stack of confusion matrices [B, true, predicted]."""
    tp = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    denom = cm.sum(axis=1) + cm.sum(axis=2)
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1[:, present].mean(axis=1)


Gate = tuple[float, float, float, float, float, int]
"""(visual, textual, textual coverage, textual precision, textual coverage alone, min positives)."""


def _gate_grid(gated: bool) -> list[Gate]:
    """The population gates to sweep (coverage alone off: :func:`coverage_alone_gates` sweeps it
    at the best gate); the minimum is swept only where some route is on."""
    if not gated:
        return [(0.0, 0.0, 0.0, 0.0, 0.0, MIN_POSITIVES_GRID[0])]
    return [(vg, tg, tc, tp, 0.0, mp) for vg in POPULATION_GRID for tg in POPULATION_GRID for tc in POPULATION_GRID
            for tp in POPULATION_GRID
            for mp in (MIN_POSITIVES_GRID if (vg > 0 or tg > 0 or tc > 0 or tp > 0) else MIN_POSITIVES_GRID[:1])]


def coverage_alone_gates(best: dict) -> list[Gate]:
    """The best setting's gate with every :data:`COVERAGE_ALONE_GRID` value but 0 (a second, small
    sweep: crossing it with the whole gate grid would multiply the grid by its length)."""
    g = [best[k] for k in LABEL_RULE_KEYS[2:6]]
    return [(*g, a, best["population_min_positives"]) for a in COVERAGE_ALONE_GRID if a > 0]


def threshold_sweep(frames: list[tuple[pl.DataFrame, pl.DataFrame]], mode: str = "masked",
                    gates: list[Gate] | None = None) -> list[dict]:
    """Pooled macro-F1 of the labels against ground truth for every setting of the label rule on the
    grids: both contrast thresholds, both population-gate thresholds (0: no gate) and the gate's
    minimum number of positives (a frame without population columns sweeps the contrast only);
    ``gates`` replaces the gate grid."""
    from msae.score.classify import LABELS

    classes = list(dict.fromkeys([*LABELS, *(x for _, gt in frames for x in gt["gt_modality"].to_list())]))
    parts = []
    for concepts, gt in frames:
        c = concepts.filter(pl.col("prompting") == mode)
        parts.append(gt.select("latent", "gt_modality").join(
            c.with_columns(pl.col("latent").cast(gt.schema["latent"])), on="latent", how="left"))
    j = pl.concat(parts, how="diagonal_relaxed")
    gated = all(col in j.columns for col in POPULATION_COLUMNS)

    def col(name: str, fill: float) -> np.ndarray:
        return j[name].cast(pl.Float64).fill_null(fill).to_numpy() if name in j.columns else np.full(j.height, fill)

    y = _encode(j["gt_modality"].to_list(), classes)
    counts = np.bincount(y, minlength=len(classes))
    present = np.flatnonzero(counts >= MIN_CLASS_SUPPORT)
    if not len(present):  # a tiny world: every class present counts
        present = np.flatnonzero(counts > 0)
    vs, ts = col("visual_score", -np.inf), col("textual_score", -np.inf)
    agree = (j["concepts_agree"].fill_null(False).to_numpy() if "concepts_agree" in j.columns
             else np.zeros(j.height, bool))
    vp, tp = col("visual_population_auroc", -np.inf), col("textual_population_auroc", -np.inf)
    vn, tn = col("visual_population_positives", 0), col("textual_population_positives", 0)
    tc, tm = col("textual_population_coverage", -np.inf), col("textual_population_matches", 0)
    tpr = col("textual_population_precision", -np.inf)
    has_t = (j["textual_concept"].is_not_null().to_numpy() if "textual_concept" in j.columns
             else np.zeros(j.height, bool))
    code = {c: classes.index(c) for c in LABELS}
    grid = np.asarray(THRESHOLD_GRID)
    n_classes, n_grid = len(classes), len(grid)
    pairs = [(vt, tt) for vt in THRESHOLD_GRID for tt in THRESHOLD_GRID]
    offset = (np.arange(n_grid * n_grid) * n_classes * n_classes)[:, None]
    rows = []
    for vg, tg, tcov, tprec, alone, mp in (gates if gates is not None and gated else _gate_grid(gated)):
        # every contrast pair of one gate at once: [visual threshold, textual threshold, latent]
        v_gate = (vp >= vg) & (vn >= mp) if vg > 0 else np.ones(j.height, bool)
        t_gate = (((tp >= tg) & (tn >= mp) if tg > 0 else False) | ((tc >= tcov) & (tm >= mp) if tcov > 0 else False)
                  | ((tpr >= tprec) & (tn >= mp) if tprec > 0 else False))
        if not (tg > 0 or tcov > 0 or tprec > 0):
            t_gate = np.ones(j.height, bool)
        v = ((vs[None, :] >= grid[:, None]) & v_gate)[:, None, :]
        t_alone = (tc >= alone) & (tm >= mp) & has_t if alone > 0 else np.zeros(j.height, bool)
        t = (((ts[None, :] >= grid[:, None]) & t_gate) | t_alone)[None, :, :]
        pred = np.where(v & t & agree, code["multimodal"], np.where(
            v & t, code["mixed"], np.where(v, code["visual"], np.where(t, code["textual"], code["none"]))))
        cells = (offset + y[None, :] * n_classes + pred.reshape(n_grid * n_grid, -1)).ravel()
        cm = np.bincount(cells, minlength=len(pairs) * n_classes * n_classes).reshape(len(pairs), n_classes, n_classes)
        scores = _macro_f1_batch(cm, present)
        for (vt, tt), f1 in zip(pairs, scores):
            rows.append({"visual_threshold": float(vt), "textual_threshold": float(tt),
                         "visual_population_threshold": vg, "textual_population_threshold": tg,
                         "textual_coverage_threshold": tcov, "textual_precision_threshold": tprec,
                         "textual_coverage_alone_threshold": alone, "population_min_positives": mp,
                         "macro_f1": float(f1)})
    rows.sort(key=lambda r: THRESHOLD_GRID.index(r["visual_threshold"]) * n_grid
              + THRESHOLD_GRID.index(r["textual_threshold"]))  # stable: contrast first, then gate, as before
    return rows


def choose_thresholds(sweep: list[dict]) -> dict:
    """The best macro-F1; ties: the contrast pair closest to its grid's centre, then the weakest
    gate (lower population thresholds, then fewer required positives), then grid order."""
    centre = float(np.median(THRESHOLD_GRID))
    best = max(r["macro_f1"] for r in sweep)
    tied = [r for r in sweep if r["macro_f1"] >= best - 1e-12]
    return min(tied, key=lambda r: (abs(r["visual_threshold"] - centre) + abs(r["textual_threshold"] - centre),
                                    r["visual_threshold"], r["textual_threshold"],
                                    r.get("visual_population_threshold", 0) + r.get("textual_population_threshold", 0)
                                    + r.get("textual_coverage_threshold", 0) + r.get("textual_precision_threshold", 0)
                                    + r.get("textual_coverage_alone_threshold", 0),
                                    r.get("population_min_positives", 0)))


def exact_match(frames: list[tuple[pl.DataFrame, pl.DataFrame]], mode: str) -> dict[str, Any]:
    """Share of ground-truth-grounded concepts (each modality, pooled) the proposals name exactly."""
    hits = total = 0
    for chosen, gt in frames:
        c = chosen.filter(pl.col("prompting") == mode).with_columns(pl.col("latent").cast(gt.schema["latent"]))
        j = gt.join(c, on="latent", how="inner")
        for kind in ("visual", "textual"):
            g = j.filter(pl.col(f"gt_{kind}_concept").is_not_null() & pl.col(f"{kind}_concept").is_not_null())
            hits += int((g[f"{kind}_concept"].str.to_lowercase() == g[f"gt_{kind}_concept"]).sum())
            total += g.height
    return {"exact_match": hits / total if total else float("nan"), "n": total}


def selection_candidates(cfg: MsaeConfig, store: Any, keys: list[tuple[int, int]]) -> list[dict]:
    """Concept selection (``scores.select_by_detection`` / ``selection_tolerance``): the pooled exact
    concept match of grounded latents with selection off and at every :data:`SELECTION_TOLERANCES`."""
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.score.population import score_population
    from msae.score.stage import GROUND_TRUTH, load_embedders

    image_text, text = load_embedders(cfg)
    mode = cfg.explainer.prompting[0]
    inputs = [(store.read_parquet(concepts_folder(*k), PROPOSALS),
               store.read_parquet(concepts_folder(*k), GROUND_TRUTH)) for k in keys]
    def selected(tol: float, words: int, measure: str = "similarity", evidence: bool = False) -> dict[str, Any]:
        update = {"select_by_detection": True, "selection_tolerance": tol, "selection_population_words": words,
                  "textual_selection_measure": measure, "selection_evidence_words": evidence}
        scfg = cfg.model_copy(update={"scores": cfg.scores.model_copy(update=update)})
        frames = [(score_population(scfg, store, *k, prop, image_text, text)[0], gt)
                  for k, (prop, gt) in zip(keys, inputs)]
        row = {**update, **exact_match(frames, mode)}
        print(f"concept selection on / {tol} / {words} population words / {measure} / evidence words {evidence}: "
              f"exact match {row['exact_match']:.3f} (n={row['n']})", flush=True)
        return row

    rows = [{"select_by_detection": False, "selection_tolerance": cfg.scores.selection_tolerance,
             "selection_population_words": 0, "textual_selection_measure": "similarity",
             "selection_evidence_words": False, **exact_match(inputs, mode)}]
    print(f"concept selection off: exact match {rows[0]['exact_match']:.3f} (n={rows[0]['n']})", flush=True)
    rows += [selected(tol, 0) for tol in SELECTION_TOLERANCES]
    best = best_selection(rows)
    if best["select_by_detection"]:
        rows += [selected(best["selection_tolerance"], w) for w in SELECTION_POPULATION_WORDS if w]
        best = best_selection(rows)
        rows += [selected(best["selection_tolerance"], best["selection_population_words"], m, e)
                 for m, e in TEXTUAL_READINGS[1:]]
    return rows


def best_selection(rows: list[dict]) -> dict:
    """The highest exact match; ties: the earlier row."""
    return max(rows, key=lambda r: (np.nan_to_num(r["exact_match"], nan=-1.0), -rows.index(r)))


def text_window_candidates(cfg: MsaeConfig, store: Any, keys: list[tuple[int, int]]) -> list[dict]:
    """Per :data:`TEXT_WINDOWS` value: the calibration run's proposals rescored with it, the
    threshold sweep and its best setting (concept selection as ``cfg`` sets it)."""
    from msae.explain.stage import PROPOSALS, concepts_folder
    from msae.latents.evidence import load_evidence
    from msae.score.stage import GROUND_TRUTH, load_embedders, score_partition_full, store_pools

    image_text, text = load_embedders(cfg)
    inputs = []
    for k in keys:
        proposals = store.read_parquet(concepts_folder(*k), PROPOSALS)
        evidence = load_evidence(store, *k, sorted(set(proposals["latent"].to_list())))
        inputs.append((k, proposals, evidence, store.read_parquet(concepts_folder(*k), GROUND_TRUTH)))
    out = []
    for window, context in TEXT_WINDOWS:
        wcfg = cfg.model_copy(update={"embedders": cfg.embedders.model_copy(
            update={"text_window": window, "text_window_context": context})})
        pools = store_pools(wcfg, store, np.random.default_rng([wcfg.scores.seed, 2]))
        frames = [(score_partition_full(wcfg, store, *k, ev, prop, image_text, text, pools), gt)
                  for k, prop, ev, gt in inputs]
        sweep = threshold_sweep(frames, cfg.explainer.prompting[0])
        sweep += threshold_sweep(frames, cfg.explainer.prompting[0], coverage_alone_gates(choose_thresholds(sweep)))
        out.append({"text_window": window, "text_window_context": context, "best": choose_thresholds(sweep),
                    "sweep": sweep})
        print(f"text_window {window} / {context}: best {out[-1]['best']}", flush=True)
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
    selection = selection_candidates(cfg, store, keys)
    best_sel = best_selection(selection)
    data["scores"] = {**data.get("scores", {}), **{k: best_sel[k] for k in SELECTION_KEYS}}
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
                   "embedders.text_window_context": best_w["text_window_context"],
                   **{f"scores.{k}": best_sel[k] for k in SELECTION_KEYS},
                   **{f"scores.{k}": best_t[k] for k in LABEL_RULE_KEYS}},
        "evidence_candidates": evidence,
        "selection_candidates": selection,
        "text_window_candidates": [{"text_window": r["text_window"], "text_window_context": r["text_window_context"],
                                    **r["best"]} for r in windows],
        "threshold_sweep_best": best_t,
        # the sweep's two faces through the best setting (the whole grid is ~10^6 rows): the contrast
        # pairs at the best gate, and the gates at the best contrast pair and minimum of positives
        "threshold_sweep": [r for r in sweep if all(r[k] == best_t[k] for k in LABEL_RULE_KEYS[2:])],
        "gate_sweep": [r for r in sweep if all(r[k] == best_t[k] for k in (*LABEL_RULE_KEYS[:2], LABEL_RULE_KEYS[-1]))],
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
