"""Contrastive visual and textual scores and their random baselines: synthetic embeddings, then the
stage function on drawn images with transparent stand-in embedders."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from msae.config import MsaeConfig
from msae.latents.evidence import ImageExample, LatentEvidence, TextExample
from msae.score.quality import (auroc, auroc_rows, baseline_score, beaten_shares, contrastive_score,
                                draw_excluding, mask_balanced_split, stand_in_draws, window_baseline_draws)
from msae.score.stage import ControlPools, evidence_pools, random_windows, score_partition

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    return sigma * rng.normal(size=(n, DIM))


# --- pure functions -----------------------------------------------------------------------------
def test_auroc_helpers_agree_with_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 7).round(1), rng.normal(0, 1, 11).round(1)  # rounding plants ties
    ref = metrics.roc_auc_score(np.r_[np.ones(7), np.zeros(11)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(ref)
    assert beaten_shares(pos, neg).mean() == pytest.approx(ref)
    rows = auroc_rows(np.stack([pos, neg[:7]]), np.stack([neg, neg]))
    assert rows[0] == pytest.approx(ref)
    assert rows[1] == pytest.approx(auroc(neg[:7], neg))
    score, var = contrastive_score(pos, neg)
    assert score == pytest.approx(ref) and var == pytest.approx(beaten_shares(pos, neg).var())
    assert np.isnan(contrastive_score(pos, neg[:0])[0]) and np.isnan(baseline_score(np.zeros((3, 0)), rows[:, None]))


def test_draws_exclude_own_and_balance_masks():
    rng = np.random.default_rng(1)
    for n_pool in (12, 10_000):  # enumerated and rejection paths
        picks = draw_excluding(n_pool, np.array([0, 3, 5]), 8, rng)
        assert len(picks) == 8 and len(set(picks.tolist())) == 8 and not set(picks.tolist()) & {0, 3, 5}
    assert draw_excluding(4, np.array([0, 1, 2, 3]), 5, rng).size == 0
    assert len(draw_excluding(5, np.array([0, 1]), 6, rng)) == 6  # too few left: with replacement
    groups = np.arange(20) % 5
    pos, neg = mask_balanced_split(groups, 30, rng)
    assert pos.shape == (30, 5) and neg.shape == (30, 15)
    for p, q in zip(pos, neg):
        assert sorted(groups[p].tolist()) == [0, 1, 2, 3, 4]  # each stand-in carries one of the masks
        assert sorted(p.tolist() + q.tolist()) == list(range(20))
    fake = stand_in_draws(np.array([4, 7, 9]), 2, 6, rng)
    assert fake.shape == (6, 2) and set(fake.ravel().tolist()) <= {4, 7, 9}
    assert (fake[:, 0] != fake[:, 1]).all()
    # windows: stand-ins outside the controls against all controls; a small pool splits the controls
    stand, rest = window_baseline_draws(np.arange(100), np.arange(50), 5, 30, rng)
    assert stand.shape == (30, 5) and (stand >= 50).all() and (rest == np.arange(50)).all()
    stand, rest = window_baseline_draws(np.arange(52), np.arange(50), 5, 30, rng)
    assert stand.shape == (30, 5) and rest.shape == (30, 45) and (stand < 50).all()
    assert all(not set(a.tolist()) & set(b.tolist()) for a, b in zip(stand, rest))
    assert window_baseline_draws(np.arange(5), np.arange(5), 5, 3, rng)[0].size == 0


def test_visual_score_of_matching_views_is_one_and_its_random_baseline_half():
    """(a) views that show the concept beat transplanted random images; random stand-ins do not."""
    rng = np.random.default_rng(2)
    concept = _unit(rng.normal(size=DIM))
    own = _unit(0.6 * concept + _noise(rng, 5, 0.1))
    controls = _unit(_noise(rng, 20, 1.0))
    score, _ = contrastive_score(own @ concept, controls @ concept)
    assert score == pytest.approx(1.0)
    pos, neg = mask_balanced_split(np.arange(20) % 5, 30, rng)
    sims = controls @ concept
    assert baseline_score(sims[pos], sims[neg]) == pytest.approx(0.5, abs=0.1)
    # many latents' baselines average to chance
    baselines = []
    for _ in range(200):
        sims = _unit(_noise(rng, 20, 1.0)) @ concept
        pos, neg = mask_balanced_split(np.arange(20) % 5, 30, rng)
        baselines.append(baseline_score(sims[pos], sims[neg]))
    assert np.mean(baselines) == pytest.approx(0.5, abs=0.02)


def test_visual_score_of_a_concept_true_of_every_image_is_chance():
    """(b) "background" matches every view equally, the latent's and the controls': AUROC ≈ 0.5,
    while its absolute cosine is high (the old scores accepted it)."""
    rng = np.random.default_rng(3)
    background = _unit(rng.normal(size=DIM))
    own = _unit(0.8 * background + _noise(rng, 300, 0.1))
    controls = _unit(0.8 * background + _noise(rng, 300, 0.1))
    score, _ = contrastive_score(own @ background, controls @ background)
    assert score == pytest.approx(0.5, abs=0.06)
    assert (own @ background).mean() > 0.75


def test_textual_score_specific_word_high_function_word_chance():
    """(c) a word only the latent's windows hold scores ≈ 1; "the", in every window, ≈ 0.5."""
    rng = np.random.default_rng(4)
    red, the, *words = np.linalg.qr(rng.normal(size=(DIM, 12)))[0].T  # orthonormal word directions
    base = _noise(rng, 250, 0.05)
    own = _unit(0.5 * red + 0.5 * the + base[:50])  # windows: "the" and one other word
    random = _unit(0.5 * the + 0.5 * np.array(words)[rng.integers(10, size=200)] + base[50:])
    assert contrastive_score(own @ red, random @ red)[0] > 0.95
    assert contrastive_score(own @ the, random @ the)[0] == pytest.approx(0.5, abs=0.1)
    stand, rest = window_baseline_draws(np.arange(200), np.arange(50), 5, 30, rng)
    sims = random @ red
    assert baseline_score(sims[stand], sims[rest]) == pytest.approx(0.5, abs=0.1)


def test_random_windows_centre_on_eligible_tokens():
    texts = [("a", ["x0", "x1", "x2", "x3"], np.array([False, True, False, False])),
             ("b", ["y0", "y1"], np.array([False, False]))]
    out = random_windows(texts, 5, 1, np.random.default_rng(0))
    assert out == [("a", "x0 x1 x2")]


# --- the stage function on drawn images ----------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}
GRAY = (128, 128, 128)
CONCEPT_DIMS = [*COLOURS, "background"]


class PixelEmbedder:
    """Image embedding = share of pure-colour pixels per colour and of gray; a concept = its words'
    dims. Blurred (inactive) regions lose their pure colours, as a CLIP loses detail there."""

    name = "pixels"
    logit_scale = 20.0

    def embed_images(self, images) -> np.ndarray:
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), np.float64)
            shares = [(np.abs(a - c).max(axis=2) < 12).mean() for c in (*COLOURS.values(), GRAY)]
            out.append(np.array(shares) + 1e-3)
        return _unit(np.array(out)).astype(np.float32)

    def embed_texts(self, texts) -> np.ndarray:
        return _unit(np.array([[float(d in t.split()) for d in CONCEPT_DIMS] for t in texts]) + 1e-3)


class WordsEmbedder:
    """Bag of words, one dim per distinct word (assigned on first sight)."""

    name = "words"

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def embed_texts(self, texts) -> np.ndarray:
        rows = []
        for t in texts:
            v = np.zeros(64)
            for w in t.split():
                v[self.vocab.setdefault(w, len(self.vocab))] += 1
            rows.append(v / max(np.linalg.norm(v), 1e-9))  # exact: equal windows tie exactly
        return np.array(rows, np.float32)


def _question(colour: str) -> list[str]:
    """A question inside distinct filler words, so that every ±5 window of it is 11 distinct words."""
    return [f"a{i}" for i in range(6)] + ["what", "colour", "is", "the", colour, "shape", "?"] + \
        [f"b{i}" for i in range(6)]


def _scene(path, colour: str, quadrant: int) -> str:
    a = np.full((64, 64, 3), GRAY, np.uint8)
    r, c = divmod(quadrant, 2)
    a[32 * r: 32 * r + 32, 32 * c: 32 * c + 32] = COLOURS[colour]
    Image.fromarray(a).save(path)
    return str(path)


def _mask(quadrants: list[int]) -> np.ndarray:
    m = np.zeros((2, 2), np.float32)
    for q in quadrants:
        m[divmod(q, 2)] = 1.0
    return m


def _image(sid: str, path: str, mask: np.ndarray) -> ImageExample:
    return ImageExample(sample_id=sid, sample_index=0, image_path=path, question="", answer="", patch_activations=mask,
                        score=1.0, active_count=int((mask > 0).sum()), mean_activation=float(mask.mean()),
                        max_activation=1.0, active_threshold=0.5)


def _text(sid: str, colour: str, peak_word: str) -> TextExample:
    pieces = _question(colour)
    acts = np.zeros(len(pieces), np.float32)
    acts[pieces.index(peak_word)] = 1.0
    return TextExample(sample_id=sid, sample_index=0, pieces=pieces, activations=acts, peak=pieces.index(peak_word),
                       question="", answer="", image_path="")


@pytest.fixture
def world(tmp_path):
    """60 scenes of one coloured square on gray; latent 0 fires on red squares (its mask = the square),
    latent 1 on whole random scenes (mask = everything); latent 2 on the word "red" and latent 3 on
    "the" in random questions."""
    rng = np.random.default_rng(5)
    scenes = [(f"s{i}", list(COLOURS)[rng.integers(4)], int(rng.integers(4))) for i in range(60)]
    paths = {sid: _scene(tmp_path / f"{sid}.png", col, q) for sid, col, q in scenes}
    red = [s for s in scenes if s[1] == "red"][:5]
    others = [s for s in scenes if s[1] != "red"][:5]
    texts_red = [_text(f"t{i}", "red", "red") for i in range(5)]
    texts_the = [_text(f"u{i}", c, "the") for i, c in enumerate(["red", "blue", "green", "yellow", "blue"])]
    evidence = {
        0: LatentEvidence(0, {}, [_image(sid, paths[sid], _mask([q])) for sid, _, q in red], texts_red),
        1: LatentEvidence(1, {}, [_image(sid, paths[sid], _mask([0, 1, 2, 3])) for sid, _, _ in others], texts_the),
    }
    evidence[2] = LatentEvidence(2, {}, [], texts_red)
    evidence[3] = LatentEvidence(3, {}, [], texts_the)
    middle = np.r_[np.zeros(6, bool), np.ones(7, bool), np.zeros(6, bool)]  # centres on the question only
    pool_texts = [(f"q{i}", _question(list(COLOURS)[rng.integers(4)]), middle) for i in range(200)]
    pools = ControlPools(list(paths.values()), random_windows(pool_texts, 400, 5, np.random.default_rng(6)))
    proposals = pl.DataFrame({
        "latent": [0, 0, 1, 1, 2, 2, 3, 3],
        "prompting": ["masked", "whole"] * 4,
        "visual_concept": ["red", "background", "background", None, None, None, None, None],
        "textual_concept": ["red", "red", "the", "the", "red", "red", "the", None],
    })
    return evidence, proposals, pools


def _config(**scores) -> MsaeConfig:
    return MsaeConfig.model_validate({
        "store": "memory://scores", "dataset": {"kind": "shapes"}, "model": {"name_or_path": "x"},
        "layers": [0], "widths": [16], "embedders": {"blur_radius": 30},
        "scores": {"visual_threshold": 0.75, "textual_threshold": 0.75, **scores}})


REQUIRED = ("latent", "prompting", "modality", "visual_concept", "textual_concept", "visual_score", "textual_score",
            "visual_score_var", "visual_score_random", "visual_softmax", "visual_cosine", "visual_rank",
            "textual_score_var", "textual_score_random", "textual_cosine", "concept_cosine", "concepts_agree",
            "visual_category", "visual_detection", "textual_detection")


def test_stage_scores_contrastive_columns_and_labels(world):
    evidence, proposals, pools = world
    frame = score_partition(_config(), evidence, proposals, [PixelEmbedder()], WordsEmbedder(), pools)
    assert set(REQUIRED) <= set(frame.columns) and frame.height == proposals.height
    row = {(r["latent"], r["prompting"]): r for r in frame.iter_rows(named=True)}

    red = row[(0, "masked")]  # (a) red squares under the latent's masks vs random scenes under the same masks
    assert red["visual_score"] > 0.9 and 0.3 < red["visual_score_random"] < 0.7
    # the whole-image arm is scored on the same views: "background" there is worse than chance
    assert row[(0, "whole")]["visual_score"] < 0.5
    bg = row[(1, "masked")]  # (b) background on whole random scenes: the softmax loved it, the AUROC does not
    assert bg["visual_softmax"] > 0.5 and bg["visual_score"] == pytest.approx(0.5, abs=0.1)
    assert row[(1, "whole")]["visual_score"] is None and row[(2, "masked")]["visual_score"] is None

    assert red["textual_score"] > 0.8 and red["textual_score_random"] == pytest.approx(0.5, abs=0.15)
    the = row[(3, "masked")]  # (c) "the" is in every window: its cosine is high, its AUROC chance
    assert the["textual_cosine"] > 0.3 and the["textual_score"] == pytest.approx(0.5, abs=0.05)
    assert row[(3, "whole")]["textual_score"] is None

    assert red["modality"] == "multimodal"  # both pass, same concept
    assert row[(0, "whole")]["modality"] == "textual" and row[(2, "masked")]["modality"] == "textual"
    assert bg["modality"] == "none" and the["modality"] == "none"

    again = score_partition(_config(), evidence, proposals, [PixelEmbedder()], WordsEmbedder(), pools)
    assert again.equals(frame)  # seeded
    other = score_partition(_config(seed=1), evidence, proposals, [PixelEmbedder()], WordsEmbedder(), pools)
    assert other["visual_score_random"].to_list() != frame["visual_score_random"].to_list()


def test_stage_default_pools_come_from_the_evidence(world):
    evidence, proposals, _ = world
    pools = evidence_pools(evidence, sorted(evidence), 5, 50, np.random.default_rng(0))
    assert len(pools.images) == 10 and {sid for sid, _ in pools.windows} <= {f"t{i}" for i in range(5)} | \
        {f"u{i}" for i in range(5)}
    frame = score_partition(_config(visual_controls=4), evidence, proposals, [PixelEmbedder()], WordsEmbedder())
    assert set(REQUIRED) <= set(frame.columns)
    red = frame.filter((pl.col("latent") == 0) & (pl.col("prompting") == "masked"))
    assert red["visual_score"].item() > 0.9  # controls: latent 1's scenes under latent 0's masks
    assert frame.filter(pl.col("textual_concept").is_not_null())["textual_score_random"].null_count() == 0
    # more controls wanted than the pool holds: the baseline splits the controls instead
    small = score_partition(_config(visual_controls=4, textual_controls=1000), evidence, proposals,
                            [PixelEmbedder()], WordsEmbedder())
    assert small.filter(pl.col("textual_concept").is_not_null())["textual_score_random"].null_count() == 0


class LastWordEmbedder(WordsEmbedder):
    """Only a text's last word counts, as in a text tower that pools its last token."""

    def embed_texts(self, texts) -> np.ndarray:
        return super().embed_texts([t.split()[-1] if t.split() else "" for t in texts])


def test_windows_ending_at_the_peak_let_a_last_token_embedder_read_it(world):
    """Around the peak, a last-token embedder reads the word after it ("shape"), so the word the
    latent fires on scores at chance; windows that end at the peak (text_window_context: before,
    the context a causal model saw) show it the peak. Control windows end at their centre too."""
    evidence, proposals, _ = world
    middle = np.r_[np.zeros(6, bool), np.ones(7, bool), np.zeros(6, bool)]
    rng = np.random.default_rng(7)
    pool_texts = [(f"q{i}", _question(list(COLOURS)[rng.integers(4)]), middle) for i in range(200)]

    def red_score(context: str) -> float:
        pools = ControlPools([], random_windows(pool_texts, 400, 2, np.random.default_rng(6),
                                                before_only=context == "before"))
        cfg = _config().model_copy(update={"embedders": _config().embedders.model_copy(
            update={"text_window": 2, "text_window_context": context})})
        frame = score_partition(cfg, {2: evidence[2]}, proposals.filter(pl.col("latent") == 2), [PixelEmbedder()],
                                LastWordEmbedder(), pools)
        return frame.filter(pl.col("prompting") == "masked")["textual_score"].item()

    assert red_score("around") < 0.6
    assert red_score("before") > 0.9
