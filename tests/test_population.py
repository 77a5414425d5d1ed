"""Population detection (msae.score.population) and the label gate it feeds (msae.score.classify)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from msae.config import ScoresConfig
from msae.score.classify import LABEL_FIELDS, PopulationGate, classify_frame, label_frame
from msae.score.population import (Population, SparseColumns, detection, population_scores, rank_auroc,
                                   word_precision)


def test_rank_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    assert rank_auroc(scores, positive) == pytest.approx(roc_auc_score(positive, scores))
    assert np.isnan(rank_auroc(scores, np.zeros(200, bool)))
    assert np.isnan(rank_auroc(scores, np.ones(200, bool)))


def test_sparse_columns_group_by_latent_and_keep_the_maximum():
    # item 0 has two image tokens firing latent 1 (2.0 and 5.0): the sample keeps 5.0
    cols = SparseColumns.from_triplets(3, 3, items=np.array([0, 0, 1, 2, 2]), latents=np.array([1, 1, 1, 0, 2]),
                                       values=np.array([2.0, 5.0, 1.0, 0.0, 4.0]))
    items, values = cols.column(1)
    assert items.tolist() == [0, 1] and values.tolist() == [5.0, 1.0]
    assert cols.column(0)[0].tolist() == []  # a zero value is not a firing
    assert cols.strong(1, 0.5).tolist() == [0]  # 1.0 < 0.5 × 5.0
    assert cols.strong(2, 0.5).tolist() == [2]


def _world(n: int = 60, seed: int = 0):
    """n images, each red or blue (a unit vector per colour plus noise, in a 4-d 'CLIP'); latent 0
    fires on red images, latent 1 on a random third of all images, latent 2 on 3 red images."""
    rng = np.random.default_rng(seed)
    red = rng.random(n) < 0.5
    base = {"red": np.array([1.0, 0, 0, 0]), "blue": np.array([0, 1.0, 0, 0])}
    img = np.stack([base["red" if r else "blue"] + 0.05 * rng.normal(size=4) for r in red])
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    random_third = np.flatnonzero(rng.random(n) < 1 / 3)
    reds = np.flatnonzero(red)
    items = np.concatenate([reds, random_third, reds[:3]])
    latents = np.concatenate([np.zeros(len(reds)), np.ones(len(random_third)), np.full(3, 2)]).astype(int)
    values = rng.uniform(4, 5, size=len(items))
    cols = SparseColumns.from_triplets(n, 3, items, latents, values)
    words = ["red", "blue", "the"] * 10
    # text: latent 0 fires on the word "red" only
    t_items = np.array([i for i, w in enumerate(words) if w == "red"])
    texts = SparseColumns.from_triplets(len(words), 3, t_items, np.zeros(len(t_items), int), np.full(len(t_items), 3.0))
    pop = Population.with_words(cols, [f"img{i}.png" for i in range(n)], texts, words)
    assert pop.vocab == ["red", "blue", "the"]
    wemb = np.stack([{"red": base["red"], "blue": base["blue"], "the": np.array([0, 0, 1.0, 0])}[w] for w in pop.vocab])
    return pop, img, wemb, base


def test_population_scores_separate_a_selective_concept_from_a_common_one():
    pop, img, wemb, base = _world()
    proposals = pl.DataFrame({"latent": [0, 1, 2, 0], "prompting": ["masked", "masked", "masked", "whole"],
                              "visual_concept": ["red", "red", "red", "blue"],
                              "textual_concept": ["red", "the", None, "blue"]})
    concept = {"red": base["red"], "blue": base["blue"], "the": np.array([0, 0, 1.0, 0])}
    out = population_scores(proposals, pop, img, wemb, concept, concept, strong_fraction=0.5, seed=0)
    rows = {(r["latent"], r["prompting"]): r for r in out.iter_rows(named=True)}
    sel, rand_lat, rare, wrong = rows[(0, "masked")], rows[(1, "masked")], rows[(2, "masked")], rows[(0, "whole")]
    assert sel["visual_population_auroc"] == pytest.approx(1.0)  # red predicts exactly where latent 0 fires
    assert sel["visual_population_positives"] == (pop.images.column(0)[0]).size
    assert abs(rand_lat["visual_population_auroc"] - 0.5) < 0.2  # a latent firing at random: near chance
    assert rare["visual_population_positives"] == 3  # the gate's minimum decides what 3 positives are worth
    assert wrong["visual_population_auroc"] == pytest.approx(0.0)  # "blue" anti-predicts latent 0
    assert sel["visual_population_random"] == pytest.approx(0.0)  # the only other candidate is "blue"
    assert sel["textual_population_auroc"] == pytest.approx(1.0) and sel["textual_population_positives"] == 10
    assert sel["textual_population_coverage"] == pytest.approx(1.0) and sel["textual_population_matches"] == 10
    assert rows[(1, "masked")]["textual_population_coverage"] == pytest.approx(0.5)  # never fires on text: ties
    assert rand_lat["textual_population_auroc"] is None  # latent 1 never fires on text
    assert rare["textual_population_auroc"] is None and rare["textual_population_positives"] is None
    assert sel["textual_population_precision"] == pytest.approx(1.0)  # every strong token is "red"
    assert wrong["textual_population_precision"] == pytest.approx(0.0)  # none of them is "blue"
    assert rand_lat["textual_population_precision"] is None  # no strong token to count


def test_word_precision_counts_the_strong_tokens_showing_the_concept():
    vocab = ["<answer position>", "large", "red", "circle"]
    word_ids = np.array([0, 1, 2, 3, 0, 0, 1, 2])
    strong = np.array([0, 4, 5, 1])  # three answer positions and one "large"
    assert word_precision(vocab, word_ids, strong, "<answer position>") == pytest.approx(0.75)
    assert word_precision(vocab, word_ids, strong, "large") == pytest.approx(0.25)
    assert word_precision(vocab, word_ids, np.array([2, 3, 7]), "red circle") == pytest.approx(1.0)  # a phrase's words
    assert word_precision(vocab, word_ids, np.array([], dtype=np.int64), "red") is None


def _scored(v, t, vp, vn, tp, tn):
    return pl.DataFrame({"visual_score": [v], "textual_score": [t], "concepts_agree": [False],
                         "visual_population_auroc": [vp], "visual_population_positives": [vn],
                         "textual_population_auroc": [tp], "textual_population_positives": [tn]},
                        schema={"visual_score": pl.Float64, "textual_score": pl.Float64, "concepts_agree": pl.Boolean,
                                "visual_population_auroc": pl.Float64, "visual_population_positives": pl.Int64,
                                "textual_population_auroc": pl.Float64, "textual_population_positives": pl.Int64})


@pytest.mark.parametrize("vp,vn,tp,tn,label", [
    (0.9, 50, 0.9, 50, "mixed"),  # both pass
    (0.7, 50, 0.9, 50, "textual"),  # the visual concept does not detect the latent's images
    (0.9, 5, 0.9, 50, "textual"),  # too few firing images to trust the detection
    (None, None, 0.95, 20, "textual"),  # no detection (no concept, or never fires): not aligned
    (0.9, 50, 0.5, 50, "visual"),
])
def test_population_gate(vp, vn, tp, tn, label):
    frame = _scored(0.99, 0.99, vp, vn, tp, tn)
    gate = PopulationGate(visual=0.8, textual=0.8, min_positives=20)
    assert classify_frame(frame, 0.9, 0.9, gate).to_list() == [label]
    # threshold 0 turns a gate off (and no gate at all is the contrast rule alone)
    assert classify_frame(frame, 0.9, 0.9, PopulationGate(0.0, 0.0, 20)).to_list() == ["mixed"]
    assert classify_frame(frame, 0.9, 0.9).to_list() == ["mixed"]


def test_gate_settings_only_relabel():
    assert {"visual_population_threshold", "textual_population_threshold", "population_min_positives"} <= LABEL_FIELDS
    s = ScoresConfig(visual_population_threshold=0.8, textual_population_threshold=0.8, population_min_positives=20)
    frame = _scored(0.99, 0.2, 0.85, 30, None, None).drop("concepts_agree").with_columns(
        pl.lit("red").alias("visual_concept"), pl.lit(None, pl.Utf8).alias("textual_concept"),
        pl.lit(None, pl.Float64).alias("concept_cosine"))
    assert label_frame(frame, s)["modality"].to_list() == ["visual"]
    assert label_frame(frame, s.model_copy(update={"population_min_positives": 40}))["modality"].to_list() == ["none"]


def test_detection_counts_positives():
    auc, n = detection(np.array([0.9, 0.1, 0.8, 0.2]), np.array([0, 2]))
    assert (auc, n) == (1.0, 2)


def test_readings_of_an_answer():
    from msae.score.population import readings

    assert readings("Small Orange Cross", ["small", "orange cross"], "visual") == [
        "small orange cross", "small", "orange cross", "small orange", "orange", "cross"]
    assert readings("the red one", None, "visual") == ["the red one", "red", "red one", "one"]
    assert readings("the", None, "textual") == ["the"]  # function words stay nameable textually
    assert readings(None, ["red"], "visual") == []  # no answer, no candidate


def test_choose_reading_prefers_the_simplest_close_to_the_best():
    from msae.score.population import choose_reading

    opts = ["small red circle", "red", "red circle"]
    assert choose_reading(opts, [0.90, 0.89, 0.95], tolerance=0.02) == "red circle"
    assert choose_reading(opts, [0.90, 0.94, 0.95], tolerance=0.02) == "red"
    assert choose_reading(opts, [0.90, 0.94, 0.95], tolerance=0.0) == "red circle"
    assert choose_reading(opts, [float("nan")] * 3, tolerance=0.02) == "small red circle"  # nothing to judge by


def test_select_by_detection_keeps_the_explainers_concept_beside_the_choice():
    from msae.score.population import select_by_detection

    pop, img, wemb, base = _world()
    proposals = pl.DataFrame({"latent": [0], "prompting": ["masked"], "visual_concept": ["blue red"],
                              "textual_concept": ["red"], "visual_candidates": [["blue"]],
                              "textual_candidates": [[]]})
    concept = {"blue red": (base["red"] + base["blue"]) / np.sqrt(2), "blue": base["blue"], "red": base["red"]}
    out = select_by_detection(proposals, pop, img, wemb, concept, concept, 0.5, 0.02)
    row = out.row(0, named=True)
    assert row["visual_concept"] == "red" and row["visual_concept_proposed"] == "blue red"
    assert row["textual_concept"] == "red" and row["textual_concept_proposed"] == "red"


def test_coverage_finds_a_latent_that_fires_on_every_instance_of_a_word_but_hardest_elsewhere():
    from msae.score.population import coverage, word_detection

    words = ["one"] * 20 + ["red"] * 2 + ["the"] * 38
    # latent 0: 1.0 on every "one", 9.0 on the two "red": its strong tokens are never "one"
    cols = SparseColumns.from_triplets(len(words), 1, np.arange(22), np.zeros(22, int),
                                       np.array([1.0] * 20 + [9.0] * 2))
    pop = Population.with_words(cols, [], cols, words)
    auc, n = coverage(cols, 0, pop.vocab, pop.word_ids, "one")
    assert n == 20 and auc == pytest.approx(20 * 38 / (20 * 40))  # above every "the", below both "red"
    acts = np.zeros(len(words))
    acts[:22] = [1.0] * 20 + [9.0] * 2
    assert auc == pytest.approx(rank_auroc(acts, np.array([w == "one" for w in words])))  # the dense reference
    judge = np.array([1.0 if w == "one" else 0.0 for w in pop.vocab])
    counts = np.bincount(pop.word_ids).astype(float)
    strong = cols.strong(0, 0.5)
    assert word_detection(judge, pop.word_ids, counts, strong)[0] == pytest.approx(0.5 * 38 / 58)  # misses it
    assert word_detection(judge, pop.word_ids, counts, strong)[0] == pytest.approx(detection(judge[pop.word_ids], strong)[0])
    assert coverage(cols, 0, pop.vocab, pop.word_ids, "red")[0] == pytest.approx(1.0)
    assert coverage(cols, 0, pop.vocab, pop.word_ids, "blue") == (None, 0)


def test_grouped_auroc_equals_the_itemwise_one():
    from msae.score.population import grouped_auroc

    rng = np.random.default_rng(1)
    groups = rng.integers(0, 12, size=500)
    score_of = rng.integers(0, 6, size=12).astype(float)  # some groups share a score
    positive = rng.random(500) < 0.3
    pos = np.bincount(groups[positive], minlength=12).astype(float)
    neg = np.bincount(groups[~positive], minlength=12).astype(float)
    assert grouped_auroc(score_of, pos, neg) == pytest.approx(roc_auc_score(positive, score_of[groups]))


def test_gate_passes_text_through_either_route():
    frame = _scored(0.99, 0.99, 0.9, 50, 0.5, 50).with_columns(
        pl.lit(0.97).alias("textual_population_coverage"), pl.lit(30, pl.Int64).alias("textual_population_matches"))
    by_selectivity = PopulationGate(visual=0.8, textual=0.8, min_positives=20)
    both = PopulationGate(visual=0.8, textual=0.8, min_positives=20, textual_coverage=0.95)
    assert classify_frame(frame, 0.9, 0.9, by_selectivity).to_list() == ["visual"]
    assert classify_frame(frame, 0.9, 0.9, both).to_list() == ["mixed"]
    assert classify_frame(frame, 0.9, 0.9, PopulationGate(0.8, 0.0, 40, 0.95)).to_list() == ["visual"]  # 30 < 40
    # the precision route: share of the 50 strong tokens that show the concept
    precise = frame.with_columns(pl.lit(0.85).alias("textual_population_precision"))
    by_precision = PopulationGate(visual=0.8, textual=0.8, min_positives=20, textual_precision=0.8)
    assert classify_frame(precise, 0.9, 0.9, by_precision).to_list() == ["mixed"]
    assert classify_frame(precise, 0.9, 0.9, PopulationGate(0.8, 0.0, 20, 0.0, 0.9)).to_list() == ["visual"]  # 0.85 < 0.9
    assert classify_frame(precise, 0.9, 0.9, PopulationGate(0.8, 0.0, 60, 0.0, 0.8)).to_list() == ["none"]  # 50 < 60


def _answer_position_world():
    """Latent 0's largest activations (9.0) sit on three answer positions, so its top texts all
    peak there, but most of its strong activations (≥ half the largest) sit on 'and' (5.0 on each
    of 12). Latent 1 fires on the answer positions only."""
    words = ["<answer position>", "and", "red", "the"] * 12
    ap = [i for i, w in enumerate(words) if w == "<answer position>"]
    conj = [i for i, w in enumerate(words) if w == "and"]
    items = np.array([*ap[:3], *conj, *ap])
    latents = np.array([0] * 3 + [0] * len(conj) + [1] * len(ap))
    values = np.array([9.0] * 3 + [5.0] * len(conj) + [4.0] * len(ap))
    texts = SparseColumns.from_triplets(len(words), 2, items, latents, values)
    images = SparseColumns.from_triplets(1, 2, np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    pop = Population.with_words(images, ["img0.png"], texts, words)
    wemb = np.eye(4)[: len(pop.vocab)]  # one direction per word: each word is only similar to itself
    concept = {w: wemb[i] for i, w in enumerate(pop.vocab)}
    return pop, wemb, concept


def test_strong_words_are_the_most_frequent_words_of_the_strong_tokens():
    from msae.score.population import strong_words

    pop, _, _ = _answer_position_world()
    assert strong_words(pop, 0, 0.5, 1) == ["and"]  # 12 'and' against 3 answer positions
    assert strong_words(pop, 0, 0.5, 3) == ["and", "<answer position>"]  # only words it fires on
    assert strong_words(pop, 0, 0.6, 3) == ["<answer position>"]  # 5.0 < 0.6 × 9.0
    assert strong_words(pop, 1, 0.5, 2) == ["<answer position>"]
    assert strong_words(pop, 0, 0.5, 0) == []


def test_selection_names_a_latent_by_its_strong_words_only_when_asked():
    from msae.score.population import select_by_detection

    pop, wemb, concept = _answer_position_world()
    proposals = pl.DataFrame({"latent": [0, 1], "prompting": ["masked"] * 2,
                              "visual_concept": [None, None], "textual_concept": ["<answer position>"] * 2,
                              "visual_candidates": [[], []], "textual_candidates": [[], []]},
                             schema_overrides={"visual_concept": pl.Utf8})
    img = np.zeros((0, 4))
    off = select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.05)
    assert off["textual_concept"].to_list() == ["<answer position>"] * 2  # the peak words' concept
    on = select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.05, population_words=1)
    # latent 0: 'and' detects its strong tokens (12 of 15) better than the answer position (3 of 15)
    assert on["textual_concept"].to_list() == ["and", "<answer position>"]
    assert on["textual_concept_proposed"].to_list() == ["<answer position>"] * 2
    none = proposals.with_columns(pl.lit(None, pl.Utf8).alias("textual_concept"))
    assert select_by_detection(none, pop, img, wemb, {}, concept, 0.5, 0.05, population_words=1)[
        "textual_concept"].to_list() == [None, None]  # no answer, no candidate


def test_coverage_alone_aligns_text_without_the_contrast():
    frame = _scored(0.1, 0.2, 0.9, 50, 0.5, 50).with_columns(
        pl.lit("and").alias("textual_concept"),
        pl.lit(0.96).alias("textual_population_coverage"), pl.lit(30, pl.Int64).alias("textual_population_matches"))
    assert classify_frame(frame, 0.9, 0.9, PopulationGate(min_positives=20)).to_list() == ["none"]  # contrast 0.2
    alone = PopulationGate(min_positives=20, textual_coverage_alone=0.95)
    assert classify_frame(frame, 0.9, 0.9, alone).to_list() == ["textual"]
    assert classify_frame(frame, 0.9, 0.9, PopulationGate(min_positives=40, textual_coverage_alone=0.95)
                          ).to_list() == ["none"]  # 30 matches < 40
    assert classify_frame(frame, 0.9, 0.9, PopulationGate(min_positives=20, textual_coverage_alone=0.97)
                          ).to_list() == ["none"]  # 0.96 < 0.97
    no_concept = frame.with_columns(pl.lit(None, pl.Utf8).alias("textual_concept"))
    assert classify_frame(no_concept, 0.9, 0.9, alone).to_list() == ["none"]
    scores = ScoresConfig(textual_coverage_alone_threshold=0.95, population_min_positives=20)
    assert PopulationGate.from_scores(scores) == alone
    assert "textual_coverage_alone_threshold" in LABEL_FIELDS  # a threshold edit only relabels


def test_evidence_words_are_the_words_a_latent_is_active_on_in_its_top_texts():
    from msae.latents.evidence import TextExample
    from msae.score.population import evidence_words

    def text(pieces, acts):
        return TextExample("s", 0, pieces, np.array(acts, np.float32), int(np.argmax(acts)), "q", "a", "")

    texts = [text(["is", " there", " red", " and", " blue"], [0, 0.5, 0, 2.0, 0.1]),
             text(["And", " the", " red"], [3.0, 0, 1.0]),
             text([" blue", " cross"], [5.0, 5.0])]
    assert evidence_words(texts, 2) == ["and", "red", "there", "blue"]  # by their largest activation
    assert evidence_words(texts, 1) == ["and", "there", "blue"]  # "red" has 0 in the first text
    assert evidence_words([], 5) == []


def test_selection_by_coverage_names_the_word_a_latent_covers():
    """Latent 0 fires weakly (1.0) on all 20 'one' and hardest (9.0) on two 'red': its strong tokens
    are never 'one', so the judge's similarity cannot find it; coverage does, when 'one' is offered."""
    from msae.score.population import select_by_detection

    words = ["one"] * 20 + ["red"] * 2 + ["the"] * 38
    cols = SparseColumns.from_triplets(len(words), 1, np.arange(22), np.zeros(22, int),
                                       np.array([1.0] * 20 + [9.0] * 2))
    images = SparseColumns.from_triplets(1, 1, np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    pop = Population.with_words(images, ["img0.png"], cols, words)
    wemb = np.eye(3)
    concept = {w: wemb[i] for i, w in enumerate(pop.vocab)}
    proposals = pl.DataFrame({"latent": [0], "prompting": ["masked"], "visual_concept": [None],
                              "textual_concept": ["the"], "visual_candidates": [[]], "textual_candidates": [[]]},
                             schema_overrides={"visual_concept": pl.Utf8})
    img = np.zeros((0, 3))
    offered = {0: ["red", "one"]}
    by_similarity = select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.0, top_text_words=offered)
    assert by_similarity["textual_concept"].to_list() == ["red"]  # its strong tokens are the two 'red'
    by_coverage = select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.0, textual_measure="coverage",
                                      top_text_words=offered)
    assert by_coverage["textual_concept"].to_list() == ["red"]  # 'red' covers 1.0, 'one' 0.95
    only_one = select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.0, textual_measure="coverage",
                                   top_text_words={0: ["one"]})
    assert only_one["textual_concept"].to_list() == ["one"]  # 'one' covers 0.95, 'the' (never fired on) far less
    assert only_one["textual_concept_proposed"].to_list() == ["the"]
    with pytest.raises(ValueError, match="textual_measure"):
        select_by_detection(proposals, pop, img, wemb, {}, concept, 0.5, 0.0, textual_measure="cosine")
