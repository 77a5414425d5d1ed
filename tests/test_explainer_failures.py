"""Failed explainer requests are not final: `concepts` warns, is not reused, and a rerun re-sends only them.

End to end through Dagster with the OpenAI backend against a loopback server that answers HTTP 400
to the first few requests of a run (a client error: not retried, so each failure is one request).
Requests are told apart at the server by a digest of their messages (the same request always has
the same body), so the test can say exactly which ones a rerun sent.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import polars as pl
import pytest

from msae.config import parse_config
from msae.explain.base import ExplainAnswer, ExplainExample, ExplainRequest
from msae.explain.cache import ExplanationCache, examples_digest
from msae.manifest import current_manifest, load_manifest
from msae.store import Store
from msae_assets.definitions import build_definitions

REQUESTS_OK = "explainer_requests_ok"
PART = "2|16"
STORE_PART = "layer=2/width=16"


class _FlakyState:
    """What the server does and saw: the first ``fail_next`` requests get HTTP 400."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fail_next = 0
        self.log: list[tuple[str, int]] = []  # (request digest, HTTP status)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        digest = hashlib.sha256(json.dumps(body["messages"], sort_keys=True).encode()).hexdigest()[:16]
        st = self.server.state
        with st.lock:
            fail = st.fail_next > 0
            st.fail_next -= int(fail)
            st.log.append((digest, 400 if fail else 200))
        if fail:
            self._send(400, {"error": {"message": "scripted 400"}})
        else:
            self._send(200, {"id": "flaky", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": "Concept: red circles"}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _FlakyState


@pytest.fixture
def flaky_server():
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = _FlakyState()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets}


def _run(defs: dg.Definitions, instance, names: list[str],
         partition: str | None = None) -> dg.ExecuteInProcessResult:
    assets = _assets(defs)
    result = dg.materialize([assets[n] for n in names], instance=instance, resources=defs.resources,
                            partition_key=partition, selection=names)
    assert result.success
    return result


def _meta(result: dg.ExecuteInProcessResult, name: str) -> dict[str, Any]:
    return {k: v.value for k, v in result.asset_materializations_for_node(name)[-1].metadata.items()}


def _check(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == REQUESTS_OK]
    return evaluation


def test_failed_requests_warn_are_not_reused_and_only_they_are_resent(tiny_config_data, flaky_server):
    n_fail = 4
    data = {**tiny_config_data, "layers": [2], "widths": [16],
            "controls": {"random_sae": False, "dissection_oracle": False},
            "explainer": {"backend": "openai", "model": "stub-vlm", "base_url":
                          f"http://127.0.0.1:{flaky_server.server_address[1]}/v1",
                          "max_retries": 0, "timeout_s": 10, "concurrency": 2}}
    cfg = parse_config(data)
    defs = build_definitions(cfg)
    store = Store(cfg.store)
    log = flaky_server.state.log
    with dg.instance_for_test() as instance:
        _run(defs, instance, ["vqa_samples"])
        _run(defs, instance, ["activations"], "2")
        _run(defs, instance, ["sae", "latent_stats"], PART)

        # run 1: the first n_fail requests fail; the asset still materializes, the check warns
        flaky_server.state.fail_next = n_fail
        r1 = _run(defs, instance, ["concepts"], PART)
        meta = _meta(r1, "concepts")
        requests = meta["requests"]
        assert requests > n_fail and len(log) == requests  # one POST per request (a 400 is not retried)
        failed = Counter(d for d, status in log if status == 400)
        assert sum(failed.values()) == n_fail
        assert meta["explainer_failures"] == meta["incomplete"] == meta["errors"] == n_fail
        assert meta["explainer_failure_reasons"] == {"HTTP 400": n_fail}
        check = _check(r1)
        assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
        assert check.metadata["failed"].value == n_fail and check.metadata["requests"].value == requests
        examples = check.metadata["examples"].value
        assert len(examples) == n_fail and all(e.endswith(": HTTP 400") for e in examples)
        proposals = store.read_parquet(f"concepts/{STORE_PART}", "proposals.parquet")
        first_mode = proposals.filter(pl.col("prompting") == cfg.explainer.prompting[0])
        n_error_rows = (proposals["visual_status"] == "error").sum() + (first_mode["textual_status"] == "error").sum()
        assert n_error_rows == n_fail
        assert proposals.filter(pl.col("visual_status") == "error")["visual_concept"].null_count() == \
            (proposals["visual_status"] == "error").sum()
        # the manifest records the run but is not current: the next run computes again
        m = load_manifest(store, "concepts", STORE_PART)
        assert m is not None and m.metadata["incomplete"] == n_fail
        assert current_manifest(store, "concepts", m.fingerprint, STORE_PART) is None
        # errors are never cached: only the answered requests are
        cache = ExplanationCache(store, f"concepts/{STORE_PART}/_cache")
        assert len(cache) == requests - n_fail

        # readers of the proposals treat error rows as missing concepts and do not crash
        _run(defs, instance, ["concept_scores"], PART)
        scored = store.read_parquet(f"concepts/{STORE_PART}", "concepts.parquet")
        assert scored.height == proposals.height
        assert scored["visual_concept"].null_count() >= (proposals["visual_status"] == "error").sum()
        _run(defs, instance, ["report"])

        # run 2: the server answers; exactly the failed requests are sent again, the check passes
        before = len(log)
        r2 = _run(defs, instance, ["concepts"], PART)
        assert Counter(d for d, _ in log[before:]) == failed
        assert all(status == 200 for _, status in log[before:])
        meta2 = _meta(r2, "concepts")
        assert meta2["reused"] is False and meta2["explainer_failures"] == meta2["incomplete"] == 0
        assert meta2["requests"] == requests
        assert _check(r2).passed
        proposals2 = store.read_parquet(f"concepts/{STORE_PART}", "proposals.parquet")
        assert "error" not in set(proposals2["visual_status"]) | set(proposals2["textual_status"])
        assert len(cache) == requests

        # run 3: complete, so reused; nothing is sent and the check still passes
        before = len(log)
        r3 = _run(defs, instance, ["concepts"], PART)
        assert len(log) == before
        meta3 = _meta(r3, "concepts")
        assert meta3["reused"] is True and meta3["explainer_failures"] == 0
        assert _check(r3).passed


def _request(latent: int, kind: str = "visual", prompting: str = "masked") -> ExplainRequest:
    example = ExplainExample(f"s{latent}", None, "a text")
    return ExplainRequest(latent, kind, prompting, (example,))  # type: ignore[arg-type]


def _answer(latent: int, status: str, raw: str, kind: str = "visual") -> ExplainAnswer:
    concept = None if status == "error" else "x"
    return ExplainAnswer(latent, kind, "masked", concept, raw, status, "openai:m", "v1")  # type: ignore[arg-type]


def test_failure_summary_counts_errors_and_unanswered_requests():
    from msae.explain.stage import failure_summary

    requests = [_request(i) for i in range(4)] + [_request(0, "textual")]
    answers = [_answer(0, "ok", "Concept: x"), _answer(1, "error", "HTTP 400"),
               _answer(2, "error", "timeout after 5s"),
               _answer(3, "no_concept", "No visual concept")]  # latent 0's textual one never came back
    s = failure_summary(requests, answers)
    assert s["explainer_failures"] == s["incomplete"] == 3
    assert s["explainer_failure_reasons"] == {"HTTP 400": 1, "no answer": 1, "timeout after 5s": 1}
    assert s["explainer_failure_examples"] == ["latent 0 textual/masked: no answer",
                                               "latent 1 visual/masked: HTTP 400",
                                               "latent 2 visual/masked: timeout after 5s"]
    clean = failure_summary(requests[:1], answers[:1])
    assert clean["explainer_failures"] == clean["incomplete"] == 0


def test_error_answers_are_never_cached(tmp_path):
    cache = ExplanationCache(Store(str(tmp_path)), "cache")
    cache.put(_answer(1, "error", "HTTP 400"), _request(1))
    cache.put(_answer(2, "ok", "Concept: x"), _request(2))
    assert len(cache) == 1
    assert cache.get(_request(1), "openai:m", "v1") is None and cache.get(_request(2), "openai:m", "v1") is not None
    # a file that nevertheless holds an error (another tool, older code) is a miss, not a final answer
    (path,) = tmp_path.rglob("latent=2.json")
    data = json.loads(path.read_text())
    data["answer"] |= {"status": "error", "concept": None}
    path.write_text(json.dumps(data))
    assert data["examples"] == examples_digest(_request(2))
    assert ExplanationCache(Store(str(tmp_path)), "cache").get(_request(2), "openai:m", "v1") is None


def test_check_passes_only_without_failures():
    from msae_assets.concepts import REQUESTS_OK as name, concepts_checks

    assert name == REQUESTS_OK
    (ok,) = concepts_checks({"requests": 10, "explainer_failures": 0})
    (warn,) = concepts_checks({"requests": 10, "explainer_failures": 2, "explainer_failure_reasons": {"HTTP 400": 2}})
    assert ok.passed and not warn.passed and warn.severity == dg.AssetCheckSeverity.WARN
    assert warn.metadata["failed"].value == 2
