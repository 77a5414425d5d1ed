"""Planted multimodality, checked before any SAE: probe transfer from image patches to words.

Runs the pipeline's own sample and extraction code (no Dagster) on a shapes world with the
embedded VLM, then, per captured layer, fits a linear probe per colour / shape / size on image
patches and applies it to text tokens (``msae.embedded.probe``). World v2's VLM is built so that
colour probes transfer (AUROC ≥ 0.85: the image and the word share a direction) and shape and size
probes do not (≤ 0.6).

``python benchmarks/bench_world_probe.py [--seed 4321] [--n-images 300] [--write]``
(seed 4321 is the calibration world; the embedded run's evaluation world is never used here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msae.runtime import THREADS_HELP, bench_threads, threads_option  # noqa: E402


def extract_world(store_dir: str, model: str, seed: int, n_images: int, layers: list[int],
                  questions_per_image: int = 2):
    """samples + activations of a shapes world into ``store_dir``; returns (config, store)."""
    import yaml

    from msae.config import parse_config, profile_text
    from msae.data.samples import build_samples, write_samples
    from msae.extract.extractor import extract_activations
    from msae.store import Store
    from msae.vlm.load import load_vlm

    data = yaml.safe_load(profile_text("embedded"))
    data["store"] = store_dir
    data["layers"] = layers
    data["model"]["name_or_path"] = model
    data["dataset"]["shapes"] = {**data["dataset"]["shapes"], "seed": seed, "n_images": n_images,
                                 "questions_per_image": questions_per_image}
    for key in ("calibration",):
        data.pop(key, None)
    cfg = parse_config(data)
    store = Store(cfg.store)
    write_samples(build_samples(cfg.dataset, store), store)
    samples = store.read_parquet(store.SAMPLES)
    extract_activations(samples, load_vlm(cfg.model), cfg.layers, store, cfg.extraction, progress=False)
    return cfg, store


def probe_store(store, layers: list[int], seed: int = 0) -> dict:
    """Transfer AUROCs per layer and attribute (see ``msae.embedded.probe``)."""
    import numpy as np
    import zarr

    from msae.data.samples import sample_image_ids
    from msae.embedded.probe import probe_transfer, summarise
    from msae.world.shapes import COLORS, SHAPES, SIZES

    tokens = store.read_parquet(store.TOKENS)
    samples = store.read_parquet(store.SAMPLES)
    sample_image = sample_image_ids(samples)
    ann = store.read_parquet("world", "annotations.parquet")
    out: dict = {}
    for layer in layers:
        acts = np.asarray(zarr.open_array(store=store.zarr_store(store.activations_name(layer), read_only=True))[:])
        per = {}
        for attribute, values in (("color", list(COLORS)), ("shape", list(SHAPES)), ("size", list(SIZES))):
            res = probe_transfer(acts, tokens, sample_image, ann, attribute, values, seed=seed)
            per[attribute] = {"values": res, "summary": summarise(res)}
        out[str(layer)] = per
    return out


def table(result: dict) -> str:
    lines = ["| layer | attribute | transfer AUROC min / median / max | held-out image AUROC (mean) | values |",
             "|---|---|---|---|---|"]
    for layer, per in result.items():
        for attr, r in per.items():
            s = r["summary"]
            if not s.get("n"):
                lines.append(f"| {layer} | {attr} | – | – | 0 |")
                continue
            lines.append(f"| {layer} | {attr} | {s['text_min']:.3f} / {s['text_median']:.3f} / {s['text_max']:.3f} "
                         f"| {s['image_mean']:.3f} | {s['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data" / "shapes-llava"))
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--n-images", type=int, default=300)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--threads", type=threads_option, default="auto", help=THREADS_HELP)
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    args.threads = bench_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        _, store = extract_world(tmp, args.model, args.seed, args.n_images, args.layers)
        result = probe_store(store, args.layers)
    text = table(result)
    print(text)
    print(json.dumps({k: {a: r["summary"] for a, r in v.items()} for k, v in result.items()}, indent=1))
    if args.write:
        from results_file import write_section

        write_section(f"## World probe\n`python benchmarks/bench_world_probe.py --seed {args.seed} "
                      f"--n-images {args.n_images} --write` (calibration world; extraction by the pipeline's own "
                      f"code). World v2's aim: colour ≥ 0.85 at every captured layer (the image and the word share "
                      f"a direction), shape ≤ 0.6.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
