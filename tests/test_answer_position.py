"""The answer position (the ":" right before the answer) as text evidence under its own name:
eligible as a latent's peak although it is a template token, shown as "<answer position>" to the
explainer, the cards and the textual scorer, one word for the combining rule."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from msae.config import LatentsConfig
from msae.explain.combine import CombineRule, combine_answers
from msae.explain.stage import _text_example as explainer_example
from msae.latents.answer_position import ANSWER_POSITION, answer_position_rows, display_words
from msae.latents.evidence import TextExample, sample_texts
from msae.latents.render import mark_peak, peak_window
from msae.latents.stats import compute_latent_stats
from msae.sae.model import SparseCoder
from msae.score.stage import random_windows
from msae.store import Store

SCHEMA = {"sample_index": pl.Int32, "sample_id": pl.Utf8, "position": pl.Int32, "token": pl.Utf8,
          "modality": pl.Utf8, "view": pl.Utf8, "grid_row": pl.Int32, "grid_col": pl.Int32, "role": pl.Utf8}
D = 4


def _chat(n_samples: int) -> tuple[pl.DataFrame, np.ndarray]:
    """Samples "<s> user : [2×2 image] what colour ? assistant : red </s>"; direction e0 on every
    ":" (the template's and the answer position's), e1 on "red", scaled so the user ":" is largest."""
    rows, xs = [], []
    for s in range(n_samples):
        pieces = [("<s>", "special", "template"), ("user", "text", "template"), (":", "text", "template")]
        pieces += [(None, "image", None)] * 4
        pieces += [("what", "text", "question"), ("colour", "text", "question"), ("?", "text", "question"),
                   ("assistant", "text", "template"), (":", "text", "template"), ("red", "text", "answer"),
                   ("</s>", "special", "template")]
        cell = 0
        for pos, (tok, mod, role) in enumerate(pieces):
            image = mod == "image"
            rows.append({"sample_index": s, "sample_id": f"s{s}", "position": pos, "token": tok, "modality": mod,
                         "view": "base" if image else None, "grid_row": cell // 2 if image else None,
                         "grid_col": cell % 2 if image else None, "role": role})
            cell += image
            x = np.zeros(D, np.float32)
            if tok == ":":
                x[0] = 3.0 if pos == 2 else 1.0 + 0.1 * s  # the user ":" (template) beats the answer position
            if tok == "red":
                x[1] = 1.0
            xs.append(x)
    return pl.DataFrame(rows, schema=SCHEMA), np.stack(xs)


def _sae() -> SparseCoder:
    sae = SparseCoder(D, 2, 1)
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.weight[0, 0] = 1.0
        sae.encoder.weight[1, 1] = 1.0
        sae.encoder.bias.zero_()
    return sae


def test_answer_position_is_the_peak_though_a_template_token():
    tokens, x = _chat(6)
    r = compute_latent_stats(_sae(), x, tokens, LatentsConfig(top_k=3))
    top = r.top_examples.filter((pl.col("latent") == 0) & (pl.col("modality") == "text")).sort("rank")
    # the other ":" is template and three times stronger, yet never the peak; the strongest answer
    # positions (activation 1 + 0.1 s) rank first
    assert top["sample_index"].to_list() == [5, 4, 3]
    assert top["peak_position"].to_list() == [11, 11, 11]
    assert top["score"].to_list() == [np.float32(1.5), np.float32(1.4), np.float32(1.3)]


def test_evidence_and_explainer_show_its_name(tmp_path):
    tokens, _ = _chat(2)
    store = Store(str(tmp_path / "store"))
    store.write_parquet(tokens, store.TOKENS)
    text = sample_texts(store, [1])[1]
    positions, pieces, answer = text.positions, text.pieces, text.answer_index
    assert pieces[answer] == ":" and positions[answer] == 11 and pieces[answer - 1] == "assistant"
    acts = np.zeros(len(pieces), np.float32)
    acts[answer] = 1.0
    t = TextExample("s1", 1, pieces, acts, answer, "what colour ?", "red", "", answer_index=answer)
    assert t.display()[answer] == " " + ANSWER_POSITION and t.display()[1] == " :"  # the user ":" stays
    ex = explainer_example(t)
    assert ex.peak_token == ANSWER_POSITION
    assert "assistant (<answer position>) red" in ex.text
    assert peak_window(pieces, acts, size=1, display=t.display()) == "assistant <answer position> red"
    assert mark_peak(pieces, acts, window=1) == "… assistant (:) red"  # without a display: the piece


def test_random_control_windows_name_it_too():
    texts = [("a", ["assistant", ":", "red"], np.array([False, True, False]))]
    assert random_windows(texts, 3, 1, np.random.default_rng(0), [1]) == [("a", "assistant <answer position> red")]
    assert random_windows(texts, 3, 1, np.random.default_rng(0)) == [("a", "assistant : red")]
    assert random_windows(texts, 3, 1, np.random.default_rng(0), [1], before_only=True) == [
        ("a", "assistant <answer position>")]  # the control windows end where the latents' own do


def test_display_words_keep_spacing_and_rows_follow_roles():
    assert display_words([" a", " :", " b"], np.array([False, True, False])) == [" a", " " + ANSWER_POSITION, " b"]
    tokens, _ = _chat(2)
    rows = np.flatnonzero(answer_position_rows(tokens))
    assert tokens["position"].to_numpy()[rows].tolist() == [11, 11]


def test_combining_rule_keeps_the_name_one_word():
    peaks = [ANSWER_POSITION, ANSWER_POSITION, ANSWER_POSITION, "red", ":"]
    got = combine_answers(peaks, CombineRule(stop_words=()))
    assert got.concept == ANSWER_POSITION and got.support == 3
    # "answer" or "position" alone is never a reading of it
    assert got.qualifying == (ANSWER_POSITION,)
