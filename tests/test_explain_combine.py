"""The fixed rule that turns per-image answers (or peak words) into one concept."""

from __future__ import annotations

import pytest

from msae.explain.combine import CombineRule, combine_answers, content_ngrams, required_support

RULE = CombineRule()
PEAKS = CombineRule(stop_words=())  # the textual rule: function words allowed, punctuation never


def test_required_support_defaults() -> None:
    assert [required_support(n, 3, 0.6) for n in range(1, 8)] == [1, 2, 2, 3, 3, 3, 3]
    assert required_support(10, 3, 0.6) == 3  # min_support caps it
    assert required_support(5, 5, 1.0) == 5
    assert required_support(0, 3, 0.6) == 1


def test_content_ngrams_split_at_function_words_and_punctuation() -> None:
    grams = content_ngrams("a Small red circle, and the blue square", RULE.stop_words, 3)
    assert grams == [("small",), ("small", "red"), ("small", "red", "circle"), ("red",), ("red", "circle"),
                     ("circle",), ("blue",), ("blue", "square"), ("square",)]
    # counted once per answer even when repeated
    assert content_ngrams("red red", (), 2) == [("red",), ("red", "red")]


def test_highest_support_wins_over_length() -> None:
    answers = ["small red circle", "large red circle", "red circle", "small red circle", "blue square"]
    got = combine_answers(answers, RULE)
    assert (got.concept, got.support, got.required, got.n) == ("red circle", 4, 3, 5)


def test_ties_go_to_the_longer_ngram() -> None:
    answers = ["small red circle", "small red circle", "small red circle", "blue cross", "green square"]
    assert combine_answers(answers, RULE).concept == "small red circle"  # support 3: "small", … "small red circle"


def test_ties_of_equal_length_go_to_the_earliest_then_lexicographic() -> None:
    both = "large blue square and small red cross"
    got = combine_answers([both, both, both, "background", "background"], RULE)
    assert (got.concept, got.support) == ("large blue square", 3)
    # the earliest first occurrence counts by answer rank first: "green" appears in answer 1
    got = combine_answers(["green", "yellow", "yellow green", "green yellow"], CombineRule(min_support=3))
    assert got.concept == "green"
    # two distinct n-grams of one length never share a first occurrence, so the lexicographic
    # fallback only makes the order total


def test_function_words_never_make_or_join_a_concept() -> None:
    answers = ["a red circle", "the red circle", "a red circle", "an orange", "a cross"]
    got = combine_answers(answers, RULE)
    assert got.concept == "red circle"  # not "a", not "a red", not "a red circle"
    # with the textual rule (no stop words) the article itself is the shared word
    assert combine_answers(["the", "the", "the", "red", "?"], PEAKS).concept == "the"
    # punctuation is never a concept, whatever the stop list
    assert combine_answers(["?", "?", "?", "red", "blue"], PEAKS).concept is None
    # a configurable stop list
    assert combine_answers(["red circle"] * 3, CombineRule(stop_words=("red",))).concept == "circle"


def test_fewer_examples_use_the_fraction() -> None:
    assert combine_answers(["red circle", "red square", "blue cross"], RULE).concept == "red"  # 2 of 3
    assert combine_answers(["red circle", "blue square", "green cross"], RULE).concept is None
    assert combine_answers(["red circle", "red circle"], RULE).concept == "red circle"  # 2 of 2
    assert combine_answers(["red", "blue"], RULE).concept is None
    assert combine_answers(["small green cross"], RULE).concept == "small green cross"  # 1 of 1


def test_no_qualifying_ngram_gives_no_concept() -> None:
    got = combine_answers(["red circle", "blue square", "green cross", "the", ""], RULE)
    assert (got.concept, got.support, got.required, got.n) == (None, 0, 3, 5)
    assert combine_answers([], RULE).concept is None
    assert combine_answers(["", "", ""], RULE).concept is None


def test_max_ngram_limits_length() -> None:
    answers = ["small red circle"] * 3
    assert combine_answers(answers, CombineRule(max_ngram=2)).concept == "small red"
    assert combine_answers(answers, CombineRule(max_ngram=1)).concept == "small"


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [1, 0, 2, 3, 4], [4, 3, 2, 1, 0]])
def test_support_is_order_free_but_ties_follow_rank(order) -> None:
    answers = ["red circle", "blue square", "red circle", "blue square", "red blue"]
    ranked = [answers[i] for i in order]
    got = combine_answers(ranked, RULE)
    assert got.support == 3
    # "red" and "blue" are both in 3 answers: the one in the best-ranked answer wins, and within
    # "red blue" the earlier word
    assert got.concept == ("blue" if order[0] == 1 else "red")


def test_combined_records_every_qualifying_ngram_in_preference_order():
    from msae.explain.combine import combine_answers

    c = combine_answers(["small orange cross", "small orange cross", "large orange cross", "small cyan cross",
                         "small orange circle"])
    # support: small, orange, cross 4 each (the earliest wins the tie); small orange, orange cross 3;
    # small orange cross only 2 of the 3 required
    assert c.concept == "small"
    assert c.qualifying == ("small", "orange", "cross", "small orange", "orange cross")
