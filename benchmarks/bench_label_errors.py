"""Where the labels go wrong: the pooled confusion of a store, and why ground-truth textual latents
were labelled none.

Reads, per layer × width of the embedded profile, ``concepts.parquet`` (masked prompting, its stored
labels) joined with ``ground_truth.parquet`` — the same join as the report's confusions — and sums
them. For the textual latents labelled none it tells apart: named ``<answer position>`` while the
ground truth names another word; named another wrong word; no concept; named right (then the label
rule, not the name, turned it down); and counts those whose ground-truth word is in none of their top
texts (the words they are active on there). Nothing is recomputed.

``python benchmarks/bench_label_errors.py [--store outputs/embedded] [--write]`` (after ``make demo``).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CLASSES = ("visual", "textual", "multimodal", "mixed", "none")


def joined(store_dir: str):
    """The masked rows of every partition's concepts.parquet with its ground truth, stacked."""
    import polars as pl

    from msae.config import load_config
    from msae.explain.stage import concepts_folder
    from msae.score.stage import CONCEPTS, GROUND_TRUTH
    from msae.store import Store

    from msae.latents.evidence import load_evidence
    from msae.score.population import evidence_words

    cfg = load_config(profile="embedded")
    store = Store(str(Path(store_dir).resolve()))
    parts = []
    for layer in cfg.layers:
        for width in cfg.widths:
            folder = concepts_folder(layer, width)
            c = store.read_parquet(folder, CONCEPTS).filter(pl.col("prompting") == cfg.explainer.prompting[0])
            gt = store.read_parquet(folder, GROUND_TRUTH)
            j = c.join(gt.with_columns(pl.col("latent").cast(c.schema["latent"])), on="latent")
            # is the ground truth's word among the words the latent is active on in its top texts?
            grounded = j.filter(pl.col("gt_textual_concept").is_not_null())
            evidence = load_evidence(store, layer, width, grounded["latent"].to_list())
            shown = {lat: set(evidence_words(ev.texts, cfg.explainer.examples)) for lat, ev in evidence.items()}
            in_top = [None if w is None else w in shown.get(lat, set())
                      for lat, w in zip(j["latent"].to_list(), j["gt_textual_concept"].to_list())]
            parts.append(j.with_columns(pl.lit(f"{layer} × {width}").alias("partition"),
                                        pl.Series("gt_word_in_top_texts", in_top, dtype=pl.Boolean)))
    return pl.concat(parts, how="diagonal_relaxed")


def textual_misses(j) -> dict[str, object]:
    """Ground-truth textual latents labelled none, by what their textual concept was."""
    import polars as pl

    from msae.latents.answer_position import ANSWER_POSITION

    miss = j.filter((pl.col("gt_modality") == "textual") & (pl.col("modality") == "none"))
    named, truth = miss["textual_concept"].to_list(), miss["gt_textual_concept"].to_list()
    kinds = Counter()
    instead = Counter()
    for n, t in zip(named, truth):
        n = n.strip().lower() if n else None
        if n is None:
            kinds["no concept"] += 1
        elif n == t:
            kinds["named right"] += 1
        elif n == ANSWER_POSITION:
            kinds["named <answer position>, ground truth another word"] += 1
            instead[t] += 1
        else:
            kinds["named another wrong word"] += 1
    by_auroc = miss.filter(pl.col("gt_textual_rule") == "auroc")
    return {"n": miss.height, "by_auroc": by_auroc.height,
            "absent": int((~miss["gt_word_in_top_texts"].fill_null(True)).sum()),
            "absent_by_auroc": int((~by_auroc["gt_word_in_top_texts"].fill_null(True)).sum()), "found": j.filter((pl.col("gt_modality") == "textual")
                                                & (pl.col("modality") == "textual")).height,
            "total": j.filter(pl.col("gt_modality") == "textual").height, "kinds": kinds, "instead": instead}


def report(j) -> str:
    counts = Counter(zip(j["gt_modality"].to_list(), j["modality"].to_list()))
    lines = ["Pooled confusion (rows: ground truth, columns: label):", "",
             "| | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    lines += [f"| **{g}** | " + " | ".join(str(counts[(g, m)]) for m in CLASSES) + " |" for g in CLASSES]
    lines += ["", "Per partition, latents labelled their ground-truth class / ground-truth latents of the class, and "
              "how many of them were labelled none:", "",
              "| layer × width | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for part in dict.fromkeys(j["partition"].to_list()):
        pc = Counter(zip(*(j.filter(j["partition"] == part)[c].to_list() for c in ("gt_modality", "modality"))))
        cells = [f"{pc[(g, g)]} / {sum(v for (a, _), v in pc.items() if a == g)}"
                 + (f" (none {pc[(g, 'none')]})" if g != "none" else "") for g in CLASSES]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    t = textual_misses(j)
    lines += ["", f"Ground-truth textual latents: {t['found']} of {t['total']} labelled textual, {t['n']} labelled "
              "none. Of those:", ""]
    lines += [f"- {k}: {v}" for k, v in t["kinds"].most_common()]
    lines += ["", f"Of the {t['n']}, {t['by_auroc']} are grounded by AUROC (coverage) and {t['absent']} have the ground "
              f"truth's word among none of the words they are active on in their top texts "
              f"({t['absent_by_auroc']} of them grounded by AUROC): no reading of the evidence can name those."]
    if t["instead"]:
        lines += ["", "The ground truth's words where the concept was `<answer position>`: "
                  + ", ".join(f"{w} {n}" for w, n in t["instead"].most_common()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="outputs/embedded")
    ap.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    text = report(joined(args.store))
    print(text)
    if args.write:
        from results_file import write_section

        write_section(f"## Label errors\n`python benchmarks/bench_label_errors.py --write` on `{args.store}` "
                      "(masked prompting, the stored labels, summed over the layer × width partitions).\n\n"
                      f"{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
