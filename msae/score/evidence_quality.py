"""How good is the evidence a latent is explained from? Top images against the world's annotations.

For a latent whose ground truth names a visual concept, two numbers over its top images: the *hit
rate* (the share of top images that show the concept at all: an object with that colour / shape /
size / colour–shape pair, or background) and the *mask precision* (the share of the active
patches — what the explainer is shown — whose annotation is the concept). Used to choose the
evidence rule on the calibration world (``msae.calibrate``) and reported on the evaluation world.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl


def image_concepts(objects: pl.DataFrame) -> dict[str, set[str]]:
    """image id → every visual concept name the image shows ("background" always: no scene is full)."""
    out: dict[str, set[str]] = {}
    for r in objects.iter_rows(named=True):
        s = out.setdefault(r["image_id"], {"background"})
        s |= {r["color"], r["shape"], r["size"], f"{r['color']} {r['shape']}"}
    return out


def patch_concepts(annotations: pl.DataFrame) -> dict[str, list[set[str]]]:
    """image id → per base-grid patch (row-major) the visual concept names the patch shows."""
    out: dict[str, list[set[str]]] = {}
    ann = annotations.sort(["image_id", "grid_row", "grid_col"])
    for r in ann.iter_rows(named=True):
        names = ({"background"} if r["color"] is None else
                 {r["color"], r["shape"], r["size"], f"{r['color']} {r['shape']}"})
        out.setdefault(r["image_id"], []).append(names)
    return out


def evidence_quality(top_examples: pl.DataFrame, gt: pl.DataFrame, sample_image: dict[str, str],
                     concepts_of: dict[str, set[str]], patches_of: dict[str, list[set[str]]]) -> dict[str, float]:
    """Hit rate and mask precision (module doc) of one partition's top images, over the latents
    whose ground truth is visual or multimodal; sums and counts, so partitions pool exactly."""
    want = {int(r["latent"]): r["gt_visual_concept"] for r in gt.iter_rows(named=True)
            if r["gt_modality"] in ("visual", "multimodal") and r["gt_visual_concept"]}
    img = top_examples.filter((pl.col("modality") == "image") & pl.col("latent").is_in(list(want)))
    hits = active = on_concept = 0
    for r in img.iter_rows(named=True):
        image = sample_image.get(str(r["sample_id"]), "")
        concept = want[int(r["latent"])]
        hits += concept in concepts_of.get(image, set())
        acts = np.asarray(r["patch_activations"], dtype=np.float64)
        shown = np.flatnonzero(acts > (r["active_threshold"] or 0.0))
        cells = patches_of.get(image, [])
        active += len(shown)
        on_concept += sum(concept in cells[i] for i in shown if i < len(cells))
    return {"images": img.height, "hits": hits, "active_patches": active, "on_concept": on_concept}


def partition_evidence_quality(store: Any, layer: int, width: int, gt: pl.DataFrame) -> dict[str, float] | None:
    """Hit rate and mask precision of a stored partition's top images (None without annotations)."""
    from msae.data.samples import sample_image_ids
    from msae.latents.stage import TOP, latents_folder

    if not (store.exists("world", "objects.parquet") and store.exists("world", "annotations.parquet")):
        return None
    samples = store.read_parquet(store.SAMPLES)
    sample_image = sample_image_ids(samples)
    q = evidence_quality(store.read_parquet(latents_folder(layer, width), TOP), gt, sample_image,
                         image_concepts(store.read_parquet("world", "objects.parquet")),
                         patch_concepts(store.read_parquet("world", "annotations.parquet")))
    return {**q, "hit_rate": q["hits"] / q["images"] if q["images"] else float("nan"),
            "mask_precision": q["on_concept"] / q["active_patches"] if q["active_patches"] else float("nan")}
