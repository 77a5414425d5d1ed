"""The OpenAI backend against hostile loopback servers: redirects (the key must not follow), trickling
answers (timeout_s is a deadline) and huge bodies (max_response_bytes caps the read)."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import ValidationError

from msae.config import ExplainerConfig
from msae.explain.base import ExplainExample, ExplainRequest
from msae.explain.openai_backend import OpenAIExplainer

KEY_ENV = "MSAE_TEST_EXPLAINER_KEY"
SECRET = "sk-test-secret-456"
BIG = 50 * 1024 * 1024
CHUNK = 64 * 1024
DEFAULT_CAP = 1_048_576


def req(latent: int = 0) -> ExplainRequest:
    return ExplainRequest(latent, "textual", "masked", (ExplainExample("s0", None, "Question: what? Answer: a shape"),))


def explainer(base_url: str, **kw: Any) -> OpenAIExplainer:
    settings = dict(backend="openai", model="stub-vlm", base_url=base_url, api_key_env=KEY_ENV, timeout_s=2.0,
                    max_retries=2, backoff_s=0.01, concurrency=2)
    settings.update(kw)
    return OpenAIExplainer(ExplainerConfig(**settings), None)


def chat_body(content: str = "Concept: red circles") -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}).encode()


# --- servers ------------------------------------------------------------------------------------------------
class _Recorder(BaseHTTPRequestHandler):
    """Any method: log it (method, path, headers) and answer what the server's ``answer`` says."""

    server: "RecordingServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with self.server.lock:
            self.server.log.append((self.command, self.path, dict(self.headers.items())))
        status, headers, body = self.server.answer
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _handle


class RecordingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, status: int = 200, headers: tuple[tuple[str, str], ...] = (),
                 body: bytes = b"") -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.answer = (status, headers, body)
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "RecordingServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class RawServer:
    """A loopback TCP server whose ``behave(server, conn)`` writes raw bytes after each request is read
    (one thread per connection); it counts requests and bytes sent and records how each connection ended."""

    def __init__(self, behave: Callable[["RawServer", socket.socket], None]) -> None:
        self.behave = behave
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.stop = threading.Event()
        self.requests = 0
        self.sent = 0
        self.ended: list[str] = []
        self.lock = threading.Lock()
        self._handlers: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        with self.lock:
            self.sent += len(data)

    def handlers_done(self, timeout: float) -> bool:
        """Whether every connection's handler has returned (the server stopped sending) within timeout."""
        end = time.monotonic() + timeout
        for t in list(self._handlers):
            t.join(timeout=max(0.0, end - time.monotonic()))
        return not any(t.is_alive() for t in self._handlers)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            handler = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._handlers.append(handler)
            handler.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)  # never block the test on a client that stopped reading
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CHUNK)  # little kernel buffering
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    more = conn.recv(65536)
                    if not more:
                        raise ConnectionResetError("client left before its request was complete")
                    data += more
                head, body = data.split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                with self.lock:
                    self.requests += 1
                self.behave(self, conn)
                ended = "stopped" if self.stop.is_set() else "done"
            except OSError as err:  # the client closed the connection: what these tests want
                ended = type(err).__name__
            with self.lock:
                self.ended.append(ended)

    def __enter__(self) -> "RawServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(timeout=10)
        self.sock.close()
        assert self.handlers_done(10) and not self._thread.is_alive(), "the test server did not stop"


def call_bounded(ex: OpenAIExplainer, bound_s: float, stop: threading.Event) -> tuple[list, float, bool]:
    """Run ``ex.explain([req()])`` in a thread; (answers, seconds taken, whether it ended within bound_s).
    A client that overruns is released by setting ``stop`` (its server then hangs up), so a failing test
    still ends."""
    out: list = []
    t0 = time.monotonic()
    worker = threading.Thread(target=lambda: out.extend(ex.explain([req()])), daemon=True)
    worker.start()
    worker.join(timeout=bound_s)
    in_time = not worker.is_alive()
    elapsed = time.monotonic() - t0
    if not in_time:
        stop.set()
        worker.join(timeout=30)
    return out, elapsed, in_time


# --- 5: redirects ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirect_is_not_followed_and_the_key_stays_home(status: int, monkeypatch, caplog) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with RecordingServer(body=chat_body("Concept: from the redirect target")) as target:
        location = f"{target.origin}/v1/chat/completions?token=abc"
        with RecordingServer(status, (("Location", location),), b"moved") as first:
            with caplog.at_level(logging.DEBUG):
                ex = explainer(first.origin + "/v1", max_retries=3)
                (answer,) = ex.explain([req()])
            first_log, target_log = list(first.log), list(target.log)
    assert target_log == [], "the redirect target got a request"
    assert [(m, h.get("Authorization")) for m, _, h in first_log] == [("POST", f"Bearer {SECRET}")]  # not retried
    assert answer.status == "error" and answer.concept is None
    assert f"HTTP {status}" in answer.raw and target.origin in answer.raw
    assert "token=abc" not in answer.raw  # only the origin is named
    assert ex.stats["error"] == 1 and ex.stats.get("retried", 0) == 0
    assert SECRET not in answer.raw and SECRET not in caplog.text


def test_proxies_from_the_environment_are_not_used(monkeypatch) -> None:
    """An HTTP_PROXY would see the key of an http:// server in clear: the client ignores it."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with RecordingServer(body=chat_body("Concept: via the proxy")) as proxy, \
            RecordingServer(body=chat_body("Concept: direct")) as server:
        for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(name, proxy.origin)
        (answer,) = explainer(server.origin + "/v1").explain([req()])
        assert proxy.log == [] and len(server.log) == 1
    assert answer.concept == "direct"


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="explainer.base_url must start with http:// or https://"):
        explainer("ftp://127.0.0.1/v1")


# --- 6: timeout_s is a deadline ---------------------------------------------------------------------------------
def trickle_body(srv: RawServer, conn: socket.socket) -> None:
    """Headers at once, then one byte of a never-ending body every 0.5 s."""
    srv.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    while not srv.stop.is_set():
        srv.send(conn, b" ")
        time.sleep(0.5)


def trickle_headers(srv: RawServer, conn: socket.socket) -> None:
    """A status line, then one byte of a never-ending header every 0.3 s."""
    srv.send(conn, b"HTTP/1.1 200 OK\r\nX-Slow: ")
    while not srv.stop.is_set():
        srv.send(conn, b"a")
        time.sleep(0.3)


@pytest.mark.parametrize("behave", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_trickling_server_is_cut_off_at_the_deadline(behave, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    timeout = 1.5
    with RawServer(behave) as srv:
        answers, elapsed, in_time = call_bounded(explainer(srv.base_url, timeout_s=timeout, max_retries=0),
                                                 5 * timeout, srv.stop)
        assert in_time, f"a {timeout}s deadline did not end the request within {5 * timeout}s"
        assert srv.handlers_done(5), "the server is still sending: the client did not hang up"
        assert srv.ended and srv.ended[0] != "stopped"
    assert elapsed >= timeout * 0.9  # it did wait for the answer, up to the deadline
    (answer,) = answers
    assert answer.status == "error" and "deadline" in answer.raw and "timeout" in answer.raw
    assert SECRET not in answer.raw
    assert srv.requests == 1


def test_deadline_attempts_are_retried_each_with_a_new_deadline() -> None:
    timeout = 0.6
    with RawServer(trickle_body) as srv:
        answers, elapsed, in_time = call_bounded(explainer(srv.base_url, timeout_s=timeout, max_retries=1),
                                                 10 * timeout, srv.stop)
        assert in_time
    assert answers[0].status == "error" and "deadline" in answers[0].raw
    assert srv.requests == 2 and elapsed >= 2 * timeout * 0.9


# --- 12: bounded response bodies -------------------------------------------------------------------------------
def huge_with_length(srv: RawServer, conn: socket.socket) -> None:
    """Advertises and streams 50 MB (spaces: valid JSON whitespace)."""
    srv.send(conn, f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n".encode())
    for _ in range(BIG // CHUNK):
        if srv.stop.is_set():
            return
        srv.send(conn, b" " * CHUNK)


def huge_chunked(srv: RawServer, conn: socket.socket) -> None:
    """Streams 50 MB with chunked transfer encoding: no length up front."""
    srv.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(BIG // CHUNK):
        if srv.stop.is_set():
            return
        srv.send(conn, f"{CHUNK:x}\r\n".encode() + b" " * CHUNK + b"\r\n")
    srv.send(conn, b"0\r\n\r\n")


def huge_until_close(srv: RawServer, conn: socket.socket) -> None:
    """Streams 50 MB with neither a length nor chunking (the body ends when the connection closes)."""
    srv.send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    for _ in range(BIG // CHUNK):
        if srv.stop.is_set():
            return
        srv.send(conn, b" " * CHUNK)


@pytest.mark.parametrize("behave", [huge_with_length, huge_chunked, huge_until_close],
                         ids=["content-length", "chunked", "until-close"])
def test_huge_body_is_refused_not_read(behave) -> None:
    with RawServer(behave) as srv:
        answers, _, in_time = call_bounded(explainer(srv.base_url, timeout_s=30, max_retries=2), 30, srv.stop)
        assert in_time
        assert srv.handlers_done(10), "the server is still sending: the client did not hang up"
        assert srv.ended and srv.ended[0] not in ("done", "stopped")  # the client broke the connection off
    (answer,) = answers
    assert answer.status == "error" and f"response body over {DEFAULT_CAP} bytes" in answer.raw
    assert srv.requests == 1  # not retried: the same server would send it again
    # what the server got out before the connection broke: at most the cap, one read and the kernel buffers,
    # not the 50 MB
    assert srv.sent < 4 * DEFAULT_CAP, f"the server sent {srv.sent} bytes"


def test_the_cap_is_configurable_and_a_small_answer_passes() -> None:
    content = "Concept: " + "x" * 20
    body = chat_body(content)
    with RecordingServer(body=body) as srv:
        ok = explainer(srv.origin + "/v1", max_response_bytes=len(body)).explain([req()])[0]
        refused = explainer(srv.origin + "/v1", max_response_bytes=len(body) - 1).explain([req()])[0]
        sent = len(srv.log)
    assert (ok.status, ok.concept) == ("ok", "x" * 20)  # read in full: the cap is inclusive
    assert refused.status == "error" and refused.raw.startswith(f"response body over {len(body) - 1} bytes")
    assert sent == 2


def test_max_response_bytes_config() -> None:
    assert ExplainerConfig().max_response_bytes == DEFAULT_CAP
    for bad in (0, -1):
        with pytest.raises(ValidationError, match="max_response_bytes"):
            ExplainerConfig(max_response_bytes=bad)
