"""A scripted OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, no network.

Each request is matched to a *script key*: the first ``[[key]]`` tag found in the request's text
parts (tests put e.g. ``[[L3]]`` in an example's text). Each key has a queue of :class:`Reply`;
one is popped per request and the last one repeats. Requests without a tag, or with an
unscripted tag, get ``default``. ``fail_after`` makes the server answer HTTP 500 to everything
once that many requests have been answered successfully (a server that dies mid-run).

Every request is logged (headers, parsed JSON body, key, reply kind) and the handler counts
requests in flight, so tests can assert what was sent and that the concurrency bound held.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

_TAG = re.compile(r"\[\[(\w+)\]\]")


@dataclass(frozen=True)
class Reply:
    """One scripted response."""

    kind: str = "ok"  # ok | status | malformed | drop
    content: str = "Concept: red circles"
    delay: float = 0.0
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    respond: Callable[[Any], str] | None = None
    """kind 'ok' only: compute the content from the parsed request body (overrides ``content``)."""

    @staticmethod
    def dynamic(respond: Callable[[Any], str], delay: float = 0.0) -> "Reply":
        """HTTP 200 whose content is ``respond(body)`` (e.g. a judge that reads the prompt)."""
        return Reply("ok", "", delay, respond=respond)

    @staticmethod
    def ok(content: str = "Concept: red circles", delay: float = 0.0) -> "Reply":
        return Reply("ok", content, delay)

    @staticmethod
    def slow(delay: float, content: str = "Concept: slow circles") -> "Reply":
        return Reply("ok", content, delay)

    @staticmethod
    def http(status: int, retry_after: str | None = None) -> "Reply":
        headers = (("Retry-After", retry_after),) if retry_after is not None else ()
        return Reply("status", "", 0.0, status, headers)

    @staticmethod
    def malformed() -> "Reply":
        """HTTP 200 with a truncated JSON body."""
        return Reply("malformed")

    @staticmethod
    def drop() -> "Reply":
        """Close the connection without any response."""
        return Reply("drop")


@dataclass
class LoggedRequest:
    path: str
    headers: dict[str, str]
    body: Any
    key: str | None
    reply: str


@dataclass
class StubState:
    script: dict[str, list[Reply]] = field(default_factory=dict)
    default: Reply = field(default_factory=Reply.ok)
    fail_after: int | None = None
    successes: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    log: list[LoggedRequest] = field(default_factory=list)
    served: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def request_text(body: Any) -> str:
    """All text parts of a chat-completions body, joined."""
    texts: list[str] = []
    messages = body.get("messages", []) if isinstance(body, dict) else []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "\n".join(texts)


def request_images(body: Any) -> list[str]:
    """The image URLs of a chat-completions body, in order."""
    urls: list[str] = []
    for msg in body.get("messages", []):
        if isinstance(msg.get("content"), list):
            urls.extend(p["image_url"]["url"] for p in msg["content"] if p.get("type") == "image_url")
    return urls


def _key_of(body: Any) -> str | None:
    m = _TAG.search(request_text(body))
    return m.group(1) if m else None


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        st = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        key = _key_of(body)
        with st.lock:
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            if st.fail_after is not None and st.successes >= st.fail_after:
                reply = Reply.http(500)
            elif key is not None and key in st.script:
                queue = st.script[key]
                reply = queue.pop(0) if len(queue) > 1 else queue[0]
            else:
                reply = st.default
            st.log.append(LoggedRequest(self.path, dict(self.headers.items()), body, key, reply.kind))
        try:
            self._respond(reply, body, key)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): fine
        finally:
            with st.lock:
                st.in_flight -= 1

    def _respond(self, reply: Reply, body: Any, key: str | None) -> None:
        st = self.server.state
        if reply.delay:
            time.sleep(reply.delay)
        if self.path.rstrip("/") != "/v1/chat/completions" or body is None:
            self._send(404 if body is not None else 400, b'{"error": {"message": "bad request"}}')
            return
        if reply.kind == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if reply.kind == "status":
            self._send(reply.status, json.dumps({"error": {"message": f"scripted {reply.status}"}}).encode(),
                       reply.headers)
            return
        if reply.kind == "malformed":
            self._send(200, b'{"choices": [{"message": {"content": "Concept: tru')
            return
        payload = {
            "id": "stub", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant",
                                     "content": reply.respond(body) if reply.respond else reply.content}}],
        }
        self._send(200, json.dumps(payload).encode())
        with st.lock:
            st.successes += 1
            st.served[key] += 1

    def _send(self, status: int, data: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: StubState


class StubServer:
    """Context manager: ``with StubServer(script) as srv: ... srv.base_url ...``."""

    def __init__(self, script: dict[str, list[Reply]] | None = None, default: Reply | None = None) -> None:
        self.state = StubState(script={k: list(v) for k, v in (script or {}).items()},
                               default=default or Reply.ok())
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def log(self) -> list[LoggedRequest]:
        with self.state.lock:
            return list(self.state.log)

    def keys_sent(self) -> list[str | None]:
        """Script keys of every request received, in arrival order (retries included)."""
        return [r.key for r in self.log]

    def served(self) -> Counter:
        """Successful answers (HTTP 200, valid body) per key."""
        with self.state.lock:
            return Counter(self.state.served)

    def __enter__(self) -> "StubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
