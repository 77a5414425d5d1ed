"""The README's labels table, one row per layer × width, from a store's ``report/report.json``.

Columns: the ground-truth census at AUROC 0.9; the pipeline's macro-F1 [95 % CI] and accuracy; the
best of the trivial baselines (majority, Modality Score, firing ratio, selectivity) [CI]; the
random-SAE control against its own majority labeller [CIs]; the dissection oracle [CI]; exact
(partial) concept match on grounded latents; the label census. Nothing is recomputed: every figure
is the report's.

``python benchmarks/labels_table.py [--store outputs/embedded]`` (after ``make demo``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CLASSES = ("visual", "textual", "multimodal", "mixed", "none")
BASELINES = {"majority": "majority", "modality_score": "modality score", "firing_ratio": "firing ratio",
             "selectivity": "selectivity"}
HEADER = ("| layer × width | GT census V / T / MM / mixed / none | pipeline macro-F1 [95 % CI] | accuracy | "
          "best baseline [CI] | random-SAE control vs its majority [CIs] | dissection oracle [CI] | "
          "exact (partial) concept match, visual / textual | label census V / T / MM / mixed / none |\n"
          "|---|---|---|---|---|---|---|---|---|")


def f1_ci(m: dict[str, Any]) -> str:
    return f"{m['macro_f1']:.3f} [{m['macro_f1_ci'][0]:.2f}, {m['macro_f1_ci'][1]:.2f}]"


def census(c: dict[str, int]) -> str:
    return " / ".join(str(c.get(k, 0)) for k in CLASSES)


def row(p: dict[str, Any]) -> str:
    g, controls = p["ground_truth"], p["controls"]
    best = max(BASELINES, key=lambda k: g[k]["macro_f1"])
    match = g["concept_match"]
    return " | ".join([
        f"| {p['layer']} × {p['width']}", census(g["gt_census"]["0.9"]), f1_ci(g["pipeline"]),
        f"{g['pipeline']['accuracy']:.3f}", f"{f1_ci(g[best])} ({BASELINES[best]})",
        f"{f1_ci(controls['random_sae']['pipeline'])} vs {f1_ci(controls['random_sae']['majority'])}",
        f1_ci(controls["dissection_oracle"]["pipeline"]),
        f"{match['visual']['exact'][0]:.2f} ({match['visual']['partial'][0]:.2f}) / {match['textual']['exact'][0]:.2f}",
        census(g["label_census"])]) + " |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="outputs/embedded")
    args = ap.parse_args(argv)
    report = json.loads((Path(args.store) / "report" / "report.json").read_text())
    print("\n".join([HEADER, *(row(p) for p in report["partitions"])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
