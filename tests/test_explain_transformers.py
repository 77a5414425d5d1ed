"""The local transformers backend (grid and per-image modes) on the tiny random LlavaNext from conftest
(answers are gibberish, so per-image tests check what is asked and how answers are combined)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import polars as pl
import pytest
from PIL import Image
from pydantic import ValidationError

from msae.config import ExplainerConfig, ModelConfig, parse_config
from msae.explain.base import ExplainExample, ExplainRequest
from msae.explain.cache import ExplanationCache
from msae.explain.combine import CombineRule, combine_answers
from msae.explain.parse import parse_concept
from msae.explain.stage import build_requests, explainer_fingerprint, make_explainer, proposals_frame
from msae.explain.transformers_backend import TransformersExplainer, model_identity
from msae.latents.evidence import ImageExample, LatentEvidence, TextExample
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


# --- per-image mode ------------------------------------------------------------------------------
GRID = 8  # the tiny VLM's 64-px images on an 8×8 base grid


def per_image_config(model_dir, **kw) -> ExplainerConfig:
    t = {"mode": "per_image", "max_new_tokens": 4, **kw.pop("transformers", {})}
    return ExplainerConfig(**{**dict(backend="transformers", model=str(model_dir), device="cpu", batch_size=3,
                                     transformers=t), **kw})


def scene(path, color, cells) -> str:
    """A 64-px grey image with a coloured 8-px square in each of the given (row, col) cells."""
    rgb = np.full((64, 64, 3), 180, dtype=np.uint8)
    for r, c in cells:
        rgb[8 * r:8 * r + 8, 8 * c:8 * c + 8] = color
    Image.fromarray(rgb, "RGB").save(path)
    return str(path)


def acts_on(cells) -> np.ndarray:
    a = np.full((GRID, GRID), 0.05, dtype=np.float32)  # weak firing everywhere, below the threshold
    for r, c in cells:
        a[r, c] = 1.0
    return a


def image_example(sid, path, cells) -> ImageExample:
    return ImageExample(sid, 0, path, "what is shown ?", "red circle", acts_on(cells), 1.0, len(cells), 0.5, 1.0,
                        active_threshold=0.3)


def text_example(sid, pieces, peak) -> TextExample:
    acts = np.zeros(len(pieces), dtype=np.float32)
    acts[peak] = 2.0
    acts[0] = 3.0  # a template token fires harder; the evidence peak (template excluded) is `peak`
    return TextExample(sid, 0, list(pieces), acts, peak, "q", "a", "")


def evidence(tmp_path) -> dict[int, LatentEvidence]:
    """Two latents sharing top images A and C (with different masks) plus top texts."""
    a = scene(tmp_path / "a.png", (230, 40, 40), [(1, 1), (5, 5)])
    b = scene(tmp_path / "b.png", (50, 90, 240), [(2, 6)])
    c = scene(tmp_path / "c.png", (40, 200, 60), [(6, 2), (0, 7)])
    words = ["user", "what", "is", "the", "red", "circle", "?"]
    ev0 = LatentEvidence(0, {}, [image_example("a", a, [(1, 1)]), image_example("b", b, [(2, 6)]),
                                 image_example("c", c, [(6, 2)])],
                         [text_example("t0", words, 4), text_example("t1", words, 4), text_example("t2", words, 3)])
    ev1 = LatentEvidence(1, {}, [image_example("a", a, [(5, 5)]), image_example("c", c, [(0, 7)])],
                         [text_example("t3", words, 6), text_example("t4", words, 6)])
    return {0: ev0, 1: ev1}


class ProcessorSpy:
    """Delegates to the real processor and records the images it is given."""

    def __init__(self, inner) -> None:
        self.inner, self.images, self.texts = inner, [], []

    def __call__(self, *args, **kwargs):
        self.images.extend(kwargs.get("images") or [])
        self.texts.extend(kwargs.get("text") or [])
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def spy(monkeypatch) -> dict:
    """Record what each explainer sends to the processor and to generate()."""
    seen: dict = {"asked": [], "said": [], "pixels": 0, "processors": []}
    load, gen_images = TransformersExplainer.load, TransformersExplainer._generate_images

    def spied_load(self):
        if self.model is not None:
            return
        load(self)
        self.processor = ProcessorSpy(self.processor)
        seen["processors"].append(self.processor)
        generate = self.model.generate

        def spied_generate(**inputs):
            seen["pixels"] += int(inputs["pixel_values"].shape[0])
            return generate(**inputs)
        self.model.generate = spied_generate

    def spied_images(self, pngs):
        seen["asked"].extend(pngs)
        out = gen_images(self, pngs)
        seen["said"].extend(out)
        return out

    monkeypatch.setattr(TransformersExplainer, "load", spied_load)
    monkeypatch.setattr(TransformersExplainer, "_generate_images", spied_images)
    return seen


def test_per_image_asks_each_image_once_masked_and_whole(tiny_vlm_dir, tmp_path, monkeypatch) -> None:
    ev = evidence(tmp_path)
    cfg = per_image_config(tiny_vlm_dir)
    reqs = build_requests(ev, cfg)
    assert [(r.latent, r.kind, r.prompting) for r in reqs] == [
        (0, "visual", "masked"), (0, "visual", "whole"), (0, "textual", "masked"),
        (1, "visual", "masked"), (1, "visual", "whole"), (1, "textual", "masked")]
    seen = spy(monkeypatch)
    cache = ExplanationCache(Store(str(tmp_path / "store")), "cache")
    answers = TransformersExplainer(cfg, cache, local_files_only=True).explain(reqs)

    # every distinct image once: 5 masked views (3 + 2, masks differ) and the 3 whole images,
    # though whole A and C top both latents
    visual = [r for r in reqs if r.kind == "visual"]
    distinct = {ex.image_png for r in visual for ex in r.examples}
    assert len(seen["asked"]) == len(distinct) == 8 and set(seen["asked"]) == distinct
    assert seen["pixels"] == 8  # generate() saw exactly those images

    # what the VLM was shown: masked views black outside the active patches, whole images untouched
    originals = {ex.sample_id: np.array(Image.open(ex.image_path).convert("RGB")) for e in ev.values()
                 for ex in e.images}
    shown = {png: np.array(img) for png, img in zip(seen["asked"], seen["processors"][0].images)}
    for r in visual:
        for ex, src in zip(r.examples, ev[r.latent].images):
            img, orig = shown[ex.image_png], originals[src.sample_id]
            if r.prompting == "whole":
                assert np.array_equal(img, orig)
                continue
            active = np.kron(src.patch_activations > src.active_threshold, np.ones((8, 8), bool))
            assert np.array_equal(img[active], orig[active]) and not img[~active].any()
            assert orig[~active].any()  # there really was something to hide
    # the question in the chat form the VLM was trained on
    assert {t for t in seen["processors"][0].texts} == {"<s>user : <image> what is shown ? assistant : "}

    # each visual concept is the rule applied to that request's per-image answers
    said = dict(zip(seen["asked"], seen["said"]))
    rule = CombineRule()
    for r, a in zip(reqs, answers):
        assert (a.latent, a.kind, a.prompting) == (r.latent, r.kind, r.prompting)
        assert (a.concept, a.status) == parse_concept(a.raw, a.kind, 40)
        if r.kind == "visual":
            per_image = [said[ex.image_png] for ex in r.examples]
            want = combine_answers(per_image, rule).concept
            assert (a.concept, a.status) == ((want, "ok") if want and len(want) <= 40 else
                                             (None, "no_concept" if want is None else "too_long"))
            assert a.raw.splitlines()[2:] == [f"{i}. {s or '(empty)'}" for i, s in enumerate(per_image, 1)]
            assert "what is shown ?" in a.raw.splitlines()[1] and f"({r.prompting})" in a.raw

    # deterministic: one image per generate() call gives the same answers; a cached rerun loads nothing
    single = TransformersExplainer(per_image_config(tiny_vlm_dir, batch_size=1), None, local_files_only=True)
    assert single.explain(reqs) == answers
    again = TransformersExplainer(cfg, ExplanationCache(Store(str(tmp_path / "store")), "cache"),
                                  local_files_only=True)
    assert again.explain(reqs) == answers
    assert again.model is None and again.stats["cached"] == 4


def test_per_image_combines_scripted_answers(tiny_vlm_dir, tmp_path, monkeypatch) -> None:
    ev = evidence(tmp_path)
    reqs = build_requests(ev, per_image_config(tiny_vlm_dir))
    by_png: dict[bytes, str] = {}
    script = {(0, "masked"): ["small red circle", "red circle", "a large red circle"],
              (0, "whole"): ["red circle and blue square", "blue square", "green cross"],
              (1, "masked"): ["background", "green cross"],
              (1, "whole"): ["red circle and blue square", "green cross"]}
    for r in reqs:
        if r.kind == "visual":
            for ex, text in zip(r.examples, script[(r.latent, r.prompting)]):
                assert by_png.setdefault(ex.image_png, text) == text
    calls: list[int] = []

    def fake(self, pngs):
        calls.append(len(pngs))
        if any(by_png[p] == "green cross" for p in pngs) and len(pngs) > 1:
            raise RuntimeError("CUDA out of memory (pretend)")
        if by_png[pngs[0]] == "background":
            raise RuntimeError("broken image")
        return [by_png[p] for p in pngs]

    monkeypatch.setattr(TransformersExplainer, "_generate_images", fake)
    monkeypatch.setattr(TransformersExplainer, "load", lambda self: None)
    cache = ExplanationCache(Store(str(tmp_path / "store")), "cache")
    ex = TransformersExplainer(per_image_config(tiny_vlm_dir), cache)
    answers = ex.explain(reqs)
    got = {(a.latent, a.kind, a.prompting): a for a in answers}
    # proposals.parquet carries the evidence: the per-image answers and the peak words
    frame = proposals_frame([0, 1], answers, per_image_config(tiny_vlm_dir), ex)
    row = frame.filter((pl.col("latent") == 0) & (pl.col("prompting") == "masked")).row(0, named=True)
    assert (row["visual_concept"], row["textual_concept"]) == ("red circle", "red")
    assert "2. red circle" in row["visual_raw"] and "3. the" in row["textual_raw"]
    assert ex.stats["images"] == 8  # 5 masked views, 3 whole images (A and C top both latents)
    v = got[(0, "visual", "masked")]
    assert (v.concept, v.status) == ("red circle", "ok")  # 3 of 3; "a" is a function word
    assert v.raw.splitlines()[0] == "Concept: red circle" and "chosen with support 3" in v.raw
    assert v.raw.splitlines()[2:] == ["1. small red circle", "2. red circle", "3. a large red circle"]
    w = got[(0, "visual", "whole")]
    assert (w.concept, w.status) == ("blue square", "ok")  # 2 of 3 (required ceil(0.6 × 3) = 2)
    assert got[(1, "visual", "masked")].status == "error" and "broken image" in got[(1, "visual", "masked")].raw
    nothing = got[(1, "visual", "whole")]
    assert (nothing.concept, nothing.status) == (None, "no_concept")  # 2 answers, nothing in both
    assert nothing.raw.startswith("Concept: No visual concept\n") and "none qualifies" in nothing.raw
    for a in got.values():
        if a.status != "error":
            assert (a.concept, a.status) == parse_concept(a.raw, a.kind, 40)
    assert len(cache) == 3  # the error is not stored (textual answers need no cache)
    assert calls[0] == 3 and 1 in calls  # the failing batch fell back to one image at a time


def test_per_image_textual_concept_from_peak_words(tiny_vlm_dir, tmp_path, monkeypatch) -> None:
    reqs = [r for r in build_requests(evidence(tmp_path), per_image_config(tiny_vlm_dir)) if r.kind == "textual"]
    # the view marks the evidence peak, not the template token that fires harder
    assert reqs[0].examples[0].text == "user what is the (red) circle ?"
    assert [ex.peak_token for ex in reqs[0].examples] == ["red", "red", "the"]

    def no_model(self):
        raise AssertionError("textual concepts must not load the VLM")

    monkeypatch.setattr(TransformersExplainer, "load", no_model)
    answers = TransformersExplainer(per_image_config(tiny_vlm_dir), None).explain(reqs)
    assert [(a.concept, a.status) for a in answers] == [("red", "ok"), (None, "no_concept")]  # "?" is never one
    assert answers[0].raw.splitlines()[0] == "Concept: red"
    assert "peak words" in answers[0].raw and "not asked of the VLM" in answers[0].raw
    assert answers[0].raw.splitlines()[2:] == ["1. red", "2. red", "3. the"]
    assert answers[1].raw.startswith("Concept: No textual concept\n")
    # function words stay nameable as textual concepts (the ground truth counts "the" latents)
    the = ExplainRequest(7, "textual", "masked", tuple(ExplainExample(f"s{i}", None, "", peak_token=w)
                                                        for i, w in enumerate(["The", "the", "the", "red"])))
    assert TransformersExplainer(per_image_config(tiny_vlm_dir), None).explain([the])[0].concept == "the"


def test_per_image_versions_and_fingerprint(tiny_vlm_dir, tmp_path) -> None:
    base = per_image_config(tiny_vlm_dir)
    ex = TransformersExplainer(base, None)
    v, t = ex.version("visual", "masked"), ex.version("textual", "masked")
    assert v == ex.version("visual", "whole") and v != t
    changed = [per_image_config(tiny_vlm_dir, transformers={"question": "what is at the top left ?"}),
               per_image_config(tiny_vlm_dir, transformers={"min_support": 2}),
               per_image_config(tiny_vlm_dir, transformers={"max_new_tokens": 6}),
               per_image_config(tiny_vlm_dir, transformers={"stop_words": ["and"]})]
    assert all(TransformersExplainer(c, None).version("visual", "masked") != v for c in changed)
    assert TransformersExplainer(base.model_copy(update={"batch_size": 9}), None).version("visual", "masked") == v
    assert TransformersExplainer(config(tiny_vlm_dir), None).version("visual", "masked") != v  # grid

    # the model's identity: a retrained model in the same folder changes visual versions, not textual
    copy = tmp_path / "vlm"
    shutil.copytree(tiny_vlm_dir, copy)
    before = TransformersExplainer(per_image_config(copy), None)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    after = TransformersExplainer(per_image_config(copy), None)
    assert before.version("visual", "masked") != after.version("visual", "masked")
    assert before.version("textual", "masked") == after.version("textual", "masked")
    assert model_identity("org/model", None) == "hub:org/model@main" != model_identity("org/model", "v2")

    # fingerprint (the `concepts` code version): the pipeline's model stands in for explainer.model
    unset = ExplainerConfig(backend="transformers", transformers={"mode": "per_image"})
    fp = explainer_fingerprint(unset, ModelConfig(name_or_path=str(copy)))
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert explainer_fingerprint(unset, ModelConfig(name_or_path=str(copy))) != fp
    q = unset.model_copy(update={"transformers": unset.transformers.model_copy(update={"question": "what ?"})})
    assert explainer_fingerprint(q, ModelConfig(name_or_path=str(copy)))["transformers"]["question"] == "what ?"
    # other backends ignore the section
    assert "transformers" not in explainer_fingerprint(ExplainerConfig())


def test_per_image_config_validation() -> None:
    with pytest.raises(ValidationError, match="explainer.temperature"):
        ExplainerConfig(backend="transformers", temperature=0.7, transformers={"mode": "per_image"})
    with pytest.raises(ValidationError, match="question is empty"):
        ExplainerConfig(transformers={"question": "  "})
    with pytest.raises(ValidationError, match="single non-empty words"):
        ExplainerConfig(transformers={"stop_words": ["of the"]})
    cfg = ExplainerConfig(transformers={"mode": "per_image", "stop_words": ["The", "and", "the"],
                                        "question": " what  is shown ? "})
    assert cfg.transformers.stop_words == ["and", "the"] and cfg.transformers.question == "what is shown ?"
    assert ExplainerConfig().transformers.mode == "grid"  # the default keeps the one-prompt behaviour


def test_unset_explainer_model_is_the_analysed_vlm(tiny_config_data, tmp_path) -> None:
    data = {**tiny_config_data, "explainer": {"backend": "transformers", "transformers": {"mode": "per_image"}}}
    cfg = parse_config(data)
    ex = make_explainer(cfg, Store(str(tmp_path / "s")), 0, 16)
    assert ex.model_ref == cfg.model.name_or_path and ex.dtype_name == "float32" and ex.local_files_only
    assert ex.identity == model_identity(cfg.model.name_or_path)
