"""Masked and blurred views of shapes-world scenes: what an explainer and a scorer see.

Shared by the offline trainers (the shapes CLIP and the shapes-world VLM) so both learn on the
same views the pipeline renders (``msae.latents.render``: inactive patches black, or blurred).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

from msae.world.shapes import Scene, SceneObject, patch_coverage

PATCH_SIZE = 8
BLUR_RADIUS = 5.0


def object_patches(scene: Scene, k: int, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """[G, G] bool: the patches object ``k`` touches at all (an SAE latent that fires on an
    object fires on every patch the object covers, edges included)."""
    return patch_coverage(scene.masks[k : k + 1], patch_size)[0] > 0


def background_patches(scene: Scene, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """[G, G] bool: patches no object touches."""
    cov = patch_coverage(scene.masks, patch_size)
    return ~(cov > 0).any(axis=0) if len(cov) else np.ones(cov.shape[1:], dtype=bool)


def _pixel_mask(keep: np.ndarray, patch_size: int) -> np.ndarray:
    return np.kron(keep, np.ones((patch_size, patch_size), dtype=bool)).astype(bool)


def masked_view(image: Image.Image, keep: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """[H, W, 3] uint8: patches outside ``keep`` painted black."""
    arr = np.asarray(image.convert("RGB")).copy()
    arr[~_pixel_mask(keep, patch_size)] = 0
    return arr


def blurred_view(image: Image.Image, keep: np.ndarray, patch_size: int = PATCH_SIZE,
                 radius: float = BLUR_RADIUS) -> np.ndarray:  # fmt: skip
    """[H, W, 3] uint8: patches outside ``keep`` replaced by the PIL Gaussian blur (``radius``)
    of the whole image, patches inside kept sharp."""
    rgb = image.convert("RGB")
    sharp = np.asarray(rgb)
    blurred = np.asarray(rgb.filter(ImageFilter.GaussianBlur(radius)))
    return np.where(_pixel_mask(keep, patch_size)[..., None], sharp, blurred)


def visible_objects(scene: Scene, keep: np.ndarray, patch_size: int = PATCH_SIZE, min_fraction: float = 0.5,
                    always: int | None = None) -> tuple[SceneObject, ...]:  # fmt: skip
    """Objects with at least ``min_fraction`` of their pixels inside the kept patches (plus
    object ``always``): what a phrase may truthfully describe in a masked or blurred view."""
    pm = _pixel_mask(keep, patch_size)
    out = []
    for k, (obj, mask) in enumerate(zip(scene.objects, scene.masks, strict=True)):
        if k == always or (mask & pm).sum() >= min_fraction * mask.sum():
            out.append(obj)
    return tuple(out)


def pick_keep(scene: Scene, k: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    keep = object_patches(scene, k)
    if not augment:
        return keep
    if rng.random() < 0.25:  # a latent that fires on part of the object
        idx = np.flatnonzero(keep)
        n_keep = max(1, int(math.ceil(len(idx) * rng.uniform(0.6, 1.0))))
        sel = rng.choice(idx, size=n_keep, replace=False)
        keep = np.zeros_like(keep)
        keep.flat[sel] = True
    if rng.random() < 0.25:  # … or spills onto a few neighbouring patches
        grow = keep.copy()
        grow[1:] |= keep[:-1]
        grow[:-1] |= keep[1:]
        grow[:, 1:] |= keep[:, :-1]
        grow[:, :-1] |= keep[:, 1:]
        ring = np.flatnonzero(grow & ~keep)
        if len(ring):
            add = rng.choice(ring, size=min(len(ring), int(rng.integers(1, 4))), replace=False)
            keep = keep.copy()
            keep.flat[add] = True
    return keep
