"""Ground truth with partial patches left out (the rule) vs kept as background (the rule before).

A patch that an object covers by less than a quarter is neither the object nor background; the
ground truth leaves it out of the visual population (``msae.score.ground_truth``). This compares,
on already materialized stores, the census of both definitions and the pipeline's labels (masked
prompting; the stored scores labelled by the embedded profile's rule) scored against each: how much of a change in macro-F1 is the yardstick.

``python benchmarks/bench_gt_partial.py [--stores outputs/calibration outputs/embedded] [--write]``
(run ``python -m msae.calibrate`` and ``make demo`` first; nothing is recomputed but ground truth).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msae.runtime import THREADS_HELP, bench_threads, threads_option  # noqa: E402

CLASSES = ("visual", "textual", "multimodal", "mixed", "none")


def compare(store_dir: str) -> list[dict]:
    """Per layer × width of the store: census and pipeline macro-F1 [CI] under both definitions."""
    import polars as pl

    from msae.config import load_config
    from msae.report.evaluation import label_metrics
    from msae.score.classify import LABEL_COLUMNS, LABELS, label_frame
    from msae.score.ground_truth import ground_truth_from_config
    from msae.store import Store

    cfg = load_config(profile="embedded")
    store = Store(str(Path(store_dir).resolve()))
    rows = []
    for layer in cfg.layers:
        for width in cfg.widths:
            scored = pl.read_parquet(store.url(f"concepts/layer={layer}/width={width}/concepts.parquet"))
            # relabelled by the profile's rule: the calibration store's own labels predate its choice
            labels = label_frame(scored.filter(pl.col("prompting") == "masked").drop(list(LABEL_COLUMNS)),
                                 cfg.scores).select("latent", "modality")
            out = {"layer": layer, "width": width}
            for name, exclude in (("left out", True), ("as background", False)):
                gt = ground_truth_from_config(store, layer, width, cfg.scores, exclude_partial=exclude)
                j = labels.join(gt.with_columns(pl.col("latent").cast(labels.schema["latent"])), on="latent")
                m = label_metrics(j["gt_modality"].to_list(), j["modality"].to_list(), LABELS,
                                  n=cfg.scores.bootstrap, seed=cfg.scores.seed)
                census = dict(gt.group_by("gt_modality").len().iter_rows())
                out[name] = {"census": [census.get(c, 0) for c in CLASSES], "macro_f1": m["macro_f1"],
                             "ci": m["macro_f1_ci"]}
            rows.append(out)
    return rows


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| store | layer × width | GT census (all latents) V / T / MM / mixed / none: left out | kept as background "
             "| pipeline macro-F1 [95 % CI]: left out | kept as background |", "|---|---|---|---|---|---|"]
    for store, rows in results.items():
        for r in rows:
            a, b = r["left out"], r["as background"]
            lines.append(f"| {store} | {r['layer']} × {r['width']} | {' / '.join(map(str, a['census']))} | "
                         f"{' / '.join(map(str, b['census']))} | {a['macro_f1']:.3f} [{a['ci'][0]:.2f}, {a['ci'][1]:.2f}] | "
                         f"{b['macro_f1']:.3f} [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}] |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", nargs="+", default=["outputs/calibration", "outputs/embedded"])
    ap.add_argument("--threads", type=threads_option, default="auto", help=THREADS_HELP)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    bench_threads(args.threads)
    results = {s: compare(s) for s in args.stores}
    text = table(results)
    print(text)
    if args.write:
        from results_file import write_section

        write_section("## Ground truth: partial patches\n`python benchmarks/bench_gt_partial.py --write` on the "
                      "stores of `python -m msae.calibrate` (calibration world) and `make demo` (evaluation world): "
                      "the ground truth's census, and the pipeline's labels (masked prompting; stored scores "
                      "labelled by the embedded profile's rule) scored against it, with partial patches left out of the visual population (the rule) and kept as background "
                      f"(the rule before).\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
