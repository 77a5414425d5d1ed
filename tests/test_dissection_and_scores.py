"""The dissection explainer on hand-made annotations, the quality formulas and the labelling rule."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from msae.config import ExplainerConfig, ScoresConfig
from msae.explain.base import ExplainExample, ExplainRequest
from msae.explain.dissection import AnnotationGrids, DissectionExplainer, word_shares
from msae.score.classify import classify, classify_frame
from msae.score.quality import (auroc, candidate_concepts, concept_category, concepts_agree, softmax_rows,
                                visual_image_scores)


def _annotations() -> pl.DataFrame:
    """Two 4×4 images: img0 has a red circle (top-left 2×2) and a blue square (bottom-right 2×2);
    img1 has a red square (top-left 2×2)."""
    rows = []
    for image_id, objects in (("img0", [((0, 0), "red", "circle"), ((2, 2), "blue", "square")]),
                              ("img1", [((0, 0), "red", "square")])):
        for r in range(4):
            for c in range(4):
                hit = [(i, col, sh) for i, ((r0, c0), col, sh) in enumerate(objects)
                       if r0 <= r < r0 + 2 and c0 <= c < c0 + 2]
                if hit:
                    i, col, sh = hit[0]
                    rows.append((image_id, r, c, i, col, sh, "large", 0.9))
                else:
                    rows.append((image_id, r, c, None, None, None, None, 1.0))
    return pl.DataFrame(rows, schema={"image_id": pl.Utf8, "grid_row": pl.Int32, "grid_col": pl.Int32,
                                      "object": pl.Int32, "color": pl.Utf8, "shape": pl.Utf8, "size": pl.Utf8,
                                      "coverage": pl.Float64}, orient="row")


@pytest.fixture
def explainer():
    grids = AnnotationGrids.from_table(_annotations())
    shares = {"red": 0.05, "the": 0.3, "circle": 0.05}
    return DissectionExplainer(ExplainerConfig(min_iou=0.3), grids, {"s0": "img0", "s1": "img1"}, shares)


def _active(cells: list[tuple[int, int]]) -> np.ndarray:
    a = np.zeros((4, 4), np.float32)
    for r, c in cells:
        a[r, c] = 1.0
    return a


def test_masked_visual_concept_is_the_best_overlap(explainer):
    top_left = [(0, 0), (0, 1), (1, 0), (1, 1)]
    examples = (ExplainExample("s0", patch_activations=_active(top_left)),
                ExplainExample("s1", patch_activations=_active(top_left)))
    a = explainer.explain([ExplainRequest(3, "visual", "masked", examples)])[0]
    assert a.concept == "red" and a.status == "ok"  # IoU 1.0 on both images; "red circle" would miss img1
    assert a.raw.startswith("IoU red=1.000")


def test_masked_visual_concept_prefers_simpler_on_ties_and_reports_no_concept(explainer):
    one = (ExplainExample("s0", patch_activations=_active([(2, 2), (2, 3), (3, 2), (3, 3)])),)
    a = explainer.explain([ExplainRequest(1, "visual", "masked", one)])[0]
    assert a.concept == "blue"  # blue, square and "blue square" all reach IoU 1 here: the simplest wins
    scattered = (ExplainExample("s0", patch_activations=_active([(0, 3)])),)  # background only, tiny IoU
    b = explainer.explain([ExplainRequest(1, "visual", "masked", scattered)])[0]
    assert b.concept is None and b.status == "no_concept"


def test_union_counts_images_without_the_concept(explainer):
    """IoU over images: an image lacking the concept still adds its active patches to the union."""
    examples = (ExplainExample("s1", patch_activations=_active([(0, 0), (0, 1), (1, 0), (1, 1)])),
                ExplainExample("s0", patch_activations=_active([(2, 2), (2, 3), (3, 2), (3, 3)])))
    ious = explainer.overlaps(examples)
    assert ious["square"] == pytest.approx(1.0)   # both images' active patches are squares
    assert ious["large"] == pytest.approx(8 / 12)
    assert ious["red"] == pytest.approx(4 / 12)   # 4 ∩, union 4 (img1) + 4 (img0 active) + 4 (img0 red)


def test_whole_image_baseline_names_what_the_images_share(explainer):
    examples = (ExplainExample("s0", patch_activations=_active([(3, 3)])),
                ExplainExample("s1", patch_activations=_active([(3, 3)])))
    a = explainer.explain([ExplainRequest(1, "visual", "whole", examples)])[0]
    assert a.concept == "red"  # red and square are in both (8 patches each): the name breaks the tie; sizes
    assert "large" not in a.raw  # are never offered to the whole-image describer


def test_textual_concept_needs_a_shared_enriched_peak(explainer):
    ok = tuple(ExplainExample(f"s{i}", peak_token=w) for i, w in enumerate(["red", "Red", " red", "circle"]))
    a = explainer.explain([ExplainRequest(1, "textual", "masked", ok)])[0]
    assert a.concept == "red"
    common = tuple(ExplainExample(f"s{i}", peak_token="the") for i in range(3))
    b = explainer.explain([ExplainRequest(1, "textual", "masked", common)])[0]
    assert b.concept == "the"  # share 1.0 / base 0.3 = 3.3 ≥ 2
    strict = DissectionExplainer(ExplainerConfig(min_enrichment=5), explainer.grids, {}, explainer.word_share)
    assert strict.explain([ExplainRequest(1, "textual", "masked", common)])[0].concept is None
    mixed = tuple(ExplainExample(f"s{i}", peak_token=w) for i, w in enumerate(["red", "circle", "the"]))
    assert explainer.explain([ExplainRequest(1, "textual", "masked", mixed)])[0].concept is None


def test_word_shares_skip_template_tokens():
    t = pl.DataFrame({"modality": ["text", "text", "text", "image"], "role": ["question", "answer", "template", None],
                      "token": ["red", "red", "user", None]})
    assert word_shares(t) == {"red": 1.0}


def test_visual_scores_softmax_own_concept_probability_and_rank():
    concepts = np.eye(3, dtype=np.float32)
    images = np.array([[1.0, 0, 0], [0.6, 0.8, 0]], dtype=np.float32)
    prob, cos, rank = visual_image_scores(images, np.array([0, 0]), concepts, scale=10.0)
    expected = softmax_rows(10.0 * images @ concepts.T)[:, 0]
    np.testing.assert_allclose(prob, expected, rtol=1e-6)
    np.testing.assert_allclose(cos, [1.0, 0.6])
    assert rank.tolist() == [1, 2]


def test_candidates_agreement_category_auroc():
    assert candidate_concepts(["Red ", "red.", None, "blue circle"], ["red"]) == ["red", "blue circle"]
    assert concepts_agree("red circle", "red", None, 0.8)
    assert not concepts_agree("red circle", "blue", 0.2, 0.8)
    assert concepts_agree("vehicles", "cars", 0.85, 0.8)
    assert not concepts_agree(None, "red", 1.0, 0.8)
    cats = [concept_category(c) for c in ("red", "red circle", "background", "mesh-like structures", "wooden",
                                          "car wheels", "dogs")]
    assert cats == ["color", "object", "scene", "object", "material", "part", "object"]
    assert concept_category("striped") == "texture"
    assert auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)


@pytest.mark.parametrize("v,t,agree,label", [
    (0.9, 0.9, True, "multimodal"), (0.9, 0.9, False, "mixed"), (0.9, 0.1, True, "visual"),
    (None, 0.7, False, "textual"), (0.2, None, False, "none"), (0.5, 0.5, True, "multimodal"),
])
def test_classification_rule(v, t, agree, label):
    assert classify(v, t, agree, 0.5, 0.5) == label
    frame = pl.DataFrame({"visual_score": [v], "textual_score": [t], "concepts_agree": [agree]},
                         schema={"visual_score": pl.Float64, "textual_score": pl.Float64, "concepts_agree": pl.Boolean})
    assert classify_frame(frame, 0.5, 0.5).to_list() == [label]


def test_default_thresholds_reject_chance_scores():
    """Scores are AUROCs: a concept at chance (0.5, e.g. "background" on every image) is never aligned."""
    s = ScoresConfig()
    assert 0.5 < s.visual_threshold <= 1 and 0.5 < s.textual_threshold <= 1
    assert classify(0.5, 0.5, True, s.visual_threshold, s.textual_threshold) == "none"
    assert classify(0.95, 0.5, True, s.visual_threshold, s.textual_threshold) == "visual"
    assert classify(0.95, 0.9, False, s.visual_threshold, s.textual_threshold) == "mixed"
    assert all(0.4 <= t <= 0.9 for t in s.ablation) and min(s.ablation) < 0.5 < max(s.ablation)
