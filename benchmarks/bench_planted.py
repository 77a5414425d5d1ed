"""Planted-feature benchmark through the `sae` stage's own code path (`msae.sae.stage.fit_sae`).

Planted activations (:func:`msae.sae.planted.make_planted`: a third of the features fire only on
image rows, a third only on text rows, a third on both) are written as a store's
``activations/layer=0.zarr`` + ``tokens.parquet`` + the activations manifest, exactly where the
`activations` stage leaves them; ``fit_sae`` trains an SAE with as many latents as true features,
evaluates it on held-out samples and saves it; the saved folder is loaded back and scored:

* feature recovery — per true direction the best cosine with a decoder row (mean, share > 0.9);
* per-modality firing — for each true feature, the share of its best latent's firings (and
  activation mass) on image rows vs the planted share, and whether image-only / text-only / both
  is recovered (label from the mass share: >= 0.9 image, <= 0.1 text).

    .venv/bin/python benchmarks/bench_planted.py [--write]    # --write: update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from msae.config import parse_config
from msae.manifest import Manifest, save_manifest
from msae.runtime import THREADS_HELP, bench_threads, threads_option
from msae.sae.formats import load_sae
from msae.sae.planted import feature_recovery, make_planted, modality_recovery, write_zarr
from msae.sae.stage import fit_sae
from msae.store import Store
from results_file import write_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Planted features"


def planted_config(store: str, k: int, token_budget: int, lr: float, seed: int, width: int):
    """A full msae config whose `sae` section is what is benchmarked (dataset/model are unused)."""
    return parse_config({
        "store": store, "dataset": {"kind": "shapes"}, "model": {"name_or_path": "unused", "device": "cpu"},
        "layers": [0], "widths": [width],
        "sae": {"k": k, "token_budget": token_budget, "batch_size": 1024, "lr": lr, "seed": seed,
                "buffer_rows": 16384, "eval_fraction": 0.1, "loss_samples": 0},
    })


def run(store_root: str | Path, *, n_rows: int = 131_072, d: int = 64, n_features: int = 48, k: int = 6,
        token_budget: int = 4_000_000, lr: float = 4e-3, seed: int = 0) -> dict[str, Any]:
    store = Store(str(store_root))
    data = make_planted(n_rows=n_rows, d=d, n_features=n_features, seed=seed)
    store.makedirs("activations")
    write_zarr(store.zarr_store(store.activations_name(0)), data.activations)
    tokens = data.tokens.with_columns(  # numpy object columns (str or None) as nullable strings
        [pl.Series(c, data.tokens[c].to_list(), dtype=pl.Utf8) for c, t in data.tokens.schema.items() if t == pl.Object])
    store.write_parquet(tokens, store.TOKENS)
    save_manifest(store, Manifest("activations", "planted", f"planted-{seed}", {"layer": 0, "rows": n_rows}), "0")

    cfg = planted_config(str(store_root), k, token_budget, lr, seed, n_features)
    t0 = time.perf_counter()
    result = fit_sae(cfg, store, layer=0, width=n_features, vlm=None, device="cpu")
    wall = time.perf_counter() - t0

    sae = load_sae(store.path(store.sae_name(0, n_features)))
    rec = feature_recovery(sae.W_dec.detach(), data.truth)
    mod = modality_recovery(sae, data.activations, data.tokens, data.truth, rec)
    truth_mod = data.truth.modality
    label = np.where(mod.learned_image_mass >= 0.9, "image", np.where(mod.learned_image_mass <= 0.1, "text", "both"))
    per_modality = {
        m: {"n": int((truth_mod == m).sum()),
            "mean_max_cos": float(rec.max_cos[truth_mod == m].mean()),
            "label_accuracy": float((label[truth_mod == m] == m).mean()),
            "image_share_true": float(mod.true_image_share[truth_mod == m].mean()),
            "image_share_learned": float(np.nanmean(mod.learned_image_mass[truth_mod == m]))}
        for m in ("image", "text", "both")
    }
    return {
        "n_rows": n_rows, "d": d, "n_features": n_features, "k": k, "token_budget": token_budget, "lr": lr,
        "wall_s": wall, **result.metrics(),
        "mean_max_cos": rec.mean_max_cos, "frac_cos_gt_0_9": rec.fraction_above(0.9),
        "modality_mae_count": mod.mean_abs_error, "modality_mae_mass": mod.mean_abs_error_mass,
        "modality_label_accuracy": mod.label_accuracy, "per_modality": per_modality,
    }


def report(res: dict[str, Any], command: str) -> str:
    lines = [
        SECTION, "",
        f"`{command}` — {dt.date.today().isoformat()}, {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s). Same path as the `sae` asset: planted rows written as "
        "`<store>/activations/layer=0.zarr` + `tokens.parquet` + the activations manifest, then "
        "`msae.sae.stage.fit_sae` (train, evaluate on held-out samples, save in sparsify layout); the saved "
        "folder is loaded back and scored.",
        "",
        f"{res['n_rows']:,} rows × d={res['d']}, {res['n_features']} true features (⅓ image-only, ⅓ text-only, "
        f"⅓ both; ~4 active per row), SAE width = {res['n_features']}, k = {res['k']}, "
        f"{res['token_budget']:,} training tokens, lr {res['lr']}; fit_sae wall time {res['wall_s']:.1f} s.",
        "",
        "| held-out FVU | FVU image | FVU text | L0 | dead | mean max cos | share cos > 0.9 | "
        "image-share MAE (count) | image-share MAE (mass) | modality label accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {res['fvu']:.4f} | {res['fvu_image']:.4f} | {res['fvu_text']:.4f} | {res['l0']:.2f} | "
        f"{res['dead_fraction']:.3f} | {res['mean_max_cos']:.4f} | {res['frac_cos_gt_0_9']:.3f} | "
        f"{res['modality_mae_count']:.3f} | {res['modality_mae_mass']:.3f} | {res['modality_label_accuracy']:.3f} |",
        "",
        "| planted modality | features | mean max cos | label accuracy | true image share | learned image share (mass) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in res["per_modality"].items():
        lines.append(f"| {m} | {r['n']} | {r['mean_max_cos']:.4f} | {r['label_accuracy']:.3f} | "
                     f"{r['image_share_true']:.3f} | {r['image_share_learned']:.3f} |")
    lines += ["", "Image share = share of the best-matching latent's firings on image rows (mass: weighted by "
              "activation, so TopK's forced small firings count little); label: ≥ 0.9 image, ≤ 0.1 text, else both.",
              ""]
    return "\n".join(lines)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=threads_option, default="auto", help=THREADS_HELP)
    parser.add_argument("--write", action="store_true", help=f"replace/append '{SECTION}' in {RESULTS.name}")
    args = parser.parse_args()
    args.threads = bench_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="msae-planted-") as tmp:
        res = run(Path(tmp) / "store")
    command = ".venv/bin/python benchmarks/bench_planted.py" + (" --write" if args.write else "")
    text = report(res, command)
    print(text)
    if args.write:
        write_section(text)
        print(f"(written to {RESULTS})")


if __name__ == "__main__":
    main()
