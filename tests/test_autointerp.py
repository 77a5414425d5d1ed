"""LLM-judged detection and fuzzing (msae/score/autointerp.py) against the local stub server.

The stub's judges read the prompt the way a model would: the description line, then one
"Text i: ..." line per example. The "perfect" judge answers 1 when a text holds the concept
word (detection) or when every << >> span holds it (fuzzing); no hidden ids are involved.
"""

from __future__ import annotations

import json
import random
import re
import zlib

import numpy as np
import pytest

from msae.config import MsaeConfig
from msae.latents.evidence import LatentEvidence, TextExample
from msae.score.autointerp import (COLUMNS, binary_scores, detection_job, fuzzing_job, judge_scores,
                                   load_judge_templates, marked_text, parse_judgement, plain_text, spread_ranks)
from openai_stub import Reply, StubServer, request_text

KEY_ENV = "MSAE_TEST_JUDGE_KEY"
WORDS = ["apple", "boat", "candle", "dragon", "engine", "forest", "guitar", "harbor", "island", "jacket",
         "kettle", "ladder"]
FILLER = list(dict.fromkeys(("we saw the old one near a small house and then walked back along the quiet road "
                             "after lunch with two friends who liked it").split()))


def text_example(latent: int, rank: int, word: str, rng: random.Random, extra_active: bool = False,
                 sample_id: str | None = None) -> TextExample:
    """A sentence of filler words with `word` once; activation on it (and its left neighbour if extra_active)."""
    n = rng.randint(8, 14)
    pieces = rng.sample(FILLER, n)
    at = rng.randint(1, n - 1)
    pieces.insert(at, word)
    acts = np.zeros(len(pieces), np.float32)
    acts[at] = 10.0 - rank
    if extra_active:
        acts[at - 1] = 1.0
    return TextExample(sample_id=sample_id or f"s{latent}-{rank}", sample_index=latent * 100 + rank, pieces=pieces,
                       activations=acts, peak=at, question="", answer="", image_path="")


def make_evidence(n_latents: int = 6, k: int = 5, seed: int = 0) -> tuple[dict[int, LatentEvidence], dict[int, str]]:
    rng = random.Random(seed)
    evidence, concepts = {}, {}
    for lat in range(n_latents):
        word = WORDS[lat % len(WORDS)] + ("" if lat < len(WORDS) else str(lat))
        texts = [text_example(lat, r, word, rng, extra_active=(r % 2 == 1)) for r in range(k)]
        evidence[lat] = LatentEvidence(lat, {"latent": lat}, [], texts)
        concepts[lat] = word
    return evidence, concepts


def config(srv: StubServer | None = None, **scores) -> MsaeConfig:
    url = srv.base_url if srv is not None else "http://127.0.0.1:9/v1"
    return MsaeConfig.model_validate({
        "store": "memory://judge", "dataset": {"kind": "shapes"}, "model": {"name_or_path": "x"},
        "layers": [0], "widths": [16],
        "explainer": {"backend": "openai", "model": "stub-explainer", "base_url": url, "api_key_env": KEY_ENV,
                      "timeout_s": 1.0, "max_retries": 2, "backoff_s": 0.01, "concurrency": 4},
        "scores": {"judge": "openai", **scores},
    })


# --- judges the stub plays -----------------------------------------------------------------------------
def read_prompt(body) -> tuple[str, list[str], bool]:
    text = request_text(body)
    concept = re.search(r"^Description: (\w+)", text, re.MULTILINE).group(1).lower()
    texts = re.findall(r"^Text \d+: (.*)$", text, re.MULTILINE)
    fuzzing = "marked like <<this>>" in text
    return concept, texts, fuzzing


def truth_of(body) -> list[int]:
    concept, texts, fuzzing = read_prompt(body)
    if fuzzing:
        return [int(all(concept in s.lower() for s in re.findall(r"<<(.*?)>>", t))) for t in texts]
    return [int(concept in t.lower()) for t in texts]


def perfect(body) -> str:
    return json.dumps(truth_of(body))


def always_one(body) -> str:
    return json.dumps([1] * len(read_prompt(body)[1]))


def coin(body) -> str:
    r = random.Random(zlib.crc32(request_text(body).encode()))
    return ", ".join(str(r.randint(0, 1)) for _ in read_prompt(body)[1])


# --- parsing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, n, expected", [
    ("[1, 0, 1]", 3, ([1, 0, 1], "ok")),
    ("Sure! Here it is:\n```json\n[1,0,0,1]\n```", 4, ([1, 0, 0, 1], "ok")),
    ('["yes", "no", "Yes"]', 3, ([1, 0, 1], "ok")),
    ("[true, false]", 2, ([1, 0], "ok")),
    ("The form was [0, 1, 0]; my answer: [1, 1, 0, 0]", 4, ([1, 1, 0, 0], "ok")),
    ("1, 0, 1", 3, ([1, 0, 1], "ok")),
    ("Answer: 1 0 1 1", 4, ([1, 0, 1, 1], "ok")),
    ("1\n0\n1", 3, ([1, 0, 1], "ok")),
    ("Example 1: yes\nExample 2: no\nExample 3: yes", 3, ([1, 0, 1], "ok")),
    ("**Text 1:** 0\n**Text 2:** 1", 2, ([0, 1], "ok")),
    ("1. no\n2. yes\n3) correct\n4) incorrect", 4, ([0, 1, 1, 0], "ok")),
    ("<think>text 1 mentions [1, 1] fruit ...</think>[0, 1]", 2, ([0, 1], "ok")),
    ("[1, 0]", 3, (None, "wrong_length")),
    ("1, 0, 1, 1", 3, (None, "wrong_length")),
    ("Example 1: yes\nExample 3: no", 3, (None, "wrong_length")),
    ("Text 1: yes\nText 1: no\nText 2: yes", 2, (None, "wrong_length")),
    ("I cannot judge these texts.", 3, (None, "unparsed")),
    ("", 3, (None, "unparsed")),
    ("[0.7, 0.2, 0.9]", 3, (None, "unparsed")),
])
def test_parse_judgement(raw, n, expected) -> None:
    assert parse_judgement(raw, n) == expected


def test_binary_scores() -> None:
    s = binary_scores([1, 1, 0, 0, 0], [1, 0, 0, 0, 1])
    assert s["accuracy"] == pytest.approx(0.6) and s["balanced"] == pytest.approx(0.5 * (0.5 + 2 / 3))
    assert s["f1"] == pytest.approx(2 / (2 + 1 + 1))
    assert binary_scores([1, 1], [1, 0])["balanced"] is None  # one class only
    assert binary_scores([1, 0], [0, 0])["f1"] == 0.0
    assert binary_scores([], [])["accuracy"] is None


# --- examples -------------------------------------------------------------------------------------------------
def test_spread_ranks() -> None:
    assert spread_ranks(5, 5) == spread_ranks(5, 9) == [0, 1, 2, 3, 4]  # top-K only: take them all
    assert spread_ranks(9, 3) == [0, 4, 8]
    assert spread_ranks(10, 4) == [0, 3, 6, 9]
    assert spread_ranks(4, 1) == [0] and spread_ranks(4, 0) == []


def test_detection_examples() -> None:
    evidence, concepts = make_evidence(6, k=5)
    # latent 1's top text number 0 is also a top text of latent 0: never a negative for latent 0
    shared = evidence[1].texts[0]
    evidence[0] = LatentEvidence(0, {}, [], evidence[0].texts[:4] + [shared])
    job = detection_job(0, evidence, 10, seed=0)
    assert sum(job.truth) == 5 and len(job.texts) == 10
    assert not any("<<" in t or "(" in t for t in job.texts)
    negatives = [t for t, y in zip(job.texts, job.truth) if y == 0]
    own = {plain_text(t) for t in evidence[0].texts}
    assert not set(negatives) & own and len(set(negatives)) == 5
    # fewer examples than top-K: ranks spread over the top-K; negatives fill the other half
    job = detection_job(2, evidence, 6, seed=0)
    assert sorted(t for t, y in zip(job.texts, job.truth) if y) == sorted(
        plain_text(evidence[2].texts[r]) for r in (0, 2, 4))
    assert len(job.texts) == 6
    assert job == detection_job(2, evidence, 6, seed=0) and job != detection_job(2, evidence, 6, seed=1)
    assert detection_job(0, {0: evidence[0]}, 10, seed=0) == "no_negatives"
    assert detection_job(0, {0: LatentEvidence(0, {}, [], [])}, 10, seed=0) == "no_examples"


def test_fuzzing_examples() -> None:
    evidence, _ = make_evidence(3, k=5)
    job = fuzzing_job(1, evidence, 10, seed=3)
    assert len(job.texts) == 5 and sum(job.truth) == 3  # two wrongly marked, three right
    by_text = {plain_text(t): t for t in evidence[1].texts}
    for text, right in zip(job.texts, job.truth):
        source = by_text[text.replace("<<", "").replace(">>", "")]
        n_active = int((source.activations > 0).sum())
        marked_words = " ".join(re.findall(r"<<(.*?)>>", text)).split()
        assert len(marked_words) == n_active  # same count either way
        if right:
            assert text == marked_text(source)
        else:
            active_words = {p for p, a in zip(source.pieces, source.activations) if a > 0}
            assert not set(marked_words) & active_words
    assert fuzzing_job(1, {1: LatentEvidence(1, {}, [], evidence[1].texts[:1])}, 10, 0) == "too_few_examples"


def test_long_texts_are_cut_around_the_peak() -> None:
    pieces = [f"w{i}" for i in range(200)]
    acts = np.zeros(200, np.float32)
    acts[150] = 3.0
    t = TextExample("s", 0, pieces, acts, 150, "", "", "")
    plain = plain_text(t, context=5)
    assert plain == "… " + " ".join(f"w{i}" for i in range(145, 156)) + " …"
    assert marked_text(t, context=5) == "… w145 w146 w147 w148 w149 <<w150>> w151 w152 w153 w154 w155 …"


def test_templates_render() -> None:
    templates = load_judge_templates()
    prompt = templates["detection"].render("cooking $tools", ["a b", "c d"])
    assert "Description: cooking $tools" in prompt and "Text 2: c d" in prompt and "exactly 2 numbers" in prompt
    assert templates["fuzzing"].version != templates["detection"].version


# --- end to end against the stub ----------------------------------------------------------------------------
def test_perfect_judge_scores_one(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-judge-secret")
    evidence, concepts = make_evidence(6)
    with StubServer(default=Reply.dynamic(perfect)) as srv:
        frame = judge_scores(evidence, concepts, config(srv, judge_model="stub-judge"))
        log = srv.log
    assert frame.columns == list(COLUMNS) and frame["latent"].to_list() == list(range(6))
    assert frame["detection_accuracy"].to_list() == [1.0] * 6
    assert frame["detection_balanced"].to_list() == [1.0] * 6 and frame["detection_f1"].to_list() == [1.0] * 6
    assert frame["fuzzing_balanced"].to_list() == [1.0] * 6
    assert set(frame["judge_status"]) == {"ok"} and set(frame["judge"]) == {"stub-judge"}
    assert len(log) == 12
    body = log[0].body
    assert body["model"] == "stub-judge" and body["temperature"] == 0.0 and body["max_tokens"] >= 256
    assert body["messages"][0]["role"] == "user" and isinstance(body["messages"][0]["content"], str)
    assert log[0].headers["Authorization"] == "Bearer sk-judge-secret"
    assert {len(read_prompt(r.body)[1]) for r in log} == {5, 10}  # fuzzing: the 5 top texts; detection: 5 + 5


def test_always_yes_and_coin_judges_are_at_chance() -> None:
    evidence, concepts = make_evidence(12)
    with StubServer(default=Reply.dynamic(always_one)) as srv:
        frame = judge_scores(evidence, concepts, config(srv, judge_examples=8))
    assert frame["detection_balanced"].to_list() == [0.5] * 12 and frame["fuzzing_balanced"].to_list() == [0.5] * 12
    assert frame["detection_accuracy"].to_list() == [0.5] * 12  # 4 activating + 4 not
    assert frame["judge"].to_list() == ["stub-explainer"] * 12  # no judge_model: the explainer's
    with StubServer(default=Reply.dynamic(coin)) as srv:
        frame = judge_scores(evidence, concepts, config(srv))
    assert abs(frame["detection_balanced"].mean() - 0.5) < 0.15
    assert abs(frame["fuzzing_balanced"].mean() - 0.5) < 0.15
    assert frame["detection_balanced"].max() < 1.0


def test_deterministic_for_a_seed() -> None:
    evidence, concepts = make_evidence(6)
    runs = []
    for seed in (4, 4, 5):
        with StubServer(default=Reply.dynamic(coin)) as srv:
            frame = judge_scores(evidence, concepts, config(srv, seed=seed))
            prompts = sorted(request_text(r.body) for r in srv.log)
        runs.append((frame, prompts))
    assert runs[0][1] == runs[1][1] and runs[0][0].equals(runs[1][0])
    assert runs[0][1] != runs[2][1]


def test_malformed_answers_and_http_failures_give_statuses() -> None:
    evidence, concepts = make_evidence(8)
    concepts[5] = "forest [[R5]]"  # tags route latents 5-7 to scripted replies (both of their prompts)
    concepts[6] = "guitar [[F6]]"
    concepts[7] = "harbor [[B7]]"
    concepts[3] = None  # no textual concept: not sent

    def odd(body) -> str:
        concept, texts, fuzzing = read_prompt(body)
        truth = truth_of(body)
        if concept == "apple":
            return "I am not able to tell which texts fit."
        if concept == "boat":
            return "[1, 0]"
        if concept == "candle":
            return "\n".join(f"Text {i}: {'yes' if y else 'no'}" for i, y in enumerate(truth, 1))
        if concept == "dragon":
            return "Answer: " + " ".join(map(str, truth))
        return json.dumps(truth)

    script = {"R5": [Reply.http(500), Reply.http(503), Reply.dynamic(perfect)],
              "F6": [Reply.http(500)], "B7": [Reply.http(400)]}
    with StubServer(script, default=Reply.dynamic(odd)) as srv:
        cfg = config(srv, judge_examples=10)
        frame = judge_scores(evidence, concepts, cfg)
        sent = srv.keys_sent()
    rows = {r["latent"]: r for r in frame.iter_rows(named=True)}
    assert rows[0]["judge_status"] == "detection:unparsed,fuzzing:unparsed" and rows[0]["detection_accuracy"] is None
    assert rows[1]["judge_status"] == "detection:wrong_length,fuzzing:wrong_length"
    assert rows[1]["fuzzing_balanced"] is None
    assert rows[2]["judge_status"] == "ok" and rows[2]["detection_accuracy"] == 1.0
    assert rows[4]["judge_status"] == "ok" and rows[4]["fuzzing_balanced"] == 1.0
    assert rows[3]["judge_status"] == "detection:no_concept,fuzzing:no_concept"
    # 500s are retried with the explainer's policy (max_retries=2), then succeed; 400 is not retried
    assert rows[5]["judge_status"] == "ok" and rows[5]["detection_balanced"] == 1.0 and sent.count("R5") == 4
    assert rows[6]["judge_status"] == "detection:error,fuzzing:error" and sent.count("F6") == 2 * 3
    assert rows[7]["judge_status"] == "detection:error,fuzzing:error" and sent.count("B7") == 2
    assert len(sent) == 2 * 7 + 2 + 4 + 0  # 3 not sent; R5 two retries, F6 four retries


def test_missing_evidence_and_empty_input() -> None:
    evidence, concepts = make_evidence(2)
    with StubServer(default=Reply.dynamic(perfect)) as srv:
        frame = judge_scores({0: evidence[0]}, {0: concepts[0], 9: "x"}, config(srv))
        empty = judge_scores(evidence, {}, config(srv))
        assert len(srv.log) == 1  # latent 0's fuzzing; its detection had no negatives
    assert frame.select("latent", "judge_status").rows() == [
        (0, "detection:no_negatives,fuzzing:ok"), (9, "detection:no_examples,fuzzing:no_examples")]
    assert frame.row(0, named=True)["fuzzing_balanced"] == 1.0
    assert empty.is_empty() and dict(empty.schema) == COLUMNS


def test_unreachable_judge_and_missing_model() -> None:
    evidence, concepts = make_evidence(3)
    with StubServer() as srv:
        cfg = config(srv, judge_base_url=srv.base_url)
    frame = judge_scores(evidence, concepts, cfg)  # the server is gone
    assert set(frame["judge_status"]) == {"detection:error,fuzzing:error"}
    cfg = cfg.model_copy(update={"explainer": cfg.explainer.model_copy(update={"model": None})})
    with pytest.raises(ValueError, match="judge_model"):
        judge_scores(evidence, concepts, cfg)
