"""Does the residual stream share an image/text direction per concept? A check before any SAE.

World v2's VLM is built so that colours are multimodal (a red patch and the word "red" share a
direction) while shapes and sizes are visual only. This module checks that from activations and
annotations alone: for each value of an attribute, a linear probe (logistic regression) is fit on
base-view image patches ("this patch shows a red object" vs every other patch, background
included) of half the images, checked on the other half's patches, and then applied unchanged to
text tokens: AUROC of the probe's score for the tokens that *are* the word ("red") against every
other text token. High transfer (≥ 0.85) means the image concept lives along the word's
direction; ~0.5 or below means it does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl


def patch_labels(tokens: pl.DataFrame, sample_image: Mapping[str, str], annotations: pl.DataFrame,
                 attribute: str) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(rows, image id per row, attribute value per row) for the base-view image rows of ``tokens``
    (its row order = activation rows); background patches get None."""
    base = tokens.with_row_index("row").filter((pl.col("modality") == "image") & (pl.col("view") == "base"))
    base = base.with_columns(pl.col("sample_id").replace_strict(dict(sample_image), default=None).alias("image_id"))
    missing = base.filter(pl.col("image_id").is_null())
    if missing.height:
        raise ValueError(f"{missing['sample_id'].n_unique()} samples have no image id (e.g. "
                         f"{missing['sample_id'][0]!r})")
    ann = annotations.select("image_id", "grid_row", "grid_col", attribute)
    joined = base.join(ann, on=["image_id", "grid_row", "grid_col"], how="left").sort("row")
    if joined.height != base.height:
        raise ValueError("annotations have duplicate (image_id, grid_row, grid_col) rows")
    return (joined["row"].to_numpy(), joined["image_id"].to_numpy(), joined[attribute].to_list())


def text_words(tokens: pl.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(rows, lower-cased stripped word) of every text token."""
    text = tokens.with_row_index("row").filter(pl.col("modality") == "text")
    return text["row"].to_numpy(), [t.strip().lower() for t in text["token"].to_list()]


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if y.any() and not y.all() else float("nan")


def probe_transfer(acts: np.ndarray, tokens: pl.DataFrame, sample_image: Mapping[str, str],
                   annotations: pl.DataFrame, attribute: str, values: Sequence[str], seed: int = 0,
                   min_text: int = 10) -> dict[str, dict[str, Any]]:
    """Per value: held-out image AUROC of the patch probe and its transfer AUROC to the word's text
    tokens (NaN with fewer than ``min_text`` occurrences of the word)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rows, image_ids, labels = patch_labels(tokens, sample_image, annotations, attribute)
    t_rows, words = text_words(tokens)
    x_img = np.asarray(acts[rows], dtype=np.float64)
    x_txt = np.asarray(acts[t_rows], dtype=np.float64)
    rng = np.random.default_rng(seed)
    images = np.unique(image_ids)
    train_images = set(rng.choice(images, size=len(images) // 2, replace=False).tolist())
    train = np.array([i in train_images for i in image_ids])
    lab = np.array([v if v is not None else "" for v in labels], dtype=object)
    words_a = np.array(words, dtype=object)
    scaler = StandardScaler().fit(x_img[train])
    zi, zt = scaler.transform(x_img), scaler.transform(x_txt)
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        y = lab == value
        if y[train].sum() < 5 or y[~train].sum() < 5:
            out[value] = {"image_auroc": float("nan"), "text_auroc": float("nan"),
                          "n_text": int((words_a == value).sum())}
            continue
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(zi[train], y[train])
        yt = words_a == value
        out[value] = {
            "image_auroc": _auroc(y[~train], clf.decision_function(zi[~train])),
            "text_auroc": _auroc(yt, clf.decision_function(zt)) if yt.sum() >= min_text else float("nan"),
            "n_text": int(yt.sum()),
        }
    return out


def summarise(result: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """min / median / max of the transfer AUROCs (NaNs dropped) and the mean held-out image AUROC."""
    t = np.array([r["text_auroc"] for r in result.values()], dtype=float)
    i = np.array([r["image_auroc"] for r in result.values()], dtype=float)
    t, i = t[~np.isnan(t)], i[~np.isnan(i)]
    if not len(t):
        return {"n": 0}
    return {"n": int(len(t)), "text_min": float(t.min()), "text_median": float(np.median(t)),
            "text_max": float(t.max()), "image_mean": float(i.mean()) if len(i) else float("nan")}
