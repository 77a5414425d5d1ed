"""The OpenAI-compatible backend against a real local HTTP stub (tests/openai_stub.py)."""

from __future__ import annotations

import base64
import io
import logging
import time

from PIL import Image

from msae.config import ExplainerConfig
from msae.explain.base import ExplainExample, ExplainRequest
from msae.explain.cache import ExplanationCache
from msae.explain.openai_backend import OpenAIExplainer
from msae.store import Store
from openai_stub import Reply, StubServer, request_images

KEY_ENV = "MSAE_TEST_EXPLAINER_KEY"
SECRET = "sk-test-secret-123"


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def req(latent: int, kind: str = "visual", n: int = 2, prompting: str = "masked") -> ExplainRequest:
    """A request whose example texts carry the stub's script tag [[L<latent>]]."""
    examples = tuple(
        ExplainExample(f"s{latent}-{i}", png((latent * 10 % 256, i * 50, 0)),
                       f"Question: what is it? Answer: a shape [[L{latent}]]")
        for i in range(n)
    )
    return ExplainRequest(latent, kind, prompting, examples)  # type: ignore[arg-type]


def explainer(srv: StubServer, cache: ExplanationCache | None = None, **kw) -> OpenAIExplainer:
    settings = dict(backend="openai", model="stub-vlm", base_url=srv.base_url, api_key_env=KEY_ENV,
                    timeout_s=0.4, max_retries=2, backoff_s=0.01, concurrency=4)
    settings.update(kw)
    return OpenAIExplainer(ExplainerConfig(**settings), cache)


def test_request_format_key_header_and_answers(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with StubServer({"L1": [Reply.ok("Concept: blue squares")]}) as srv:
        ex = explainer(srv, temperature=0.0, max_tokens=32)
        requests = [req(0, n=3), req(1, kind="textual")]
        answers = ex.explain(requests)
        assert [(a.latent, a.concept, a.status) for a in answers] == [(0, "red circles", "ok"),
                                                                     (1, "blue squares", "ok")]
        assert all(a.explainer == "openai:stub-vlm" for a in answers)
        assert answers[0].prompt_version == ex.version("visual", "masked")
        assert answers[1].prompt_version == ex.version("textual", "masked")
        log = sorted(srv.log, key=lambda r: r.key)
        assert [r.path for r in log] == ["/v1/chat/completions"] * 2
        assert log[0].headers["Authorization"] == f"Bearer {SECRET}"
        body = log[0].body
        assert (body["model"], body["temperature"], body["max_tokens"]) == ("stub-vlm", 0.0, 32)
        urls = request_images(body)
        assert len(urls) == 3 and all(u.startswith("data:image/png;base64,") for u in urls)
        assert base64.b64decode(urls[0].split(",", 1)[1]) == requests[0].examples[0].image_png
    assert SECRET not in repr(ex) and SECRET not in repr(vars(ex))


def test_no_key_no_header(monkeypatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with StubServer() as srv:
        assert explainer(srv).explain([req(0)])[0].status == "ok"
        assert "Authorization" not in srv.log[0].headers


def test_odd_answer_formats() -> None:
    script = {
        "L0": [Reply.ok("Looking closely...\n**Concept:** Mesh-like structures.")],
        "L1": [Reply.ok("Concept: No visual concept")],
        "L2": [Reply.ok("I am not sure what these show.")],
        "L3": [Reply.ok("Concept: " + "a very long description of many different things in the images")],
        "L4": [Reply.ok("concept: 'dog ears'")],
    }
    with StubServer(script) as srv:
        answers = explainer(srv).explain([req(i) for i in range(5)])
    assert [(a.concept, a.status) for a in answers] == [
        ("Mesh-like structures", "ok"), (None, "no_concept"), (None, "unparsed"), (None, "too_long"),
        ("dog ears", "ok")]
    assert answers[2].raw == "I am not sure what these show."


def test_timeout_is_retried_then_gives_up(monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    script = {"L0": [Reply.slow(1.0), Reply.ok("Concept: after timeout")], "L1": [Reply.slow(1.0)]}
    with StubServer(script) as srv:
        t0 = time.monotonic()
        answers = explainer(srv, timeout_s=0.3, max_retries=1).explain([req(0), req(1)])
        elapsed = time.monotonic() - t0
        assert srv.keys_sent().count("L0") == 2 and srv.keys_sent().count("L1") == 2
    assert (answers[0].concept, answers[0].status) == ("after timeout", "ok")
    assert answers[1].status == "error" and "timeout" in answers[1].raw and SECRET not in answers[1].raw
    assert elapsed < 1.5  # the client did not wait for the slow server


def test_retryable_http_errors_and_bad_bodies() -> None:
    script = {
        "L0": [Reply.http(500), Reply.http(503), Reply.ok("Concept: third time")],
        "L1": [Reply.http(429, retry_after="0"), Reply.ok("Concept: after 429")],
        "L2": [Reply.malformed(), Reply.ok("Concept: after bad json")],
        "L3": [Reply.drop(), Reply.ok("Concept: after drop")],
        "L4": [Reply.malformed()],
        "L5": [Reply.http(500)],
    }
    with StubServer(script) as srv:
        ex = explainer(srv, max_retries=2)
        answers = ex.explain([req(i) for i in range(6)])
        sent = srv.keys_sent()
    assert [a.concept for a in answers[:4]] == ["third time", "after 429", "after bad json", "after drop"]
    assert [sent.count(f"L{i}") for i in range(6)] == [3, 2, 2, 2, 3, 3]
    assert answers[4].status == "error" and "malformed" in answers[4].raw
    assert answers[5].status == "error" and "500" in answers[5].raw
    assert ex.stats["retried"] == 2 + 1 + 1 + 1 + 2 + 2 and ex.stats["error"] == 2


def test_client_errors_are_not_retried() -> None:
    with StubServer({"L0": [Reply.http(400)], "L1": [Reply.http(401)]}) as srv:
        answers = explainer(srv, max_retries=3).explain([req(0), req(1)])
        assert sorted(srv.keys_sent()) == ["L0", "L1"]
    assert [(a.status, a.raw) for a in answers] == [("error", "HTTP 400"), ("error", "HTTP 401")]


def test_unreachable_server_gives_errors_not_exceptions() -> None:
    with StubServer() as srv:
        url = srv.base_url
    cfg = ExplainerConfig(backend="openai", model="m", base_url=url, timeout_s=0.3, max_retries=1, backoff_s=0.01)
    answers = OpenAIExplainer(cfg, None).explain([req(0), req(1)])
    assert [a.status for a in answers] == ["error", "error"]
    assert all("connection" in a.raw for a in answers)


def test_concurrency_bound_is_respected() -> None:
    with StubServer(default=Reply.ok("Concept: slowish", delay=0.15)) as srv:
        t0 = time.monotonic()
        answers = explainer(srv, concurrency=3).explain([req(i) for i in range(9)])
        elapsed = time.monotonic() - t0
        assert srv.state.max_in_flight == 3
    assert all(a.status == "ok" for a in answers) and [a.latent for a in answers] == list(range(9))
    assert elapsed >= 3 * 0.15 * 0.9  # three waves


def test_cached_requests_are_not_resent(tmp_path, caplog) -> None:
    cache = ExplanationCache(Store(str(tmp_path)), "cache")
    with StubServer() as srv:
        explainer(srv, cache).explain([req(0), req(1)])
        assert len(cache) == 2
        with caplog.at_level(logging.INFO, logger="msae.explain.openai_backend"):
            ex = explainer(srv, cache)
            answers = ex.explain([req(0), req(1), req(2), req(0, prompting="whole")])
        assert sorted(srv.keys_sent()) == ["L0", "L0", "L1", "L2"]  # only L2 and L0/whole were new
        assert ex.stats["cached"] == 2 and ex.stats["sent"] == 2
    assert [a.status for a in answers] == ["ok"] * 4
    assert "sent 2, cached 2, retried 0, errors 0" in caplog.text


def test_restart_midway_only_sends_the_missing(tmp_path) -> None:
    n, m = 10, 4
    requests = [req(i) for i in range(n)]
    cache = ExplanationCache(Store(str(tmp_path)), "cache")
    with StubServer() as srv:
        srv.state.fail_after = m  # the server dies after m answers
        first = explainer(srv, cache, concurrency=1, max_retries=1).explain(requests)
        assert [a.status for a in first] == ["ok"] * m + ["error"] * (n - m)
        assert len(cache) == m  # errors are not cached
        before = len(srv.log)
        srv.state.fail_after = None  # the server is back; a new process resumes with the same cache
        second = explainer(srv, ExplanationCache(Store(str(tmp_path)), "cache")).explain(requests)
        resent = [r.key for r in srv.log[before:]]
    assert sorted(resent, key=lambda k: int(k[1:])) == [f"L{i}" for i in range(m, n)]
    assert [a.status for a in second] == ["ok"] * n
    assert second[:m] == first[:m]
    assert len(cache) == n
