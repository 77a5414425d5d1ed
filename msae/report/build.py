"""The `report` stage: every layer × width partition's results in one static HTML page plus a JSON.

First, per partition, the pipeline's labels against the activation-only ground truth next to every
baseline and control, each as macro-F1 and accuracy with a 95 % bootstrap interval over latents
(:mod:`msae.report.evaluation`):

* majority labeller — every latent gets the ground truth's most frequent class (the trivial bar);
* Modality Score, the firing-ratio census and frequency selectivity — activation-only labellers
  (:mod:`msae.score.baselines`);
* random-SAE control — the same pipeline on a random-weight SAE of the same shape, scored against
  *its own* ground truth; its labels should collapse to the prior. Read where it exists, under
  ``controls/random_sae/concepts/layer=<L>/width=<W>/`` (:mod:`msae.controls`);
* dissection oracle — the real SAE's latents explained by the dissection backend, which reads the
  annotation masks: an upper reference, not a method (``controls/dissection/concepts/…``);
* random-image baseline — ``visual_score_random`` / ``textual_score_random`` of concepts.parquet
  (the score the concept gets on random images / windows) beside the real scores, where present.

Then: ground-truth census at several AUROC thresholds vs the label census, confusion heat-maps,
exact and partial concept match on grounded latents, masked vs whole-image prompting (paired mean
difference and relative gain with bootstrap intervals, per partition and pooled, as a forest plot),
modality census, concept quality, FVU per modality, the threshold ablation and links to example
cards. Written to ``<store>/report/`` (index.html, report.json, PNG plots); report.json holds every
number on the page (NaN written as null).
"""

from __future__ import annotations

import html
import io
import json
import math
from typing import Any

import numpy as np
import polars as pl

from msae.config import MsaeConfig
from msae.score.classify import LABELS, PopulationGate, classify_frame

REPORT = "report"
METHODS = ("pipeline", "majority", "modality_score", "firing_ratio", "selectivity")
METHOD_NAMES = {"pipeline": "pipeline (msae)", "majority": "majority labeller",
                "modality_score": "Modality Score", "firing_ratio": "firing-ratio census",
                "selectivity": "frequency selectivity"}


# --- gathering -----------------------------------------------------------------------------------
def control_folders(layer: int, width: int) -> list[tuple[str, str]]:
    """Where the random-SAE control of a partition lives: (concepts folder, latents folder)."""
    from msae.controls import CONTROL_ROOT
    from msae.explain.stage import concepts_folder
    from msae.latents.stage import latents_folder

    return [(f"{CONTROL_ROOT}/{concepts_folder(layer, width)}", f"{CONTROL_ROOT}/{latents_folder(layer, width)}")]


def load_oracle(store: Any, layer: int, width: int) -> pl.DataFrame | None:
    """The dissection oracle's scored concepts for the real SAE's latents, or None."""
    from msae.controls import ORACLE_ROOT
    from msae.explain.stage import concepts_folder
    from msae.score.stage import CONCEPTS

    return _read_if(store, f"{ORACLE_ROOT}/{concepts_folder(layer, width)}", CONCEPTS)


def _read_if(store: Any, folder: str, name: str) -> pl.DataFrame | None:
    return store.read_parquet(folder, name) if store.exists(folder, name) else None


def load_control(store: Any, layer: int, width: int) -> dict[str, Any] | None:
    """The random-SAE control's concepts, ground truth and stats (the first folder that has
    concepts), or None."""
    from msae.latents.stage import STATS
    from msae.score.stage import CONCEPTS, GROUND_TRUTH

    for cf, lf in control_folders(layer, width):
        if store.exists(cf, CONCEPTS):
            return {"folder": cf, "concepts": store.read_parquet(cf, CONCEPTS), "gt": _read_if(store, cf, GROUND_TRUTH),
                    "stats": _read_if(store, lf, STATS)}
    return None


def load_partitions(cfg: MsaeConfig, store: Any) -> list[dict[str, Any]]:
    """Per layer × width: its SAE metrics, latent stats, scored concepts, ground truth (if any) and
    random-SAE control (if any)."""
    from msae.explain.stage import concepts_folder
    from msae.latents.stage import STATS, latents_folder
    from msae.sae.formats import read_metadata
    from msae.score.evidence_quality import partition_evidence_quality
    from msae.score.stage import CONCEPTS, GROUND_TRUTH

    parts = []
    for layer in cfg.layers:
        for width in cfg.widths:
            cf = concepts_folder(layer, width)
            parts.append({
                "layer": layer, "width": width, "key": f"{layer}|{width}",
                "sae": read_metadata(store.url(store.sae_name(layer, width))),
                "stats": store.read_parquet(latents_folder(layer, width), STATS),
                "concepts": store.read_parquet(cf, CONCEPTS),
                "gt": _read_if(store, cf, GROUND_TRUTH),
                "control": load_control(store, layer, width),
                "oracle": load_oracle(store, layer, width),
            })
            gt = parts[-1]["gt"]
            parts[-1]["evidence"] = partition_evidence_quality(store, layer, width, gt) if gt is not None else None
    return parts


# --- the numbers ---------------------------------------------------------------------------------
def census(concepts: pl.DataFrame, mode: str) -> dict[str, int]:
    counts = dict(concepts.filter(pl.col("prompting") == mode).group_by("modality").len().iter_rows())
    return {label: int(counts.get(label, 0)) for label in LABELS}


def _label_census(labels: list[str]) -> dict[str, int]:
    return {label: int(sum(v == label for v in labels)) for label in LABELS}


def concept_matches(proposed: str | None, truth: str | None, partial: bool = False) -> bool:
    """Exact: the proposal is the ground-truth concept after normalisation; ``partial``: it shares a
    word with it ("circle" for "red circle")."""
    from msae.report.evaluation import concept_exact, concept_partial

    return concept_partial(proposed, truth) if partial else concept_exact(proposed, truth)


def _baseline_labels(stats: pl.DataFrame) -> pl.DataFrame:
    from msae.score.baselines import firing_ratio_labels, modality_score_labels, selectivity_labels

    return stats.select("latent").with_columns(
        modality_score_labels(stats).alias("modality_score"), firing_ratio_labels(stats).alias("firing_ratio"),
        selectivity_labels(stats).alias("selectivity"))


def _joined(gt: pl.DataFrame, concepts: pl.DataFrame, mode: str, labels: pl.Series | None,
            stats: pl.DataFrame | None) -> pl.DataFrame:
    """Ground truth × the mode's concept rows (× baseline labels when stats are given), on latent."""
    c = concepts.filter(pl.col("prompting") == mode)
    if labels is not None:
        c = c.with_columns(labels.alias("modality"))
    df = gt.join(c.select("latent", pl.col("modality").alias("pipeline"), "visual_concept", "textual_concept"),
                 on="latent", how="inner")
    if stats is not None:
        df = df.join(_baseline_labels(stats), on="latent", how="inner")
    return df


def ground_truth_eval(part: dict[str, Any], mode: str, labels: pl.Series | None = None, *, bootstrap: int = 1000,
                      seed: int = 0, ci: bool = True) -> dict[str, Any] | None:
    """Pipeline labels, the majority labeller and the activation-only baselines against the ground
    truth, on the latents that have both (the explained ones), with bootstrap intervals."""
    from msae.report.evaluation import concept_match, label_metrics
    from msae.score.baselines import majority_label
    from msae.score.ground_truth import gt_census
    from msae.score.metrics import confusion

    gt = part["gt"]
    if gt is None:
        return None
    df = _joined(gt, part["concepts"], mode, labels, part["stats"])
    truth = df["gt_modality"].to_list()
    majority = majority_label(truth)
    df = df.with_columns(pl.lit(majority).alias("majority"))
    out: dict[str, Any] = {"n": df.height, "methods": list(METHODS), "majority_label": majority}
    for name in METHODS:
        out[name] = label_metrics(truth, df[name].to_list(), LABELS, n=bootstrap, seed=seed, ci=ci)
    out["confusion"] = confusion(truth, df["pipeline"].to_list(), list(LABELS))
    if not ci:
        return out
    out["gt_census"] = gt_census(df)
    out["label_census"] = _label_census(df["pipeline"].to_list())
    out["concept_match"] = {}
    for kind in ("visual", "textual"):
        frame = df.filter(pl.col(f"gt_{kind}_concept").is_not_null())
        pairs = list(zip(frame[f"{kind}_concept"].to_list(), frame[f"gt_{kind}_concept"].to_list()))
        m = concept_match(pairs, n=bootstrap, seed=seed)
        out["concept_match"][kind] = m
        out[f"{kind}_concept_accuracy"] = m["exact"][0] if pairs else None
        out[f"{kind}_concept_partial"] = m["partial"][0] if pairs else None
        out[f"n_{kind}_grounded"] = frame.height
    return out


def control_eval(part: dict[str, Any], mode: str, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The random-SAE control: its pipeline labels against its own ground truth, the majority
    labeller on that ground truth, its label census and its ground-truth census."""
    from msae.report.evaluation import label_metrics
    from msae.score.baselines import majority_label
    from msae.score.ground_truth import gt_census

    ctrl = part.get("control")
    if not ctrl:
        return None
    out: dict[str, Any] = {"folder": ctrl["folder"], "census": census(ctrl["concepts"], mode)}
    if ctrl["gt"] is None:
        return out
    df = _joined(ctrl["gt"], ctrl["concepts"], mode, None, None)
    truth = df["gt_modality"].to_list()
    majority = majority_label(truth)
    out |= {"n": df.height, "majority_label": majority, "gt_census": gt_census(df),
            "label_census": _label_census(df["pipeline"].to_list()),
            "pipeline": label_metrics(truth, df["pipeline"].to_list(), LABELS, n=bootstrap, seed=seed),
            "majority": label_metrics(truth, [majority] * df.height, LABELS, n=bootstrap, seed=seed)}
    return out


def oracle_eval(part: dict[str, Any], mode: str, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """The dissection oracle's labels and concepts against the real ground truth (same latents)."""
    if part.get("oracle") is None or part["gt"] is None:
        return None
    g = ground_truth_eval({**part, "concepts": part["oracle"]}, mode, bootstrap=bootstrap, seed=seed)
    if g is None:
        return None
    return {"n": g["n"], "pipeline": g["pipeline"], "label_census": g["label_census"],
            "concept_match": g["concept_match"]}


def random_image_eval(concepts: pl.DataFrame, mode: str, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any] | None:
    """Real vs random-image (random-window) scores of the mode's concepts, and population detection
    vs the same detection with a random other concept: mean [CI] of each and of their paired
    difference, where concepts.parquet has the columns (else None)."""
    from msae.report.evaluation import mean_ci, paired_difference

    c = concepts.filter(pl.col("prompting") == mode)
    out: dict[str, Any] = {}
    for kind, real, rand in (("visual", "visual_score", "visual_score_random"),
                             ("textual", "textual_score", "textual_score_random"),
                             ("visual population", "visual_population_auroc", "visual_population_random"),
                             ("textual population", "textual_population_auroc", "textual_population_random")):
        if real not in c.columns or rand not in c.columns:
            continue
        both = c.select(pl.col(real).cast(pl.Float64), pl.col(rand).cast(pl.Float64)).drop_nulls().drop_nans()
        a, b = both[real].to_numpy(), both[rand].to_numpy()
        out[kind] = {"n": both.height, "real": mean_ci(a, bootstrap, seed), "random": mean_ci(b, bootstrap, seed),
                     "difference": paired_difference(a, b, bootstrap, seed)}
    return out or None


def masked_vs_whole(concepts: pl.DataFrame, cfg: MsaeConfig,
                    on: tuple[str, ...] = ("latent",)) -> dict[str, Any] | None:
    """Visual quality of both modes on the same latents (both kept a concept): paired relative gain
    and paired mean difference (masked − whole), each with a bootstrap interval. ``on``: what
    identifies a latent (add the partition when pooling several SAEs)."""
    from msae.report.evaluation import paired_difference
    from msae.score.metrics import bootstrap_ci, paired_relative_gain

    def mode(name: str, alias: str) -> pl.DataFrame:
        return concepts.filter(pl.col("prompting") == name).select(*on, pl.col("visual_score").alias(alias))

    wide = mode("masked", "m").join(mode("whole", "w"), on=list(on)).drop_nulls()
    if wide.height < 2:
        return None
    m, w = wide["m"].to_numpy(), wide["w"].to_numpy()
    s = cfg.scores
    gain, lo, hi = paired_relative_gain(m, w, n=s.bootstrap, seed=s.seed)
    mm, mlo, mhi = bootstrap_ci(m, n=s.bootstrap, seed=s.seed)
    wm, wlo, whi = bootstrap_ci(w, n=s.bootstrap, seed=s.seed)
    return {"n_latents": wide.height, "masked": [mm, mlo, mhi], "whole": [wm, wlo, whi],
            "gain_pct": [gain, lo, hi], "difference": paired_difference(m, w, s.bootstrap, s.seed),
            "bootstrap": s.bootstrap, "seed": s.seed}


def ablation(part: dict[str, Any], thresholds: list[float], mode: str,
             gate: PopulationGate | None = None) -> list[dict[str, Any]]:
    """Census (and macro-F1 against ground truth, if any) with both contrast thresholds set to each
    value (the population gate, if any, as configured)."""
    rows = []
    c = part["concepts"].filter(pl.col("prompting") == mode)
    for tau in thresholds:
        labels = classify_frame(c, tau, tau, gate)
        row: dict[str, Any] = {"threshold": tau, **{k: int((labels == k).sum()) for k in LABELS}}
        ev = ground_truth_eval(part, mode, labels, ci=False)
        if ev is not None:
            row["macro_f1"] = round(ev["pipeline"]["macro_f1"], 3)
            row["accuracy"] = round(ev["pipeline"]["accuracy"], 3)
        rows.append(row)
    return rows


def settings(cfg: MsaeConfig) -> dict[str, Any]:
    """What the numbers depend on, for whoever reads report.json."""
    from msae.score.baselines import FIRING_RATIO_IMAGE, FIRING_RATIO_MAP, FIRING_RATIO_TEXT

    s = cfg.scores
    gt = {k: v for k, v in s.model_dump(mode="json").items() if k.startswith("gt_")}
    return {"labels_from": cfg.explainer.prompting[0], "visual_threshold": s.visual_threshold,
            "textual_threshold": s.textual_threshold,
            "population_gate": {"visual": s.visual_population_threshold, "textual": s.textual_population_threshold,
                                "textual_coverage": s.textual_coverage_threshold,
                                "textual_precision": s.textual_precision_threshold,
                                "textual_coverage_alone": s.textual_coverage_alone_threshold,
                                "min_positives": s.population_min_positives, "samples": s.population_samples,
                                "strong_fraction": s.population_strong_fraction},
            "concept_selection": {"by_detection": s.select_by_detection, "tolerance": s.selection_tolerance,
                                  "population_words": s.selection_population_words,
                                  "evidence_words": s.selection_evidence_words,
                                  "textual_measure": s.textual_selection_measure},
            "bootstrap": s.bootstrap, "seed": s.seed, "level": 0.95,
            "ground_truth": gt, "methods": {k: METHOD_NAMES[k] for k in METHODS},
            "firing_ratio": {"image_specific_above": FIRING_RATIO_IMAGE, "text_specific_below": FIRING_RATIO_TEXT,
                             "mapping": FIRING_RATIO_MAP}}


def summarise(cfg: MsaeConfig, parts: list[dict[str, Any]]) -> dict[str, Any]:
    mode = cfg.explainer.prompting[0]
    n, seed = cfg.scores.bootstrap, cfg.scores.seed
    out: dict[str, Any] = {"partitions": [], "settings": settings(cfg)}
    for p in parts:
        c = p["concepts"]
        s = p["sae"]
        entry = {
            "layer": p["layer"], "width": p["width"],
            "fvu": {k: s.get(k) for k in ("fvu", "fvu_image", "fvu_text")},
            "census": census(c, mode),
            "explained": int(p["stats"]["explained"].sum()), "dead": int(p["stats"]["dead"].sum()),
            "quality": {m: _describe(c.filter(pl.col("prompting") == m)) for m in cfg.explainer.prompting},
            "ablation": ablation(p, cfg.scores.ablation, mode, PopulationGate.from_scores(cfg.scores)),
            "ground_truth": ground_truth_eval(p, mode, bootstrap=n, seed=seed),
            "evidence": p.get("evidence"),
            "masked_vs_whole": masked_vs_whole(c, cfg) if {"masked", "whole"} <= set(cfg.explainer.prompting) else None,
            "controls": {"random_sae": control_eval(p, mode, n, seed),
                         "random_image": random_image_eval(c, mode, n, seed),
                         "dissection_oracle": oracle_eval(p, mode, n, seed)},
        }
        out["partitions"].append(entry)
    pooled = pl.concat([p["concepts"].with_columns(pl.lit(p["key"]).alias("partition")) for p in parts],
                       how="diagonal_relaxed") if parts else None
    out["pooled_masked_vs_whole"] = masked_vs_whole(pooled, cfg, on=("partition", "latent")) if parts else None
    return out


def _describe(c: pl.DataFrame) -> dict[str, Any]:
    def stat(col: str) -> dict[str, float | int | None]:
        if col not in c.columns:
            return {"n": 0, "mean": None, "median": None}
        s = c[col].drop_nulls()
        return {"n": len(s), "mean": float(s.mean()) if len(s) else None,
                "median": float(s.median()) if len(s) else None}

    return {"visual_score": stat("visual_score"), "textual_score": stat("textual_score"),
            "visual_detection": stat("visual_detection"), "textual_detection": stat("textual_detection"),
            "kept_visual": int(c["visual_concept"].is_not_null().sum()),
            "kept_textual": int(c["textual_concept"].is_not_null().sum())}


# --- plots ---------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def quality_plot(parts: list[dict[str, Any]], modes: list[str]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for mode in modes:
        vals = [v for p in parts for v in p["concepts"].filter(pl.col("prompting") == mode)["visual_score"]
                .drop_nulls().to_list()]
        axes[0].hist(vals, bins=20, range=(0, 1), alpha=0.6, label=f"{mode} ({len(vals)})")
    axes[0].set(title="visual concept quality", xlabel="visual score", ylabel="latents")
    axes[0].legend()
    tvals = [v for p in parts for v in p["concepts"].filter(pl.col("prompting") == modes[0])["textual_score"]
             .drop_nulls().to_list()]
    axes[1].hist(tvals, bins=20, alpha=0.8, color="tab:green")
    axes[1].set(title="textual concept quality", xlabel="textual score")
    return _png(fig)


def ablation_plot(summary: dict[str, Any]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for p in summary["partitions"]:
        rows = p["ablation"]
        if rows and "macro_f1" in rows[0]:
            ax.plot([r["threshold"] for r in rows], [r["macro_f1"] for r in rows], marker="o",
                    label=f"layer {p['layer']}, width {p['width']}")
    ax.set(title="macro-F1 vs ground truth by threshold", xlabel="threshold", ylabel="macro-F1", ylim=(0, 1))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(fig)


def confusion_plot(confusion: pl.DataFrame, title: str) -> bytes:
    """Heat-map of a confusion table (rows: ground truth, columns: pipeline), counts written in."""
    plt = _pyplot()
    labels = [c for c in confusion.columns if c != "true"]
    m = confusion.select(labels).to_numpy()
    fig, ax = plt.subplots(figsize=(4.6, 3.9))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), confusion["true"].to_list(), fontsize=8)
    ax.set(xlabel="pipeline label", ylabel="ground truth", title=title)
    return _png(fig)


def forest_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Masked vs whole per partition and pooled: (name, n, difference [m, lo, hi], gain % [m, lo, hi])."""
    rows = [{"name": f"layer {p['layer']} × {p['width']}", "n": q["n_latents"], "difference": q.get("difference"),
             "gain_pct": q["gain_pct"]} for p in summary["partitions"] if (q := p.get("masked_vs_whole"))]
    if q := summary.get("pooled_masked_vs_whole"):
        rows.append({"name": "pooled", "n": q["n_latents"], "difference": q.get("difference"),
                     "gain_pct": q["gain_pct"]})
    return rows


def forest_plot(rows: list[dict[str, Any]]) -> bytes:
    """Masked − whole visual score (left) and relative gain % (right), each with its 95 % interval."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, max(2.2, 0.9 + 0.45 * len(rows))), sharey=True)
    y = np.arange(len(rows))[::-1]
    for ax, key, title in ((axes[0], "difference", "mean visual score difference, masked − whole"),
                           (axes[1], "gain_pct", "relative gain of masked over whole (%)")):
        for yi, r in zip(y, rows):
            v = r.get(key)
            if not v or any(x is None or not math.isfinite(x) for x in v):
                continue
            pooled = r["name"] == "pooled"
            ax.errorbar(v[0], yi, xerr=[[v[0] - v[1]], [v[2] - v[0]]], fmt="D" if pooled else "o",
                        color="black" if pooled else "tab:blue", capsize=3)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set(title=title)
        ax.title.set_fontsize(9)
    axes[0].set_yticks(y, [f"{r['name']} (n={r['n']})" for r in rows], fontsize=8)
    return _png(fig)


# --- page ----------------------------------------------------------------------------------------
def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    if isinstance(v, list) and len(v) == 3 and all(isinstance(x, float) for x in v):
        return f"{_fmt(v[0])} [{_fmt(v[1])}, {_fmt(v[2])}]"
    return "" if v is None else str(v)


def _with_ci(m: dict[str, Any], key: str) -> list[float] | float:
    ci = m.get(f"{key}_ci")
    return [m[key], *ci] if ci else m[key]


def method_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline table of a partition: pipeline, baselines and controls, macro-F1 and accuracy."""
    g = entry["ground_truth"]
    rows = []
    if g:
        rows += [{"method": METHOD_NAMES[k], "against": "ground truth", "n": g[k]["n"],
                  "macro-F1 [95 % CI]": _with_ci(g[k], "macro_f1"), "accuracy [95 % CI]": _with_ci(g[k], "accuracy")}
                 for k in g["methods"]]
    oracle = (entry.get("controls") or {}).get("dissection_oracle")
    if oracle:
        rows.append({"method": "dissection oracle (reads the annotations)", "against": "ground truth",
                     "n": oracle["pipeline"]["n"], "macro-F1 [95 % CI]": _with_ci(oracle["pipeline"], "macro_f1"),
                     "accuracy [95 % CI]": _with_ci(oracle["pipeline"], "accuracy")})
    ctrl = (entry.get("controls") or {}).get("random_sae")
    if ctrl and "pipeline" in ctrl:
        for k, name in (("pipeline", "random-SAE control: pipeline"), ("majority", "random-SAE control: majority")):
            rows.append({"method": name, "against": "its own ground truth", "n": ctrl[k]["n"],
                         "macro-F1 [95 % CI]": _with_ci(ctrl[k], "macro_f1"),
                         "accuracy [95 % CI]": _with_ci(ctrl[k], "accuracy")})
    return rows


def census_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class: ground-truth census at each AUROC threshold, the pipeline's label census, and the
    control's (where present)."""
    g = entry["ground_truth"]
    ctrl = (entry.get("controls") or {}).get("random_sae") or {}
    if not g or "gt_census" not in g:
        return []
    rows = []
    for label in LABELS:
        row: dict[str, Any] = {"class": label}
        row |= {("GT" if k == "label" else f"GT @ AUROC {k}"): v[label] for k, v in g["gt_census"].items()}
        row["pipeline"] = g["label_census"][label]
        if "gt_census" in ctrl:
            row["random SAE: GT"] = ctrl["gt_census"]["label"][label]
        if ctrl:
            row["random SAE: pipeline"] = ctrl.get("label_census", ctrl["census"])[label]
        rows.append(row)
    return rows


def confusion_name(layer: int, width: int) -> str:
    return f"confusion_layer{layer}_width{width}.png"


def render_html(cfg: MsaeConfig, summary: dict[str, Any], examples: list[dict[str, Any]],
                confusion_pngs: dict[tuple[int, int], str] | None = None) -> str:
    mode = cfg.explainer.prompting[0]
    s = cfg.scores
    confusion_pngs = confusion_pngs or {}
    parts = summary["partitions"]
    sec = [f"<h1>msae report</h1><p>store <code>{html.escape(cfg.store)}</code>; labels from the "
           f"<b>{mode}</b> prompting mode; thresholds visual {s.visual_threshold}, textual "
           f"{s.textual_threshold}; explainer {html.escape(cfg.explainer.backend)}. Intervals: 95 % percentile "
           f"bootstrap over latents, {s.bootstrap} resamples, seed {s.seed}.</p>"]
    if any(p["ground_truth"] for p in parts):
        sec.append(
            "<h2>Labels against ground truth: pipeline, baselines, controls</h2><p>Ground truth from annotations "
            f"and activations only: a concept is grounded when its AUROC ≥ {s.gt_auroc}, or when ≥ "
            f"{s.gt_precision} of the latent's strong tokens (≥ {s.gt_strong_fraction} × its peak, at least "
            f"{s.gt_min_firing}, lift ≥ {s.gt_min_lift}) show it; multimodal = the same concept grounded in both "
            "modalities. Majority labeller: every latent gets the ground truth's most frequent class. Firing-ratio "
            "census: image-specific (&gt; 0.8 of density-normalised firing on image tokens) → visual, "
            "text-specific (&lt; 0.2) → textual, shared → multimodal. The random-SAE control is scored against "
            "its own ground truth.</p>")
        for p in parts:
            if p["ground_truth"]:
                sec.append(f"<h3>layer {p['layer']}, width {p['width']}</h3>" + _table(method_rows(p)))
        rand = [{"layer": p["layer"], "width": p["width"], "score": kind, "n": v["n"], "real": v["real"],
                 "random images / windows": v["random"], "real − random": v["difference"]}
                for p in parts if (ri := (p.get("controls") or {}).get("random_image")) for kind, v in ri.items()]
        sec.append("<h3>Random-image baseline</h3><p>The concept's score on random images (visual) or random "
                   "windows (textual) next to its score on the latent's own evidence; for population detection, "
                   "a random other concept's detection of the same firing items.</p>"
                   + (_table(rand) if rand else "<p><em>not computed (no *_score_random columns)</em></p>"))
        sec.append("<h2>Ground-truth census vs label census</h2>" + "".join(
            f"<h3>layer {p['layer']}, width {p['width']} (n={p['ground_truth']['n']})</h3>" + _table(census_rows(p))
            for p in parts if p["ground_truth"]))
        sec.append("<h2>Confusion (rows: ground truth, columns: pipeline)</h2>" + "".join(
            f"<img src='{html.escape(confusion_pngs[(p['layer'], p['width'])])}' alt='confusion'>"
            for p in parts if (p["layer"], p["width"]) in confusion_pngs))
        match = []
        for p in parts:
            g = p["ground_truth"]
            if g and "concept_match" in g:
                for kind, m in g["concept_match"].items():
                    match.append({"layer": p["layer"], "width": p["width"], "concept": kind,
                                  "grounded latents": m["n"], "exact": m["exact"], "shares a word": m["partial"]})
        sec.append("<h2>Concept match on grounded latents</h2><p>The pipeline's concept vs the ground truth's "
                   "named concept: exact = equal after normalisation, partial = shares a word.</p>" + _table(match))
    ev = [{"layer": p["layer"], "width": p["width"], "top images": p["evidence"]["images"],
           "hit rate": p["evidence"]["hit_rate"], "mask precision": p["evidence"]["mask_precision"]}
          for p in parts if p.get("evidence")]
    if ev:
        sec.append("<h2>Evidence: do the top images show the latent's concept?</h2><p>Over latents whose ground "
                   "truth is visual or multimodal: hit rate = share of top images that show the ground-truth "
                   "concept; mask precision = share of their active patches (what the explainer sees) annotated "
                   "with it (msae.score.evidence_quality).</p>" + _table(ev))
    mvw = [{"partition": r["name"], "latents": r["n"], "masked − whole": r["difference"], "gain %": r["gain_pct"]}
           for r in forest_rows(summary)]
    mvw_detail = [{"layer": p["layer"], "width": p["width"], "masked": p["masked_vs_whole"]["masked"],
                   "whole": p["masked_vs_whole"]["whole"]} for p in parts if p["masked_vs_whole"]]
    sec.append("<h2>Masked vs whole-image prompting</h2><p>Visual score of both modes on the same latents; paired "
               "bootstrap over latents.</p>" + ("<img src='masked_vs_whole.png' alt='forest plot'>" if mvw else "")
               + _table(mvw) + (_table(mvw_detail) if mvw_detail else ""))
    sec.append("<h2>Modality census</h2>" + _table(
        [{"layer": p["layer"], "width": p["width"], "explained": p["explained"], "dead": p["dead"], **p["census"]}
         for p in parts]))
    sec.append("<h2>Reconstruction (held-out FVU)</h2>" + _table(
        [{"layer": p["layer"], "width": p["width"], **p["fvu"]} for p in parts]))
    sec.append("<h2>Concept quality</h2><img src='quality.png' alt='quality histograms'>" + _table(
        [{"layer": p["layer"], "width": p["width"], "mode": m, "kept visual": q["kept_visual"],
          "visual mean": q["visual_score"]["mean"], "kept textual": q["kept_textual"],
          "textual mean": q["textual_score"]["mean"], "visual detection": q["visual_detection"]["mean"],
          "textual detection": q["textual_detection"]["mean"]}
         for p in parts for m, q in p["quality"].items()]))
    sec.append("<h2>Threshold ablation</h2><img src='ablation.png' alt='ablation'>" + "".join(
        f"<h3>layer {p['layer']}, width {p['width']}</h3>" + _table(p["ablation"]) for p in parts))
    sec.append("<h2>Example latents</h2>" + _table([{k: v for k, v in e.items() if k != "href"} for e in examples])
               + "<ul>" + "".join(f"<li><a href='{html.escape(e['href'])}'>{e['label']}: layer {e['layer']} width "
                                  f"{e['width']} latent {e['latent']}</a></li>" for e in examples) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:6px 0}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}th{background:#eee}img{margin:4px}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>msae report</title><style>{style}</style>" \
           f"</head><body>{''.join(sec)}</body></html>"


def example_cards(parts: list[dict[str, Any]], mode: str, per_label: int = 3) -> list[dict[str, Any]]:
    """Links (relative to report/) to a few cards of each label."""
    from msae.latents.stage import latents_folder

    out = []
    for p in parts:
        c = p["concepts"].filter(pl.col("prompting") == mode)
        for label in LABELS:
            for r in c.filter(pl.col("modality") == label).head(per_label).iter_rows(named=True):
                out.append({"layer": p["layer"], "width": p["width"], "label": label, "latent": r["latent"],
                            "visual": r["visual_concept"], "textual": r["textual_concept"],
                            "href": f"../{latents_folder(p['layer'], p['width'])}/cards/latent_{r['latent']:06d}.png"})
    return out


def build_report(cfg: MsaeConfig, store: Any) -> dict[str, Any]:
    """Write report/index.html, report.json and plots; return the summary."""
    parts = load_partitions(cfg, store)
    summary = summarise(cfg, parts)
    examples = example_cards(parts, cfg.explainer.prompting[0])
    store.write_bytes(quality_plot(parts, cfg.explainer.prompting), REPORT, "quality.png")
    store.write_bytes(ablation_plot(summary), REPORT, "ablation.png")
    pngs = {}
    for p in summary["partitions"]:
        if p["ground_truth"]:
            name = confusion_name(p["layer"], p["width"])
            store.write_bytes(confusion_plot(p["ground_truth"]["confusion"], f"layer {p['layer']}, width {p['width']}"),
                              REPORT, name)
            pngs[(p["layer"], p["width"])] = p["confusion_png"] = name
    if rows := forest_rows(summary):
        store.write_bytes(forest_plot(rows), REPORT, "masked_vs_whole.png")
    store.write_bytes(render_html(cfg, summary, examples, pngs).encode(), REPORT, "index.html")
    store.write_bytes(json.dumps(to_json(summary), indent=1, allow_nan=False).encode(), REPORT, "report.json")
    return summary


def to_json(o: Any) -> Any:
    """The summary as plain JSON values: tables as lists of rows, numpy scalars as numbers, NaN/inf
    as null (strict JSON: any parser reads report.json)."""
    if isinstance(o, dict):
        return {str(k): to_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_json(v) for v in o]
    if isinstance(o, pl.DataFrame):
        return to_json(o.to_dicts())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
