"""Ground-truth modality labels: AUROC against sklearn, strong-token precision, positive sets from
annotations, the label rule on planted evidence, the census at several AUROC thresholds, and the
whole pass on a tiny hand-built store with a planted SAE."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from msae.explain.dissection import AnnotationGrids
from msae.score.ground_truth import (GroundingRule, ModalityEvidence, answer_position_rows, auroc_matrix,
                                     average_ranks, census_by_auroc, choose_concepts, ground_truth_labels,
                                     gt_census, label_latents, mask_small_sets, partial_patches, precision_matrix, strong_mask,
                                     text_vocabulary, textual_positives, visual_concept_names, visual_positives)

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
    scores[:, 4] = np.where(scores[:, 4] > 0, scores[:, 4] - 1.5, 0.0)  # negative values: zeros rank among them
    scores[:, 5] = rng.random(n) + 0.1  # no zero at all
    got = auroc_matrix(scores, positives)
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
    # the 0.1-coverage cell is background in the masks, but partial: the ground truth leaves it out
    assert partial_patches(grids, {"a": "img0", "b": "img1", "c": "img0"}, rows).tolist() == [
        False, True, False, False, False]
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


# --- precision over strong activations ------------------------------------------------------------
def test_strong_mask_and_precision_matrix():
    acts = np.array([[0.0, 4.0], [1.0, 1.0], [2.0, 2.5], [0.9, 0.0], [0.0, 0.0]], dtype=np.float32)
    assert strong_mask(acts, 0.5).tolist() == [[False, True], [True, False], [True, True], [False, False],
                                               [False, False]]
    pos = np.array([[1, 0], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=bool)
    prec, strong = precision_matrix(acts, pos, 0.5, max_cells=5)  # one latent per chunk
    assert strong.tolist() == [2, 2]
    np.testing.assert_allclose(prec, [[0.5, 1.0], [0.5, 0.5]])
    prec0, strong0 = precision_matrix(np.zeros((3, 1)), pos[:3], 0.5)  # never fires: no strong tokens
    assert strong0.tolist() == [0] and np.isnan(prec0).all()


# --- the label rule -------------------------------------------------------------------------------
V_NAMES = ["background", "blue", "red", "circle", "large", "red circle"]
T_NAMES = ["<answer position>", "circle", "red", "the"]
H = 0.5


def _evidence(names: list[str], auroc: list[list[float]], precision: list[list[float]] | None = None,
              strong: list[int] | None = None, base: list[float] | None = None) -> ModalityEvidence:
    a = np.array(auroc, dtype=float)
    p = np.full(a.shape, np.nan) if precision is None else np.array(precision, dtype=float)
    s = np.full(len(a), 100) if strong is None else np.array(strong)
    b = np.full(len(names), 0.05) if base is None else np.array(base, dtype=float)
    return ModalityEvidence(names, a, p, s, b)


def test_precision_names_the_most_specific_concept_and_needs_firing_and_lift():
    lo = 0.1
    v = _evidence(V_NAMES, [[H] * 6] * 5, [
        [lo, lo, 0.95, 0.9, lo, 0.85],   # 0 "red circle" keeps the precision → named
        [lo, lo, 0.9, 0.5, lo, 0.45],    # 1 only "red" does
        [lo, lo, 0.95, 0.9, lo, 0.85],   # 2 as 0 but too few strong tokens → nothing
        [0.9, lo, lo, lo, lo, lo],       # 3 background at its base rate: no lift → nothing
        [lo, lo, 0.85, 0.85, 0.85, 0.5], # 4 three single words tie on words: highest precision, then name order
    ], strong=[25, 25, 19, 500, 40], base=[0.85, 0.05, 0.05, 0.05, 0.05, 0.02])
    t = _evidence(T_NAMES, [[H] * 4] * 5)
    out = label_latents(v, t, np.ones(5, bool), GroundingRule(precision=0.8, min_firing=20, min_lift=2.0))
    assert out["gt_modality"].to_list() == ["visual", "visual", "none", "none", "visual"]
    assert out["gt_visual_concept"].to_list() == ["red circle", "red", None, None, "red"]
    assert out["gt_visual_rule"].to_list() == ["precision", "precision", None, None, "precision"]
    assert out["gt_visual_precision"].to_list() == pytest.approx([0.85, 0.9, 0.95, 0.9, 0.85])
    assert out["gt_visual_strong"].to_list() == [25, 25, 19, 500, 40]
    # the lift guard off: background's precision alone grounds latent 3
    out2 = label_latents(v, t, np.ones(5, bool), GroundingRule(min_lift=1.0))
    assert out2["gt_visual_concept"][3] == "background"


def test_auroc_rule_and_multimodal_needs_the_same_concept():
    v = _evidence(V_NAMES, [
        [H, H, 0.97, H, H, 0.965],    # 0 visual red (simpler than red circle within 0.01)
        [H, H, H, H, H, H],           # 1 textual
        [H, H, 0.95, H, H, H],        # 2 multimodal red/red
        [H, H, H, 0.93, H, H],        # 3 mixed: circle vs "the"
        [H, H, 0.95, H, H, H],        # 4 dead → none whatever the numbers
        [H, 0.89, H, H, H, H],        # 5 below threshold → none
        [H, H, 0.91, H, H, 0.99],     # 6 "red circle" named; text "circle" is not grounded visually → mixed
        [H, H, 0.92, H, 0.95, H],     # 7 "large" named, but "red" is grounded in both → multimodal, red/red
        [np.nan] * 6,                 # 8 nothing measurable
        [H, 0.99, H, H, H, 0.975],    # 9 "blue" latent with the word "circle" → mixed
        [H, H, 0.93, H, H, 0.99],     # 10 "red circle" named, its parent "red" grounded too → keeps the pair
        [H, H, H, H, H, H],           # 11 the answer position only → textual
    ], [[np.nan] * 6] * 12)
    t = _evidence(T_NAMES, [
        [H, H, H, H], [H, 0.98, H, H], [H, H, 0.99, H], [H, H, H, 0.96], [H, H, 0.99, H], [H, H, 0.85, H],
        [H, 0.94, H, H], [H, H, 0.93, H], [np.nan] * 4, [H, 0.97, H, H], [H, H, 0.95, H], [0.99, H, H, H],
    ])
    fired = np.ones(12, bool)
    fired[4] = False
    out = label_latents(v, t, fired, GroundingRule(auroc=0.9))
    assert out["latent"].to_list() == list(range(12))
    assert out["gt_modality"].to_list() == ["visual", "textual", "multimodal", "mixed", "none", "none", "mixed",
                                            "multimodal", "none", "mixed", "multimodal", "textual"]
    assert out["gt_visual_concept"].to_list() == ["red", None, "red", "circle", None, None, "red circle", "red",
                                                  None, "blue", "red circle", None]
    assert out["gt_textual_concept"].to_list() == [None, "circle", "red", "the", None, None, "circle", "red",
                                                   None, "circle", "red", "<answer position>"]
    assert set(out["gt_visual_rule"].drop_nulls().to_list()) == {"auroc"}
    assert out["gt_visual_auroc"][0] == pytest.approx(0.97)
    assert out["gt_visual_second"][0] == "red circle" and out["gt_visual_second_auroc"][0] == pytest.approx(0.965)
    assert out["gt_visual_auroc"][5] == pytest.approx(0.89)  # near misses stay visible
    assert out["gt_visual_auroc"][7] == pytest.approx(0.92) and out["gt_visual_second"][7] == "large"
    assert math.isnan(out["gt_visual_auroc"][8]) and out["gt_visual_second"][8] is None


def test_multimodal_through_precision_in_one_modality_and_auroc_in_the_other():
    v = _evidence(V_NAMES, [[H] * 6] * 2, [[0.1, 0.1, 0.95, 0.9, 0.1, 0.9], [0.1, 0.1, 0.6, 0.9, 0.1, 0.6]],
                  strong=[30, 30])
    t = _evidence(T_NAMES, [[H, H, 0.95, H]] * 2)
    out = label_latents(v, t, np.ones(2, bool))
    # 0: red circle named, "red" itself precise too → multimodal; 1: "circle" precise, "red" not → mixed
    assert out["gt_modality"].to_list() == ["multimodal", "mixed"]
    assert out["gt_visual_concept"].to_list() == ["red circle", "circle"]
    assert out["gt_textual_concept"].to_list() == ["red", "red"]
    assert out["gt_textual_rule"].to_list() == ["auroc", "auroc"]


def test_census_at_three_auroc_thresholds():
    v = _evidence(V_NAMES, [[H, H, 0.85, H, H, H], [H, H, 0.92, H, H, H], [H, H, 0.97, H, H, H],
                            [H] * 6])
    t = _evidence(T_NAMES, [[H] * 4, [H] * 4, [H, H, 0.96, H], [H, 0.82, H, H]])
    labels = census_by_auroc(v, t, np.ones(4, bool), GroundingRule(), [0.8, 0.9, 0.95])
    assert labels == {"gt_modality_auroc_0.8": ["visual", "visual", "multimodal", "textual"],
                      "gt_modality_auroc_0.9": ["none", "visual", "multimodal", "none"],
                      "gt_modality_auroc_0.95": ["none", "none", "multimodal", "none"]}
    gt = label_latents(v, t, np.ones(4, bool)).with_columns(pl.Series(k, x) for k, x in labels.items())
    c = gt_census(gt)
    assert list(c) == ["0.8", "0.9", "0.95", "label"]
    assert c["0.8"] == {"visual": 2, "textual": 1, "multimodal": 1, "mixed": 0, "none": 0}
    assert c["0.9"] == c["label"] == {"visual": 1, "textual": 0, "multimodal": 1, "mixed": 0, "none": 2}
    assert c["0.95"]["none"] == 3
    assert gt_census(gt.select("latent", "gt_modality")) == {"label": c["label"]}  # older files: the label only


def test_choose_concepts_simplicity_and_ties():
    names = ["red", "circle", "red circle"]
    a = np.array([[0.95, 0.5, 0.955], [0.9, 0.9, 0.5], [0.7, 0.5, 0.95], [0.5, 0.948, 0.955]])
    idx, val = choose_concepts(a, names, tolerance=0.01)
    assert idx.tolist() == [0, 0, 2, 1]  # simpler within 0.01; exact tie → first name; pair when clearly best
    assert val.tolist() == [0.95, 0.9, 0.95, 0.948]


def test_answer_position_rows():
    tokens = pl.DataFrame({
        "sample_id": ["a"] * 6 + ["b"] * 4,
        "position": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        "modality": ["special", "image", "text", "text", "text", "text", "special", "text", "text", "image"],
        "role": ["template", None, "question", "template", "answer", "template", "template", "question",
                 "template", None],
    })
    # a: the token before the answer; b (no answer, e.g. include_answer off): the last non-image token
    assert np.flatnonzero(answer_position_rows(tokens)).tolist() == [3, 8]


# --- the whole pass on a planted store ------------------------------------------------------------
N_SAMPLES, GRID, D = 48, 4, 10


def _world(i: int) -> tuple[str, str, str]:
    return ("red" if i % 2 == 0 else "blue", "circle" if (i // 2) % 2 == 0 else "square",
            "large" if i % 3 == 0 else "small")


def _cells(size: str) -> list[tuple[int, int, float]]:
    if size == "large":
        return [(1, 1, 1.0), (1, 2, 1.0), (2, 1, 1.0), (2, 2, 1.0)]
    return [(1, 1, 1.0), (1, 2, 0.1)]  # 0.1 coverage: background for the masks


@pytest.fixture
def planted_store(tmp_path):
    """A store with samples, tokens, annotations, float32 activations and a planted 7-latent SAE.

    Activation directions: e0 red patch (0.9 on a small red object's partial patch, the cell it
    covers by 0.1), e3 blue patch, e9 large red circle patch, e1 the word "red",
    e2 the word "circle", e8 the answer position (the ":" before the answer). Tile patches and the
    other template tokens carry e0–e3, strongly: if they leaked into the populations the AUROCs
    would drop below the threshold. Sample 48's image has no annotation and its patches carry e0:
    it must be left out too.
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
        partial = {(r, c) for r, c, cov in _cells(size) if cov < 0.25}
        pos = 0

        def add(x: np.ndarray, **kw) -> None:
            nonlocal pos
            tokens.append({"sample_index": i, "sample_id": f"s{i}", "position": pos, "token": kw.get("token"),
                           "modality": kw["modality"], "view": kw.get("view"), "grid_row": kw.get("r"),
                           "grid_col": kw.get("c"), "role": kw.get("role")})
            noise = np.zeros(D, np.float32)
            noise[4:8] = rng.random(4)
            xs.append(x + noise)
            pos += 1

        add(np.zeros(D, np.float32), modality="special", token="<s>", role="template")
        add(strong, modality="text", token="user", role="template")
        for r in range(GRID):
            for c in range(GRID):
                x = np.zeros(D, np.float32)
                if (r, c) in on or not annotated:
                    x[0 if color == "red" or not annotated else 3] = 1.0 + 0.1 * rng.random()
                    if annotated and (color, shape, size) == ("red", "circle", "large"):
                        x[9] = 1.0
                elif (r, c) in partial and color == "red":  # the object's edge: most of it is background
                    x[0] = 0.9
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
        x[8] = 1.0
        add(x, modality="text", token=":", role="template")
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

    sae = SparseCoder(D, 7, 7)
    with torch.no_grad():
        w = torch.zeros(7, D)
        w[0, 0] = 1.0                 # red patches → visual
        w[1, 0] = w[1, 1] = 1.0       # red patches and the word "red" → multimodal
        w[2, 2] = 1.0                 # the word "circle" → textual
        w[4, 3] = w[4, 2] = 1.0       # blue patches and the word "circle" → mixed
        w[5, 8] = 1.0                 # the answer position → textual
        w[6, 9] = 1.0                 # large red circles only: too few red circles for AUROC, precise
        sae.encoder.weight.copy_(w)
        sae.encoder.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]))  # latent 3 never fires
    save_sae(sae, store.url(store.sae_name(1, 7)))
    return store


def test_ground_truth_labels_on_planted_store(planted_store):
    gt = ground_truth_labels(planted_store, 1, 7, threshold=0.9, min_positive=20, min_firing=16,
                             census_aurocs=(0.8, 0.95))
    assert gt.height == 7
    rows = {r["latent"]: r for r in gt.iter_rows(named=True)}
    assert [rows[i]["gt_modality"] for i in range(7)] == ["visual", "multimodal", "textual", "none", "mixed",
                                                          "textual", "visual"]
    assert rows[0]["gt_visual_concept"] == "red" and rows[0]["gt_visual_auroc"] == 1.0
    assert rows[0]["gt_visual_precision"] == 1.0 and rows[0]["gt_visual_strong"] == 48
    assert rows[0]["gt_textual_concept"] is None and rows[0]["gt_textual_auroc"] == 0.5
    assert rows[1]["gt_visual_concept"] == "red" and rows[1]["gt_textual_concept"] == "red"
    assert rows[1]["gt_textual_auroc"] == 1.0
    assert rows[2]["gt_textual_concept"] == "circle" and rows[2]["gt_visual_concept"] is None
    assert rows[3]["gt_visual_fires"] == 0 and rows[3]["gt_textual_fires"] == 0
    assert rows[4]["gt_visual_concept"] == "blue" and rows[4]["gt_textual_concept"] == "circle"
    assert rows[5]["gt_textual_concept"] == "<answer position>" and rows[5]["gt_textual_auroc"] == 1.0
    assert rows[5]["gt_textual_fires"] == 49  # one per sample, annotated or not
    # 4 large red circles × 4 patches: 16 of the 24 red-circle patches; AUROC misses, precision names the pair
    assert rows[6]["gt_visual_concept"] == "red circle" and rows[6]["gt_visual_rule"] == "precision"
    assert rows[6]["gt_visual_auroc"] < 0.9 and rows[6]["gt_visual_strong"] == 16
    # 48 images: 8 large red (4 patches) + 16 small red (1 patch, plus its partial 0.1-coverage cell)
    assert rows[0]["gt_visual_fires"] == 48 + 16
    # ... and the partial cells are neither red nor background: out of the precision (else 48 / 64)
    # and of the AUROC, whose negatives would otherwise hold 16 near-peak background patches
    kept = ground_truth_labels(planted_store, 1, 7, threshold=0.9, min_positive=20, min_firing=16,
                               census_aurocs=(), exclude_partial=False)  # the rule before
    assert kept["gt_visual_strong"][0] == 64 and kept["gt_visual_precision"][0] == 0.75
    assert rows[1]["gt_textual_fires"] == 25  # text needs no annotation: sample 48's "red" counts
    assert set(gt.columns) >= {"gt_modality_auroc_0.8", "gt_modality_auroc_0.95"}
    assert gt_census(gt)["0.95"]["none"] >= gt_census(gt)["0.8"]["none"]
    # the minimum number of strong tokens is respected: 16 < 20 → latent 6 is not grounded
    gt20 = ground_truth_labels(planted_store, 1, 7, min_firing=20, census_aurocs=())
    assert gt20["gt_modality"][6] == "none" and gt20["gt_visual_concept"][6] is None


def test_population_reads_the_answer_position_by_name(planted_store):
    """Population detection sees the same text items as the ground truth, the answer position by its name."""
    from msae.latents.answer_position import ANSWER_POSITION
    from msae.score.population import load_population

    pop = load_population(planted_store, 1, 7, n_samples=N_SAMPLES + 1, seed=0, include_template=False)
    assert ANSWER_POSITION in pop.vocab and ":" not in pop.vocab and "assistant" not in pop.vocab
    strong = pop.texts.strong(5, 0.5)  # latent 5 fires on the answer position only
    assert len(strong) == N_SAMPLES + 1
    assert {pop.vocab[i] for i in pop.word_ids[strong]} == {ANSWER_POSITION}
