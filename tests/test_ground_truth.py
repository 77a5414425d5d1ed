"""Ground-truth modality labels: AUROC against sklearn, positive sets from annotations, the label
rule on planted AUROC matrices, and the whole pass on a tiny hand-built store with a planted SAE."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from msae.explain.dissection import AnnotationGrids
from msae.score.ground_truth import (auroc_matrix, average_ranks, choose_concepts, ground_truth_labels,
                                     label_from_aurocs, mask_small_sets, text_vocabulary, textual_positives,
                                     visual_concept_names, visual_positives)

ANN_SCHEMA = {"image_id": pl.Utf8, "grid_row": pl.Int32, "grid_col": pl.Int32, "object": pl.Int32,
              "color": pl.Utf8, "shape": pl.Utf8, "size": pl.Utf8, "coverage": pl.Float64}


# --- AUROC ----------------------------------------------------------------------------------------
def test_average_ranks_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(50, 7)).astype(np.float32)
    np.testing.assert_allclose(average_ranks(x), stats.rankdata(x, axis=0))
    np.testing.assert_allclose(average_ranks(x[:, 0]), stats.rankdata(x[:, 0]))
    assert average_ranks(np.zeros((0, 3))).shape == (0, 3)


def test_auroc_matrix_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    n, w, v = 300, 9, 6
    # TopK-like scores: mostly exact zeros, the rest coarse (more ties)
    scores = np.where(rng.random((n, w)) < 0.7, 0.0, np.round(rng.random((n, w)) * 3, 1)).astype(np.float32)
    positives = rng.random((n, v)) < np.linspace(0.05, 0.6, v)
    positives[:, 0] = False          # empty set → NaN
    positives[:, 1] = True           # full set → NaN
    scores[:, 2] = positives[:, 3] * 1.0  # a perfect separator
    got = auroc_matrix(scores, positives, max_cells=n * 2)  # several column chunks
    assert got.shape == (w, v)
    assert np.isnan(got[:, :2]).all()
    for j in range(w):
        for k in range(2, v):
            assert got[j, k] == pytest.approx(metrics.roc_auc_score(positives[:, k], scores[:, j]), abs=1e-12)
    assert got[2, 3] == 1.0
    assert np.all(auroc_matrix(np.zeros((n, 2)), positives)[:, 2:] == 0.5)  # a dead latent: chance


def test_auroc_matrix_rejects_bad_input():
    with pytest.raises(ValueError):
        auroc_matrix(np.zeros((3, 2)), np.zeros((4, 1), bool))
    with pytest.raises(ValueError):
        auroc_matrix(np.array([[np.nan], [0.0]]), np.array([[True], [False]]))


def test_mask_small_sets():
    pos = np.zeros((30, 3), bool)
    pos[:5, 0] = True     # 5 positives
    pos[:25, 1] = True    # 5 negatives
    pos[:15, 2] = True
    out = mask_small_sets(np.full((2, 3), 0.7), pos, min_positive=10)
    assert np.isnan(out[:, :2]).all() and (out[:, 2] == 0.7).all()


# --- positive sets --------------------------------------------------------------------------------
def _annotations(objects: dict[str, list[tuple[int, int, str, str, str, float]]], grid: int) -> pl.DataFrame:
    """One row per (image, cell); objects: image → [(row, col, color, shape, size, coverage)]."""
    rows = []
    for image, objs in objects.items():
        at = {(r, c): o for r, c, *o in objs}
        for r in range(grid):
            for c in range(grid):
                if (r, c) in at:
                    color, shape, size, cov = at[(r, c)]
                    rows.append((image, r, c, 0, color, shape, size, cov))
                else:
                    rows.append((image, r, c, None, None, None, None, 1.0))
    return pl.DataFrame(rows, schema=ANN_SCHEMA, orient="row")


def test_visual_positives_from_hand_made_grids():
    ann = _annotations({
        "img0": [(0, 0, "red", "circle", "large", 1.0), (0, 1, "red", "circle", "large", 0.1)],  # 0.1: background
        "img1": [(1, 1, "blue", "square", "small", 0.9)],
    }, grid=2)
    grids = AnnotationGrids.from_table(ann)
    names = visual_concept_names(grids)
    assert names == ["background", "blue", "red", "circle", "square", "large", "small", "blue square",
                     "red circle"]
    rows = pl.DataFrame({"sample_id": ["a", "a", "b", "b", "c"], "grid_row": [0, 0, 1, 0, 0],
                         "grid_col": [0, 1, 1, 0, 0]})
    got_names, pos = visual_positives(grids, {"a": "img0", "b": "img1", "c": "img0"}, rows)
    assert got_names == names
    on = {n: pos[:, i].tolist() for i, n in enumerate(names)}
    assert on["background"] == [False, True, False, True, False]
    assert on["red"] == on["circle"] == on["large"] == on["red circle"] == [True, False, False, False, True]
    assert on["blue"] == on["square"] == on["small"] == on["blue square"] == [False, False, True, False, False]
    # masks() of the dissection explainer agree on each image
    for k, (s, r, c) in enumerate(zip(rows["sample_id"], rows["grid_row"], rows["grid_col"])):
        masks = grids.masks({"a": "img0", "b": "img1", "c": "img0"}[s])
        for n, m in masks.items():
            assert pos[k, names.index(n)] == m[r, c]
    with pytest.raises(ValueError, match="no annotated image"):
        visual_positives(grids, {"a": "img0"}, rows)
    with pytest.raises(ValueError, match="annotation grid"):
        visual_positives(grids, {"a": "img0"}, pl.DataFrame({"sample_id": ["a"], "grid_row": [2], "grid_col": [0]}))


def test_text_vocabulary_and_positives():
    words = ["what"] * 25 + ["?"] * 30 + ["red"] * 3 + ["left"] * 19 + ["circle"] * 21
    vocab = text_vocabulary(words, ["background", "red", "blue circle", "large"], min_count=20)
    # concept words present (red, circle; blue/large absent), frequent content words (what), no "?"
    assert vocab == ["circle", "red", "what"]
    pos = textual_positives(["red", "what", "x"], vocab)
    assert pos.tolist() == [[False, True, False], [False, False, True], [False, False, False]]
    assert textual_positives(["a"], []).shape == (1, 0)


# --- the label rule -------------------------------------------------------------------------------
V_NAMES = ["background", "blue", "red", "circle", "large", "red circle"]
T_NAMES = ["circle", "left", "red"]


def _matrices(rows_v: list[list[float]], rows_t: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(rows_v, dtype=float), np.array(rows_t, dtype=float)


def test_label_from_aurocs_covers_every_label():
    h = 0.5
    va, ta = _matrices([
        [h, h, 0.97, h, h, 0.965],    # 0 visual red (simpler than red circle within 0.01)
        [h, h, h, h, h, h],           # 1 textual
        [h, h, 0.95, h, h, h],        # 2 multimodal red/red
        [h, h, h, 0.93, h, h],        # 3 mixed: circle vs left
        [h, h, 0.95, h, h, h],        # 4 dead → none whatever the numbers
        [h, 0.89, h, h, h, h],        # 5 below threshold → none
        [h, h, 0.91, h, h, 0.99],     # 6 the pair clearly best → "red circle"; text "circle" agrees
        [h, h, 0.945, h, 0.95, h],    # 7 best visual "large" disagrees with "red", but near-tied red/red agree
        [np.nan] * 6,                 # 8 nothing measurable
        [h, h, 0.92, h, 0.95, h],     # 9 "red" grounded but clearly behind "large": no rescue → mixed
        [h, 0.99, h, h, h, 0.975],    # 10 "blue" latent; the pair agreeing with "circle" is not near-best → mixed
    ], [
        [h, h, h],
        [0.98, h, h],
        [h, h, 0.99],
        [h, 0.96, h],
        [h, h, 0.99],
        [h, h, 0.85],
        [0.94, h, h],
        [h, h, 0.93],
        [np.nan] * 3,
        [h, h, 0.93],
        [0.97, h, h],
    ])
    fired = np.array([True, True, True, True, False, True, True, True, True, True, True])
    out = label_from_aurocs(va, V_NAMES, ta, T_NAMES, fired, threshold=0.9)
    assert out["latent"].to_list() == list(range(11))
    assert out["gt_modality"].to_list() == ["visual", "textual", "multimodal", "mixed", "none", "none",
                                            "multimodal", "multimodal", "none", "mixed", "mixed"]
    assert out["gt_visual_concept"].to_list() == ["red", None, "red", "circle", None, None, "red circle", "red",
                                                  None, "large", "blue"]
    assert out["gt_textual_concept"].to_list() == [None, "circle", "red", "left", None, None, "circle", "red",
                                                   None, "red", "circle"]
    assert out["gt_visual_auroc"][0] == pytest.approx(0.97)
    assert out["gt_visual_second"][0] == "red circle" and out["gt_visual_second_auroc"][0] == pytest.approx(0.965)
    assert out["gt_visual_auroc"][5] == pytest.approx(0.89)  # near misses stay visible
    assert out["gt_visual_auroc"][7] == pytest.approx(0.945) and out["gt_visual_second"][7] == "large"
    assert math.isnan(out["gt_visual_auroc"][8]) and out["gt_visual_second"][8] is None


def test_choose_concepts_simplicity_and_ties():
    names = ["red", "circle", "red circle"]
    a = np.array([[0.95, 0.5, 0.955], [0.9, 0.9, 0.5], [0.7, 0.5, 0.95], [0.5, 0.948, 0.955]])
    idx, val = choose_concepts(a, names, tolerance=0.01)
    assert idx.tolist() == [0, 0, 2, 1]  # simpler within 0.01; exact tie → first name; pair when clearly best
    assert val.tolist() == [0.95, 0.9, 0.95, 0.948]


# --- the whole pass on a planted store ------------------------------------------------------------
N_SAMPLES, GRID, D = 48, 4, 8


def _world(i: int) -> tuple[str, str, str]:
    return ("red" if i % 2 == 0 else "blue", "circle" if (i // 2) % 2 == 0 else "square",
            "large" if i % 3 == 0 else "small")


def _cells(size: str) -> list[tuple[int, int, float]]:
    if size == "large":
        return [(1, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0), (2, 2, 1.0)]
    return [(1, 1, 1.0), (1, 2, 0.1)]  # 0.1 coverage: background for the masks


@pytest.fixture
def planted_store(tmp_path):
    """A store with samples, tokens, annotations, float32 activations and a planted 5-latent SAE.

    Activation directions: e0 red patch, e3 blue patch, e1 the word "red", e2 the word "circle".
    Tile patches and template tokens carry every direction, strongly: if they leaked into the
    populations the AUROCs would drop below the threshold. Sample 48's image has no annotation and
    its patches carry e0: it must be left out too.
    """
    from msae.extract.writer import ActivationWriter
    from msae.sae.formats import save_sae
    from msae.sae.model import SparseCoder
    from msae.store import Store

    store = Store(str(tmp_path / "store"))
    rng = np.random.default_rng(0)
    objects, tokens, xs, samples = {}, [], [], []
    strong = np.zeros(D, np.float32)
    strong[:4] = 5.0
    for i in range(N_SAMPLES + 1):
        color, shape, size = _world(i)
        image = f"{i:06d}"
        annotated = i < N_SAMPLES
        if annotated:
            objects[image] = [(r, c, color, shape, size, cov) for r, c, cov in _cells(size)]
        samples.append({"sample_id": f"s{i}", "image": f"/nowhere/world/images/{image}.png",
                        "question": f"what is the {shape} ?", "answer": color})
        on = {(r, c) for r, c, cov in _cells(size) if cov >= 0.25}
        pos = 0

        def add(x: np.ndarray, **kw) -> None:
            nonlocal pos
            tokens.append({"sample_index": i, "sample_id": f"s{i}", "position": pos, "token": kw.get("token"),
                           "modality": kw["modality"], "view": kw.get("view"), "grid_row": kw.get("r"),
                           "grid_col": kw.get("c"), "role": kw.get("role")})
            noise = np.zeros(D, np.float32)
            noise[4:] = rng.random(4)
            xs.append(x + noise)
            pos += 1

        add(np.zeros(D, np.float32), modality="special", token="<s>", role="template")
        add(strong, modality="text", token="user", role="template")
        for r in range(GRID):
            for c in range(GRID):
                x = np.zeros(D, np.float32)
                if (r, c) in on or not annotated:
                    x[0 if color == "red" or not annotated else 3] = 1.0 + 0.1 * rng.random()
                add(x, modality="image", view="base", r=r, c=c)
        for _ in range(2):
            add(strong, modality="image", view="tile", r=0, c=0)
        for word in ["what", "is", "the", shape, "?"]:
            x = np.zeros(D, np.float32)
            if word == "circle":
                x[2] = 1.0
            add(x, modality="text", token=word, role="question")
        add(strong, modality="text", token="assistant", role="template")
        x = np.zeros(D, np.float32)
        if color == "red":
            x[1] = 1.0
        add(x, modality="text", token=color, role="answer")
    store.write_parquet(pl.DataFrame(samples), store.SAMPLES)
    schema = {"sample_index": pl.Int32, "sample_id": pl.Utf8, "position": pl.Int32, "token": pl.Utf8,
              "modality": pl.Utf8, "view": pl.Utf8, "grid_row": pl.Int32, "grid_col": pl.Int32, "role": pl.Utf8}
    store.write_parquet(pl.DataFrame(tokens, schema=schema), store.TOKENS)
    store.write_parquet(_annotations(objects, GRID), "world", "annotations.parquet")
    writer = ActivationWriter(store, [1], D, "float32", rows_per_chunk=256)
    assert writer.open(0)
    writer.append({1: np.stack(xs)})
    writer.close()

    sae = SparseCoder(D, 5, 5)
    with torch.no_grad():
        w = torch.zeros(5, D)
        w[0, 0] = 1.0                 # red patches → visual
        w[1, 0] = w[1, 1] = 1.0       # red patches and the word "red" → multimodal
        w[2, 2] = 1.0                 # the word "circle" → textual
        w[4, 3] = w[4, 2] = 1.0       # blue patches and the word "circle" → mixed
        sae.encoder.weight.copy_(w)
        sae.encoder.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0]))  # latent 3 never fires
    save_sae(sae, store.url(store.sae_name(1, 5)))
    return store


def test_ground_truth_labels_on_planted_store(planted_store):
    gt = ground_truth_labels(planted_store, 1, 5, threshold=0.9, min_positive=20)
    assert gt.height == 5
    rows = {r["latent"]: r for r in gt.iter_rows(named=True)}
    assert [rows[i]["gt_modality"] for i in range(5)] == ["visual", "multimodal", "textual", "none", "mixed"]
    assert rows[0]["gt_visual_concept"] == "red" and rows[0]["gt_visual_auroc"] == 1.0
    assert rows[0]["gt_textual_concept"] is None and rows[0]["gt_textual_auroc"] == 0.5
    assert rows[1]["gt_visual_concept"] == "red" and rows[1]["gt_textual_concept"] == "red"
    assert rows[1]["gt_textual_auroc"] == 1.0
    assert rows[2]["gt_textual_concept"] == "circle" and rows[2]["gt_visual_concept"] is None
    assert rows[3]["gt_visual_fires"] == 0 and rows[3]["gt_textual_fires"] == 0
    assert rows[4]["gt_visual_concept"] == "blue" and rows[4]["gt_textual_concept"] == "circle"
    # 48 images: 8 large red (4 patches) + 16 small red (1 patch; the 0.1-coverage cell is background)
    assert rows[0]["gt_visual_fires"] == 48
    assert rows[1]["gt_textual_fires"] == 25  # text needs no annotation: sample 48's "red" counts
    assert rows[4]["gt_visual_second"] == "blue circle" or rows[4]["gt_visual_second"] == "blue square"
    assert rows[4]["gt_visual_second_auroc"] < 1.0 - 0.01  # the pair is not near-tied: mixed, not multimodal
