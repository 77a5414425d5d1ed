"""Explainer backend for any OpenAI-compatible chat server (vLLM, SGLang, TGI, llama.cpp, OpenAI).

Why httpx (over urllib): a request carries the API key, so it must go to ``base_url`` and nowhere
else, take no longer than ``timeout_s`` and read no more than ``max_response_bytes``; urllib
follows redirects with the Authorization header (and turns the POST into a GET), resets its
timeout on every byte received and reads whole bodies into memory. With httpx:

- redirects are never followed (``follow_redirects=False``): a 3xx is a failure, not retried,
  whose reason names the status and the Location's origin; no credential goes to another origin,
  and no answer from a redirect target is accepted. Proxies, .netrc and other settings from the
  environment are not used (``trust_env=False``: an ``HTTP_PROXY`` would see the key of an
  ``http://`` server); ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are still honoured for certificates.
- ``timeout_s`` is a deadline per HTTP attempt covering connect, TLS, sending, the headers and
  the whole body: the connection pool runs on an httpcore network backend that clips every
  socket operation to the time left (so a server trickling bytes cannot stretch it), and the
  body is streamed with the deadline checked between chunks.
- the body is streamed and counted: an advertised Content-Length over the cap, or a stream that
  passes it, stops the read at once (not retried: the same server would send it again).

One ``httpx.Client`` per explainer, made on first use with a pool of ``concurrency`` connections;
``explain()`` closes it when done (and it is closed when the explainer is garbage-collected).

Robustness: requests already in the cache are never sent; each answer is cached as soon as it
arrives (a crash loses at most the requests in flight); timeouts, connection errors, HTTP 429
and 5xx, and unreadable response bodies are retried with exponential back-off; any other 4xx,
a redirect and an oversized body fail at once. A request that still fails yields an answer with
status 'error' (never cached, so a restart retries it) and never an exception that loses the
others.

The API key is read from the environment at each request and used only in the Authorization
header: it is not stored on the object, logged, or included in any error text.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpcore
import httpx

from msae.config import ExplainerConfig
from msae.explain.base import ConceptKind, ExplainAnswer, ExplainRequest, Prompting
from msae.explain.cache import ExplanationCache, split_cached
from msae.explain.parse import parse_concept
from msae.explain.prompts import build_messages, load_templates

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_RETRY_AFTER_S = 60.0
WRITE_PIECE = 64 * 1024
"""Request bodies are written in pieces of this size, each under the deadline's time left."""


# --- a deadline on every socket operation ------------------------------------------------------------
_DEADLINE = threading.local()
"""``at``: the monotonic time the calling thread's current HTTP attempt must end by (None: no deadline).
httpx's sync client does all its I/O in the calling thread, so a thread-local reaches it."""


@contextmanager
def _deadline(at: float) -> Iterator[None]:
    _DEADLINE.at = at
    try:
        yield
    finally:
        _DEADLINE.at = None


def _left(timeout: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` clipped to the time left before the thread's deadline; raises ``expired`` past it."""
    at = getattr(_DEADLINE, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose reads, writes and TLS handshake never wait past the deadline (a
    per-operation timeout alone restarts with every byte a trickling server sends)."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for i in range(0, len(buffer), WRITE_PIECE):
            self._inner.write(buffer[i:i + WRITE_PIECE], _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str):
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's blocking socket backend, with every connection a :class:`_DeadlineStream`."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options=None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout), (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout), (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError), (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError), (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError), (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol), (httpcore.ProxyError, httpx.ProxyError),
)
"""httpcore's exceptions and httpx's equivalents, most specific first."""


@contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    """httpcore's exceptions as httpx's (what httpx's own transport does), so callers see one family."""
    try:
        yield
    except Exception as err:
        mapped = next((h for c, h in _HTTPX_ERRORS if isinstance(err, c)), None)
        if mapped is None:
            raise
        raise mapped(str(err), request=request) from err


class _Body(httpx.SyncByteStream):
    def __init__(self, inner, request: httpx.Request) -> None:
        self._inner, self._request = inner, request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors(self._request):
            yield from self._inner

    def close(self) -> None:
        with _as_httpx_errors(self._request):
            self._inner.close()


class _DeadlineTransport(httpx.BaseTransport):
    """httpx's transport contract over an httpcore pool on :class:`_DeadlineBackend` (httpx's own
    transport has no way to choose the network backend)."""

    def __init__(self, connections: int) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=connections,
            max_keepalive_connections=connections, network_backend=_DeadlineBackend())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core = httpcore.Request(
            request.method,
            httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions)
        with _as_httpx_errors(request):
            resp = self._pool.handle_request(core)
        return httpx.Response(resp.status, headers=resp.headers, stream=_Body(resp.stream, request),
                              extensions=resp.extensions)

    def close(self) -> None:
        self._pool.close()


# --- failures ------------------------------------------------------------------------------------------
class _Retryable(Exception):
    """A failure worth another attempt (timeout, connection, 429, 5xx, bad body)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Fatal(Exception):
    """A failure another attempt cannot fix (4xx other than 429, a redirect, an oversized body)."""

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


def _retry_after(headers: httpx.Headers | None) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(float(value), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def _origin(url: httpx.URL) -> str:
    """scheme://host[:port] of a URL: never its user info, path or query (which may hold secrets)."""
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


def _redirect_target(resp: httpx.Response) -> str:
    """The origin a redirect points to, for the error text."""
    location = resp.headers.get("Location")
    if not location:
        return "no Location"
    try:
        return _origin(resp.request.url.join(location))
    except (httpx.InvalidURL, ValueError):
        return "an invalid Location"


class OpenAIExplainer:
    """Proposes concepts by sending each request to ``{base_url}/chat/completions``."""

    def __init__(self, cfg: ExplainerConfig, cache: ExplanationCache | None = None) -> None:
        if not cfg.model:
            raise ValueError("explainer.model is required for the openai backend")
        self.cfg = cfg
        self.cache = cache
        self.name = f"openai:{cfg.model}"
        self.url = (cfg.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        if httpx.URL(self.url).scheme not in ("http", "https"):
            raise ValueError(f"explainer.base_url must start with http:// or https://, got {cfg.base_url!r}")
        self.templates = load_templates(cfg.prompt_dir)
        self.stats: dict[str, int] = {}
        self._stats_lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._http_closer: weakref.finalize | None = None
        self._http_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIExplainer(name={self.name!r}, url={self.url!r})"

    def version(self, kind: ConceptKind, prompting: Prompting) -> str:
        return self.templates[(kind, prompting)].version

    # --- the HTTP client ------------------------------------------------------------------------------
    def _client(self) -> httpx.Client:
        """The shared client, made on first use: ``concurrency`` pooled connections, no redirects, no
        proxies or .netrc from the environment."""
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(
                    transport=_DeadlineTransport(self.cfg.concurrency), follow_redirects=False, trust_env=False,
                    timeout=httpx.Timeout(self.cfg.timeout_s))
                self._http_closer = weakref.finalize(self, self._http.close)
            return self._http

    def close(self) -> None:
        """Close the pooled connections (a later request opens new ones)."""
        with self._http_lock:
            if self._http_closer is not None:
                self._http_closer()
            self._http, self._http_closer = None, None

    # --- one request ----------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def _post(self, payload: bytes) -> str:
        """One HTTP attempt, ended by ``timeout_s`` at the latest; returns the answer text or raises
        _Retryable / _Fatal."""
        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "Accept-Encoding": "identity"}  # the size cap counts what is read: no decompression bombs
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        timeout = self.cfg.timeout_s
        expired = f"timeout: no complete answer within the {timeout:g}s deadline"
        deadline = time.monotonic() + timeout
        try:
            with _deadline(deadline), self._client().stream("POST", self.url, content=payload,
                                                            headers=headers) as resp:
                raw = self._read(resp, deadline, expired)
        except httpx.TimeoutException:
            raise _Retryable(expired) from None
        except httpx.UnsupportedProtocol as err:
            raise _Fatal(f"unsupported URL ({type(err).__name__})") from None
        except httpx.TransportError as err:  # connect, reset/closed mid-response, protocol errors
            raise _Retryable(f"connection error ({type(err).__name__})") from None
        try:
            return _content(json.loads(raw))
        except ValueError as err:  # includes JSONDecodeError and UnicodeDecodeError
            raise _Retryable(f"malformed response body ({err.__class__.__name__})") from None

    def _read(self, resp: httpx.Response, deadline: float, expired: str) -> bytes:
        """The body of a 2xx answer, at most ``max_response_bytes`` and before the deadline."""
        code = resp.status_code
        if 300 <= code < 400:
            raise _Fatal(f"HTTP {code} redirect to {_redirect_target(resp)} not followed (the request and its "
                         "key go to base_url only)")
        if code == 429 or code >= 500:
            raise _Retryable(f"HTTP {code}", _retry_after(resp.headers))
        if code >= 400 or code < 200:
            raise _Fatal(f"HTTP {code}")
        cap = self.cfg.max_response_bytes
        try:
            advertised = int(resp.headers.get("Content-Length", "0"))
        except ValueError:
            advertised = 0
        if advertised > cap:
            raise _Fatal(f"response body over {cap} bytes (Content-Length {advertised})")
        body = bytearray()
        for chunk in resp.iter_raw():
            body += chunk
            if len(body) > cap:
                raise _Fatal(f"response body over {cap} bytes")
            if time.monotonic() > deadline:
                raise _Retryable(expired)
        return bytes(body)

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
            try:
                with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(todo)),
                                        thread_name_prefix="msae-explain") as pool:
                    for i, answer in zip(todo, pool.map(self._safe_one, [requests[i] for i in todo])):
                        answers[i] = answer
            finally:
                self.close()  # no idle connections left open between stages
        s = self.stats
        log.info("%s: %d requests - sent %d, cached %d, retried %d, errors %d (ok %d, no_concept %d, "
                 "too_long %d, unparsed %d)", self.name, len(requests), s.get("sent", 0), s.get("cached", 0),
                 s.get("retried", 0), s.get("error", 0), s.get("ok", 0), s.get("no_concept", 0),
                 s.get("too_long", 0), s.get("unparsed", 0))
        return [a for a in answers if a is not None]
