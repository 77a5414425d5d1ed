"""Explainer backend for any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp, OpenAI).

Why the standard library (urllib + threads) rather than an HTTP client package: one POST per
prompt, a bounded thread pool and simple retries are all this needs, and it adds no dependency.

Robustness: requests already in the cache are never sent; each answer is cached as soon as it
arrives (a crash loses at most the requests in flight); timeouts, connection errors, HTTP 429
and 5xx, and unreadable response bodies are retried with exponential back-off; any other 4xx
fails at once. A request that still fails yields an answer with status 'error' (never cached,
so a restart retries it) and never an exception that loses the others.

The API key is read from the environment at each request and used only in the Authorization
header: it is not stored on the object, logged, or included in any error text.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from msae.config import ExplainerConfig
from msae.explain.base import ConceptKind, ExplainAnswer, ExplainRequest, Prompting
from msae.explain.cache import ExplanationCache, split_cached
from msae.explain.parse import parse_concept
from msae.explain.prompts import build_messages, load_templates

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_RETRY_AFTER_S = 60.0


class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection, 429, 5xx, bad body)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure another attempt cannot fix (4xx other than 429)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _content(body: object) -> str:
    """The assistant's text from a chat-completions body; raises ValueError if it has none."""
    try:
        content = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise ValueError("no choices[0].message.content") from None
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str):
        raise ValueError("content is not text")
    return content


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(float(value), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


class OpenAIExplainer:
    """Proposes concepts by sending each request to ``{base_url}/chat/completions``."""

    def __init__(self, cfg: ExplainerConfig, cache: ExplanationCache | None = None) -> None:
        if not cfg.model:
            raise ValueError("explainer.model is required for the openai backend")
        self.cfg = cfg
        self.cache = cache
        self.name = f"openai:{cfg.model}"
        self.url = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        self.templates = load_templates(cfg.prompt_dir)
        self.stats: dict[str, int] = {}
        self._stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIExplainer(name={self.name!r}, url={self.url!r})"

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        return self.templates[(kind, prompting)].version

    # --- one request ----------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def _post(self, payload: bytes) -> str:
        """One HTTP attempt; returns the answer text or raises _Retryable / _Fatal."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            code = err.code
            retry_after = _retry_after(err.headers)
            err.close()
            if code == 429 or code >= 500:
                raise _Retryable(f"HTTP {code}", retry_after) from None
            raise _Fatal(f"HTTP {code}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"timeout after {self.cfg.timeout_s:g}s") from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timeout after {self.cfg.timeout_s:g}s") from None
            raise _Retryable(f"connection error ({type(err.reason).__name__})") from None
        except (ConnectionError, OSError) as err:  # reset/closed mid-response, RemoteDisconnected
            raise _Retryable(f"connection error ({type(err).__name__})") from None
        try:
            return _content(json.loads(raw))
        except ValueError as err:  # includes JSONDecodeError and UnicodeDecodeError
            raise _Retryable(f"malformed response body ({err.__class__.__name__})") from None

    def complete(self, messages: list[dict], label: str = "request", *, temperature: float | None = None,
                 max_tokens: int | None = None) -> tuple[str | None, str]:
        """Send one chat with the retry policy: (answer text, "") or (None, reason with the key masked)."""
        payload = json.dumps({
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature if temperature is None else temperature,
            "max_tokens": self.cfg.max_tokens if max_tokens is None else max_tokens,
        }).encode()
        self._count("sent")
        reason = "not attempted"
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self._count("retried")
            try:
                return self._post(payload), ""
            except _Fatal as err:
                reason = err.reason
                break
            except _Retryable as err:
                reason = err.reason
                if attempt < self.cfg.max_retries:
                    delay = self.cfg.backoff_s * (2 ** attempt)
                    if err.retry_after is not None:
                        delay = max(delay, err.retry_after)
                    log.debug("%s: %s; retrying in %.2fs", label, reason, delay)
                    time.sleep(delay * (1 + 0.1 * random.random()))  # jitter: do not retry in lock-step
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            reason = reason.replace(key, "***")
        self._count("error")
        log.warning("%s failed: %s", label, reason)
        return None, reason[:200]

    def _explain_one(self, request: ExplainRequest) -> ExplainAnswer:
        version = self.version(request.kind, request.prompting)
        label = f"latent {request.latent} ({request.kind}/{request.prompting})"
        raw, reason = self.complete(build_messages(request, self.templates), label)
        if raw is None:
            return ExplainAnswer(request.latent, request.kind, request.prompting, None, reason, "error",
                                 self.name, version)
        concept, status = parse_concept(raw, request.kind, self.cfg.max_concept_chars)
        answer = ExplainAnswer(request.latent, request.kind, request.prompting, concept, raw, status,
                               self.name, version)
        self._count(status)
        if self.cache is not None:
            try:
                self.cache.put(answer, request)
            except Exception as err:  # a cache write failure must not lose the answer in hand
                log.warning("explanation cache write failed for latent %d: %s", request.latent, err)
        return answer

    def _safe_one(self, request: ExplainRequest) -> ExplainAnswer:
        try:
            return self._explain_one(request)
        except Exception as err:  # a bug in one request must not lose the others' work
            self._count("error")
            log.exception("latent %d: unexpected failure", request.latent)
            return ExplainAnswer(request.latent, request.kind, request.prompting, None,
                                 f"internal error ({type(err).__name__})", "error", self.name,
                                 self.version(request.kind, request.prompting))

    # --- the protocol -----------------------------------------------------------------------------
    def explain(self, requests: Sequence[ExplainRequest]) -> list[ExplainAnswer]:
        """One answer per request, in order; cached ones are not sent, the rest run concurrently."""
        self.stats = {}
        answers, todo = split_cached(self.cache, requests, self.name, self.version)
        self._count("cached", len(requests) - len(todo))
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo)),
                                    thread_name_prefix="msae-explain") as pool:
                for i, answer in zip(todo, pool.map(self._safe_one, [requests[i] for i in todo])):
                    answers[i] = answer
        s = self.stats
        log.info("%s: %d requests - sent %d, cached %d, retried %d, errors %d (ok %d, no_concept %d, "
                 "too_long %d, unparsed %d)", self.name, len(requests), s.get("sent", 0), s.get("cached", 0),
                 s.get("retried", 0), s.get("error", 0), s.get("ok", 0), s.get("no_concept", 0),
                 s.get("too_long", 0), s.get("unparsed", 0))
        return [a for a in answers if a is not None]
