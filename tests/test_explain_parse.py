"""Prompt templates, answer parsing, duplicate handling and the explanation cache."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from msae.explain.base import ExplainAnswer, ExplainExample, ExplainRequest
from msae.explain.cache import ExplanationCache, examples_digest
from msae.explain.parse import (
    concept_index,
    filter_duplicates,
    normalise_concept,
    parse_concept,
    shared_concepts,
    unique_concepts,
)
from msae.explain.prompts import (
    TemplateError,
    build_messages,
    build_parts,
    load_templates,
    parse_template,
    prompt_version,
)
from msae.store import Store


def png(color: tuple[int, int, int] = (255, 0, 0), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def request(latent: int = 0, kind: str = "visual", prompting: str = "masked", n: int = 3,
            images: bool = True, tag: str = "") -> ExplainRequest:
    text = "Question: what shape? Answer: circle" if kind == "visual" else "a big (red) circle"
    examples = tuple(
        ExplainExample(f"s{i}", png((i * 40, 0, 0)) if images else None, f"{text} {tag}".strip())
        for i in range(n)
    )
    return ExplainRequest(latent, kind, prompting, examples)  # type: ignore[arg-type]


def answer(latent: int, concept: str | None, status: str = "ok", kind: str = "visual",
           prompting: str = "masked") -> ExplainAnswer:
    return ExplainAnswer(latent, kind, prompting, concept, f"Concept: {concept}", status,  # type: ignore[arg-type]
                         "test:model", "v1")


# --- parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Concept: red circles", ("red circles", "ok")),
        ("concept: red circles", ("red circles", "ok")),
        ("CONCEPT:red circles", ("red circles", "ok")),
        ("Sure! Looking at the highlighted regions, they all show round shapes.\nConcept: red circles",
         ("red circles", "ok")),
        ("Here is my answer. Concept: red circles", ("red circles", "ok")),
        ("**Concept:** red circles", ("red circles", "ok")),
        ("**Concept**: **Red circles**", ("Red circles", "ok")),
        ('Concept: "mesh-like structures."', ("mesh-like structures", "ok")),
        ("Concept: “wooden surfaces”", ("wooden surfaces", "ok")),
        ("Concept: <dog ears>", ("dog ears", "ok")),
        ("Concept: red circles.", ("red circles", "ok")),
        ("Concept: red circles. They appear in every image on the left.", ("red circles", "ok")),
        ("Concept: dogs\nConcept: cats", ("dogs", "ok")),
        ("Concept:\n\n  striped textures  \n", ("striped textures", "ok")),
        ("Concept: <concept>\nConcept: grass", ("grass", "ok")),
        ("  Concept:   many    spaces  ", ("many spaces", "ok")),
        ("Concept: No visual concept", (None, "no_concept")),
        ("Concept: No textual concept.", (None, "no_concept")),
        ("Concept: no clear visual concept", (None, "no_concept")),
        ("Concept: None", (None, "no_concept")),
        ("Concept: N/A", (None, "no_concept")),
        ("**Concept:** *No visual concept*", (None, "no_concept")),
        ("No visual concept.", (None, "no_concept")),
        ("none", (None, "no_concept")),
        ("The regions are scattered.\nNo visual concept", (None, "no_concept")),
        ("red circles", (None, "unparsed")),
        ("I cannot tell what these images share.", (None, "unparsed")),
        ("", (None, "unparsed")),
        ("Concept:", (None, "unparsed")),
        ("Concept: " + "x" * 41, (None, "too_long")),
        ("Concept: " + "x" * 40, ("x" * 40, "ok")),
    ],
)
def test_parse_concept(raw: str, expected: tuple[str | None, str]) -> None:
    assert parse_concept(raw, "visual", 40) == expected


def test_parse_no_concept_of_other_kind_declines_too() -> None:
    assert parse_concept("Concept: No textual concept", "visual", 40) == (None, "no_concept")
    assert parse_concept("Concept: No visual concept", "textual", 40) == (None, "no_concept")


def test_concepts_that_start_with_no_are_not_declines() -> None:
    assert parse_concept("Concept: no entry signs", "visual", 40) == ("no entry signs", "ok")
    assert parse_concept("Concept: noses", "visual", 40) == ("noses", "ok")


# --- duplicates -------------------------------------------------------------------------------------
def test_duplicates_collapse_candidates_but_keep_latents() -> None:
    answers = [
        answer(0, "Red circles"),
        answer(1, "red circles "),
        answer(2, "stripes"),
        answer(3, None, "no_concept"),
        answer(4, None, "too_long"),
        answer(0, "something else"),  # a repeated answer for latent 0: the first wins
    ]
    kept = filter_duplicates(answers)
    assert [a.latent for a in kept] == [0, 1, 2]
    candidates = unique_concepts(answers)
    assert candidates == ["Red circles", "stripes"]
    index = concept_index(candidates)
    assert [index[normalise_concept(a.concept)] for a in kept] == [0, 0, 1]
    assert shared_concepts(answers) == {"red circles": [0, 1]}


def test_unique_concepts_refuses_mixed_groups() -> None:
    with pytest.raises(ValueError, match="mix"):
        unique_concepts([answer(0, "a"), answer(1, "b", prompting="whole")])


# --- templates --------------------------------------------------------------------------------------
def test_builtin_templates_cover_every_kind_and_prompting() -> None:
    templates = load_templates(None)
    assert set(templates) == {(k, p) for k in ("visual", "textual") for p in ("masked", "whole")}
    assert templates[("visual", "masked")].version != templates[("visual", "whole")].version
    assert templates[("textual", "masked")].version == templates[("textual", "whole")].version
    vm = templates[("visual", "masked")].text
    assert "Concept: No visual concept" in vm and "black" in vm
    assert "Concept: No textual concept" in templates[("textual", "masked")].text
    assert "parentheses" in templates[("textual", "whole")].text
    assert all(len(t.version) == 12 for t in templates.values())


def test_override_folder_replaces_only_named_files(tmp_path) -> None:
    text = "[[instructions]]\nSay it. $n items.\n[[example]]\n#$index: $text {braces ok}\n[[closing]]\nConcept: <concept>\n"
    (tmp_path / "visual_whole.txt").write_text(text)
    templates = load_templates(str(tmp_path))
    builtin = load_templates(None)
    assert templates[("visual", "whole")].version == prompt_version(text)
    assert templates[("visual", "whole")].source == str(tmp_path)
    assert templates[("visual", "masked")].version == builtin[("visual", "masked")].version
    parts = build_parts(request(kind="visual", prompting="whole", n=2), templates)
    assert parts[0] == ("text", "Say it. 2 items.")
    assert parts[2] == ("text", "#1: Question: what shape? Answer: circle {braces ok}")


def test_bad_templates_fail_loudly(tmp_path) -> None:
    with pytest.raises(TemplateError, match="missing"):
        parse_template("[[instructions]]\nhi\n[[example]]\n$text\n", "x.txt")
    with pytest.raises(TemplateError, match="placeholder"):
        parse_template("[[instructions]]\n$oops\n[[example]]\n$text\n[[closing]]\nbye\n", "x.txt")
    with pytest.raises(TemplateError, match="not a folder"):
        load_templates(str(tmp_path / "missing"))


def test_build_messages_openai_format() -> None:
    req = request(kind="visual", n=3)
    msgs = build_messages(req, load_templates(None))
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    images = [p for p in content if p["type"] == "image_url"]
    assert len(images) == 3
    for part, ex in zip(images, req.examples):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]) == ex.image_png
    texts = [p["text"] for p in content if p["type"] == "text"]
    assert texts[0].startswith("You are given 3 images")
    assert sum("Question: what shape? Answer: circle" in t for t in texts) == 3
    assert "Concept: <concept>" in texts[-1]
    # each image is followed by its example text
    kinds = [p["type"] for p in content]
    assert kinds == ["text"] + ["image_url", "text"] * 3 + ["text"]


def test_build_messages_textual_without_images() -> None:
    msgs = build_messages(request(kind="textual", images=False), load_templates(None))
    content = msgs[0]["content"]
    assert all(p["type"] == "text" for p in content)
    assert any("a big (red) circle" in p["text"] for p in content)


# --- cache ------------------------------------------------------------------------------------------
def test_cache_roundtrip_and_keys(tmp_path) -> None:
    cache = ExplanationCache(Store(str(tmp_path)), "concepts/_cache")
    req = request(latent=7)
    ans = ExplainAnswer(7, "visual", "masked", "red circles", "Concept: red circles", "ok", "openai:m", "abc")
    assert cache.get(req, "openai:m", "abc") is None
    cache.put(ans, req)
    assert len(cache) == 1
    assert cache.get(req, "openai:m", "abc") == ans
    fresh = ExplanationCache(Store(str(tmp_path)), "concepts/_cache")  # a new process
    assert fresh.get(req, "openai:m", "abc") == ans
    # any part of the key differing is a miss
    assert fresh.get(req, "openai:other", "abc") is None
    assert fresh.get(req, "openai:m", "abd") is None
    assert fresh.get(request(latent=8), "openai:m", "abc") is None
    assert fresh.get(request(latent=7, prompting="whole"), "openai:m", "abc") is None
    # same latent, different examples: not reused
    assert fresh.get(request(latent=7, tag="other"), "openai:m", "abc") is None


def test_cache_skips_errors_and_tolerates_corrupt_files(tmp_path) -> None:
    store = Store(str(tmp_path))
    cache = ExplanationCache(store, "c")
    req = request(latent=1)
    cache.put(ExplainAnswer(1, "visual", "masked", None, "HTTP 500", "error", "e:m", "v"), req)
    assert len(cache) == 0
    cache.put(ExplainAnswer(1, "visual", "masked", "x", "Concept: x", "ok", "e:m", "v"), req)
    (path,) = [p for p in store.fs.find(store.path("c")) if p.endswith(".json")]
    with open(path, "w") as f:
        f.write('{"format": 1, "examples": "ab')  # a write cut short
    assert ExplanationCache(store, "c").get(req, "e:m", "v") is None


def test_cache_on_memory_store_and_digest_covers_arrays() -> None:
    cache = ExplanationCache(Store("memory://msae-test-cache"), "c")
    req = request(latent=2)
    ans = ExplainAnswer(2, "visual", "masked", "x", "Concept: x", "ok", "transformers:/models/llava", "v")
    cache.put(ans, req)
    assert cache.get(req, "transformers:/models/llava", "v") == ans
    a = ExplainRequest(0, "visual", "masked", (ExplainExample("s", None, "t", np.zeros((2, 2))),))
    b = ExplainRequest(0, "visual", "masked", (ExplainExample("s", None, "t", np.ones((2, 2))),))
    assert examples_digest(a) != examples_digest(b)
