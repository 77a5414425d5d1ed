"""The `report` stage: every layer × width partition's results in one static HTML page plus a JSON.

Sections: modality census, concept quality distributions, FVU per modality, the threshold
ablation, the ground-truth evaluation (pipeline labels vs the activation-only baselines), masked
vs whole-image prompting (paired relative gain with a bootstrap interval), embedding detection,
and links to example latent cards of each label. Written to ``<store>/report/`` (index.html,
report.json, PNG plots).
"""

from __future__ import annotations

import html
import io
import json
from typing import Any

import numpy as np
import polars as pl

from msae.config import MsaeConfig
from msae.score.classify import LABELS, classify_frame

REPORT = "report"


# --- gathering -----------------------------------------------------------------------------------
def load_partitions(cfg: MsaeConfig, store: Any) -> list[dict[str, Any]]:
    """Per layer × width: its SAE metrics, latent stats, scored concepts and ground truth (if any)."""
    from msae.explain.stage import concepts_folder
    from msae.latents.stage import STATS, latents_folder
    from msae.sae.formats import read_metadata
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
                "gt": store.read_parquet(cf, GROUND_TRUTH) if store.exists(cf, GROUND_TRUTH) else None,
            })
    return parts


# --- the numbers ---------------------------------------------------------------------------------
def census(concepts: pl.DataFrame, mode: str) -> dict[str, int]:
    counts = dict(concepts.filter(pl.col("prompting") == mode).group_by("modality").len().iter_rows())
    return {label: int(counts.get(label, 0)) for label in LABELS}


def concept_matches(proposed: str | None, truth: str | None, partial: bool = False) -> bool:
    """A proposal names the ground-truth concept when it contains all of its words ("red circle" for
    "red circle"); ``partial``: when it shares one ("circle" for "red circle")."""
    if not proposed or not truth:
        return False
    t, p = set(truth.lower().split()), set(proposed.lower().split())
    return bool(t & p) if partial else t <= p


def ground_truth_eval(part: dict[str, Any], mode: str, labels: pl.Series | None = None) -> dict[str, Any] | None:
    """Pipeline labels and the two baselines against the activation-only ground truth."""
    from msae.score.baselines import modality_score_labels, selectivity_labels
    from msae.score.metrics import accuracy, confusion, macro_f1

    gt = part["gt"]
    if gt is None:
        return None
    c = part["concepts"].filter(pl.col("prompting") == mode)
    if labels is not None:
        c = c.with_columns(labels.alias("modality"))
    stats = part["stats"]
    base = stats.select("latent").with_columns(
        modality_score_labels(stats).alias("ms_label"), selectivity_labels(stats).alias("sel_label"))
    df = (gt.join(base, on="latent", how="inner").join(c.select("latent", "modality", "visual_concept",
                                                                "textual_concept"), on="latent", how="inner"))
    truth = df["gt_modality"].to_list()
    out: dict[str, Any] = {"n": df.height}
    for name, col in (("pipeline", "modality"), ("modality_score", "ms_label"), ("selectivity", "sel_label")):
        pred = df[col].to_list()
        out[name] = {"accuracy": accuracy(truth, pred), "macro_f1": macro_f1(truth, pred, list(LABELS))}
    out["confusion"] = confusion(truth, df["modality"].to_list(), list(LABELS))
    has_v = df.filter(pl.col("gt_visual_concept").is_not_null())
    has_t = df.filter(pl.col("gt_textual_concept").is_not_null())
    for kind, frame in (("visual", has_v), ("textual", has_t)):
        pairs = list(zip(frame[f"{kind}_concept"], frame[f"gt_{kind}_concept"]))
        out[f"{kind}_concept_accuracy"] = float(np.mean([concept_matches(p, t) for p, t in pairs])) if pairs else None
        out[f"{kind}_concept_partial"] = (float(np.mean([concept_matches(p, t, partial=True) for p, t in pairs]))
                                          if pairs else None)
    out["n_visual_grounded"], out["n_textual_grounded"] = has_v.height, has_t.height
    return out


def masked_vs_whole(concepts: pl.DataFrame, cfg: MsaeConfig, on: tuple[str, ...] = ("latent",)) -> dict[str, Any] | None:
    """Visual quality of both modes on the same latents (both kept a concept): paired gain + CI.
    ``on``: what identifies a latent (add the partition when pooling several SAEs)."""
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
            "gain_pct": [gain, lo, hi], "bootstrap": s.bootstrap, "seed": s.seed}


def ablation(part: dict[str, Any], thresholds: list[float], mode: str) -> list[dict[str, Any]]:
    """Census (and macro-F1 against ground truth, if any) with both thresholds set to each value."""
    rows = []
    c = part["concepts"].filter(pl.col("prompting") == mode)
    for tau in thresholds:
        labels = classify_frame(c, tau, tau)
        row: dict[str, Any] = {"threshold": tau, **{k: int((labels == k).sum()) for k in LABELS}}
        ev = ground_truth_eval(part, mode, labels)
        if ev is not None:
            row["macro_f1"] = round(ev["pipeline"]["macro_f1"], 3)
            row["accuracy"] = round(ev["pipeline"]["accuracy"], 3)
        rows.append(row)
    return rows


def summarise(cfg: MsaeConfig, parts: list[dict[str, Any]]) -> dict[str, Any]:
    mode = cfg.explainer.prompting[0]
    out: dict[str, Any] = {"partitions": []}
    for p in parts:
        c = p["concepts"]
        s = p["sae"]
        entry = {
            "layer": p["layer"], "width": p["width"],
            "fvu": {k: s.get(k) for k in ("fvu", "fvu_image", "fvu_text")},
            "census": census(c, mode),
            "explained": int(p["stats"]["explained"].sum()), "dead": int(p["stats"]["dead"].sum()),
            "quality": {m: _describe(c.filter(pl.col("prompting") == m)) for m in cfg.explainer.prompting},
            "ablation": ablation(p, cfg.scores.ablation, mode),
            "ground_truth": ground_truth_eval(p, mode),
            "masked_vs_whole": masked_vs_whole(c, cfg) if {"masked", "whole"} <= set(cfg.explainer.prompting) else None,
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


# --- plots and page ------------------------------------------------------------------------------
def quality_plot(parts: list[dict[str, Any]], modes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for mode in modes:
        vals = [v for p in parts for v in p["concepts"].filter(pl.col("prompting") == mode)["visual_score"]
                .drop_nulls().to_list()]
        axes[0].hist(vals, bins=20, range=(0, 1), alpha=0.6, label=f"{mode} ({len(vals)})")
    axes[0].set(title="visual concept quality", xlabel="P(own concept)", ylabel="latents")
    axes[0].legend()
    tvals = [v for p in parts for v in p["concepts"].filter(pl.col("prompting") == modes[0])["textual_score"]
             .drop_nulls().to_list()]
    axes[1].hist(tvals, bins=20, alpha=0.8, color="tab:green")
    axes[1].set(title="textual concept quality", xlabel="cosine(window, concept)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def ablation_plot(summary: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for p in summary["partitions"]:
        rows = p["ablation"]
        if rows and "macro_f1" in rows[0]:
            ax.plot([r["threshold"] for r in rows], [r["macro_f1"] for r in rows], marker="o",
                    label=f"layer {p['layer']}, width {p['width']}")
    ax.set(title="macro-F1 vs ground truth by threshold", xlabel="threshold", ylabel="macro-F1", ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list) and len(v) == 3 and all(isinstance(x, float) for x in v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"
    return "" if v is None else str(v)


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


def render_html(cfg: MsaeConfig, summary: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    mode = cfg.explainer.prompting[0]
    sec = [f"<h1>msae report</h1><p>store <code>{html.escape(cfg.store)}</code>; labels from the "
           f"<b>{mode}</b> prompting mode; thresholds visual {cfg.scores.visual_threshold}, textual "
           f"{cfg.scores.textual_threshold}; explainer {html.escape(cfg.explainer.backend)}.</p>"]
    parts = summary["partitions"]
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
    mvw = [{"layer": p["layer"], "width": p["width"], "latents": p["masked_vs_whole"]["n_latents"],
            "masked": p["masked_vs_whole"]["masked"], "whole": p["masked_vs_whole"]["whole"],
            "gain %": p["masked_vs_whole"]["gain_pct"]} for p in parts if p["masked_vs_whole"]]
    if summary.get("pooled_masked_vs_whole"):
        q = summary["pooled_masked_vs_whole"]
        mvw.append({"layer": "all", "width": "all", "latents": q["n_latents"], "masked": q["masked"],
                    "whole": q["whole"], "gain %": q["gain_pct"]})
    sec.append("<h2>Masked vs whole-image prompting</h2><p>Visual quality on the same latents and blurred "
               f"images, mean [95 % bootstrap interval, {cfg.scores.bootstrap} resamples, seed "
               f"{cfg.scores.seed}].</p>" + _table(mvw))
    gt_rows = []
    for p in parts:
        g = p["ground_truth"]
        if g:
            gt_rows += [{"layer": p["layer"], "width": p["width"], "method": name, "accuracy": g[name]["accuracy"],
                         "macro-F1": g[name]["macro_f1"]} for name in ("pipeline", "modality_score", "selectivity")]
    if gt_rows:
        sec.append("<h2>Against ground truth</h2><p>Ground truth from annotations and activations only "
                   f"(AUROC ≥ {cfg.scores.gt_auroc}); baselines: Modality Score (Papadimitriou et al. 2025) and "
                   "frequency selectivity.</p>" + _table(gt_rows))
        for p in parts:
            g = p["ground_truth"]
            if g:
                sec.append(f"<h3>layer {p['layer']}, width {p['width']}: confusion (rows truth)</h3>"
                           + _table(g["confusion"].to_dicts() if hasattr(g["confusion"], "to_dicts") else g["confusion"])
                           + f"<p>concept accuracy on grounded latents — visual: exact "
                           f"{_fmt(g['visual_concept_accuracy'])}, shares a word {_fmt(g['visual_concept_partial'])} "
                           f"(n={g['n_visual_grounded']}); textual: exact {_fmt(g['textual_concept_accuracy'])}, "
                           f"shares a word {_fmt(g['textual_concept_partial'])} (n={g['n_textual_grounded']})</p>")
    sec.append("<h2>Threshold ablation</h2><img src='ablation.png' alt='ablation'>" + "".join(
        f"<h3>layer {p['layer']}, width {p['width']}</h3>" + _table(p["ablation"]) for p in parts))
    sec.append("<h2>Example latents</h2>" + _table(
        [{k: v for k, v in e.items() if k != "href"} for e in examples]).replace("<td>", "<td>", 1)
        + "<ul>" + "".join(f"<li><a href='{html.escape(e['href'])}'>{e['label']}: layer {e['layer']} width "
                           f"{e['width']} latent {e['latent']}</a></li>" for e in examples) + "</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;margin:6px 0}"
             "td,th{border:1px solid #bbb;padding:2px 6px;font-size:13px}th{background:#eee}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>msae report</title><style>{style}</style>" \
           f"</head><body>{''.join(sec)}</body></html>"


def build_report(cfg: MsaeConfig, store: Any) -> dict[str, Any]:
    """Write report/index.html, report.json and plots; return the summary."""
    parts = load_partitions(cfg, store)
    summary = summarise(cfg, parts)
    examples = example_cards(parts, cfg.explainer.prompting[0])
    store.write_bytes(quality_plot(parts, cfg.explainer.prompting), REPORT, "quality.png")
    store.write_bytes(ablation_plot(summary), REPORT, "ablation.png")
    store.write_bytes(render_html(cfg, summary, examples).encode(), REPORT, "index.html")
    store.write_bytes(json.dumps(summary, default=_json_default, indent=1).encode(), REPORT, "report.json")
    return summary


def _json_default(o: Any) -> Any:
    if isinstance(o, pl.DataFrame):
        return o.to_dicts()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))
