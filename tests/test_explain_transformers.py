"""The local transformers backend on the tiny random LlavaNext from conftest (answers are gibberish)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from msae.config import ExplainerConfig
from msae.explain.base import ExplainExample, ExplainRequest
from msae.explain.cache import ExplanationCache
from msae.explain.parse import parse_concept
from msae.explain.transformers_backend import TransformersExplainer
from msae.store import Store


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, "PNG")
    return buf.getvalue()


def requests() -> list[ExplainRequest]:
    """Visual and textual prompts, with different image counts (one textual prompt has none)."""
    out = []
    for latent in range(5):
        kind = "visual" if latent % 2 else "textual"
        examples = tuple(
            ExplainExample(f"s{latent}-{i}",
                           None if (kind == "textual" and latent == 2) else png((40 * latent, 60 * i, 0)),
                           "what color is the circle ? red" if kind == "visual" else "a small (red) circle")
            for i in range(2)
        )
        out.append(ExplainRequest(latent, kind, "masked" if latent < 3 else "whole", examples))
    return out


def config(model_dir, **kw) -> ExplainerConfig:
    settings = dict(backend="transformers", model=str(model_dir), device="cpu", batch_size=2, max_tokens=6,
                    temperature=0.0)
    settings.update(kw)
    return ExplainerConfig(**settings)


def test_pipeline_batches_parses_and_caches(tiny_vlm_dir, tmp_path) -> None:
    cache = ExplanationCache(Store(str(tmp_path)), "cache")
    reqs = requests()
    ex = TransformersExplainer(config(tiny_vlm_dir), cache, local_files_only=True)
    assert ex.name == f"transformers:{tiny_vlm_dir}"
    answers = ex.explain(reqs)
    assert ex.stats["batches"] == 3  # 5 prompts, 2 per generate() call
    assert [(a.latent, a.kind, a.prompting) for a in answers] == [(r.latent, r.kind, r.prompting) for r in reqs]
    for a in answers:
        assert a.status in {"ok", "no_concept", "too_long", "unparsed"}
        assert (a.concept, a.status) == parse_concept(a.raw, a.kind, 40)
        assert a.prompt_version == ex.version(a.kind, a.prompting)
    assert len(cache) == 5

    # greedy decoding: one prompt at a time gives the same answers as left-padded batches
    single = TransformersExplainer(config(tiny_vlm_dir, batch_size=1), None, local_files_only=True)
    assert [a.raw for a in single.explain(reqs)] == [a.raw for a in answers]

    # a new explainer on the same cache answers everything without loading the model
    again = TransformersExplainer(config(tiny_vlm_dir), ExplanationCache(Store(str(tmp_path)), "cache"),
                                  local_files_only=True)
    assert again.explain(reqs) == answers
    assert again.stats["cached"] == 5 and again.model is None


def test_scripted_generation_statuses_and_batch_fallback(tiny_vlm_dir, monkeypatch) -> None:
    """Status mapping and the one-by-one fallback when a whole batch fails (e.g. out of memory)."""
    replies = {0: "Concept: red circles", 1: "Concept: No visual concept", 2: "blah",
               3: "Concept: " + "y" * 50, 4: "boom"}
    calls: list[int] = []

    def fake_generate(self, batch):
        calls.append(len(batch))
        if len(batch) > 1 or batch[0].latent == 4:
            raise RuntimeError("CUDA out of memory (pretend)")
        return [replies[batch[0].latent]]

    monkeypatch.setattr(TransformersExplainer, "_generate", fake_generate)
    monkeypatch.setattr(TransformersExplainer, "load", lambda self: None)
    answers = TransformersExplainer(config(tiny_vlm_dir, batch_size=3), None).explain(requests())
    assert [a.status for a in answers] == ["ok", "no_concept", "unparsed", "too_long", "error"]
    assert answers[0].concept == "red circles"
    assert "out of memory" in answers[4].raw
    assert calls == [3, 1, 1, 1, 2, 1, 1]


def test_missing_model_gives_errors(tmp_path) -> None:
    ex = TransformersExplainer(config(tmp_path / "no-such-model"), None, local_files_only=True)
    answers = ex.explain(requests()[:2])
    assert [a.status for a in answers] == ["error", "error"]


def test_model_is_required() -> None:
    with pytest.raises(ValueError, match="explainer.model"):
        TransformersExplainer(ExplainerConfig(backend="transformers"), None)
