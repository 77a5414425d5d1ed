"""A persistent cache of explainer answers, so a crash or restart never pays for an answer twice.

Layout: one small JSON file per answer::

    <folder>/<explainer slug>/<kind>-<prompting>/<prompt_version>/latent=<L>.json

Why one file per answer (not append-only segments): every answer is written atomically on a
local store (temp file + rename, see :meth:`Store.write_bytes`) and in one PUT on object stores,
so a crash can at worst lose the answer being written, never corrupt others, and no append
support (which S3/GCS lack) is needed. A file that is nevertheless unreadable is treated as a
miss and overwritten by the next answer.

Key: (latent, kind, prompting, explainer name, prompt_version) picks the file. The file also
stores a digest of the request's examples (sample ids, texts, image bytes, peak tokens, patch
activations); :meth:`get` returns the answer only if the digest matches, so answers computed for
different top examples (new data, another ranking) are never reused. Generation settings
(temperature, max_tokens) are deliberately not part of the key: they rarely change and answers
are expensive. Use a different ``folder`` to force fresh answers.

Errors are never stored (nor returned, should a file hold one): a restart retries them, and the
`concepts` stage records a partition with failed requests as incomplete so that a rerun happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict

from msae.explain.base import ExplainAnswer, ExplainRequest
from msae.store import Store

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def examples_digest(request: ExplainRequest) -> str:
    """Hash of everything in a request's examples that an explainer could see."""
    h = hashlib.sha256()
    for ex in request.examples:
        for piece in (ex.sample_id, ex.text, ex.peak_token or ""):
            b = piece.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        img = ex.image_png or b""
        h.update(len(img).to_bytes(8, "little") + img)
        if ex.patch_activations is not None:
            arr = ex.patch_activations
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes(order="C"))
        h.update(b"|")
    return h.hexdigest()[:16]


def _slug(name: str) -> str:
    """A file-system-safe, collision-free folder name for an explainer name (may contain '/' or ':')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:60] or "explainer"
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class ExplanationCache:
    """Answers stored under ``folder`` of ``store``; safe to share between threads of one process."""

    def __init__(self, store: Store, folder: str) -> None:
        self.store = store
        self.folder = folder.strip("/")
        self._lock = threading.Lock()
        self._listings: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return f"ExplanationCache({self.store.url(self.folder)!r})"

    def _dir(self, explainer: str, kind: str, prompting: str, version: str) -> str:
        return f"{self.folder}/{_slug(explainer)}/{kind}-{prompting}/{version}"

    def _listing(self, directory: str) -> set[str]:
        """File names in one cache folder, listed once (one LIST instead of a HEAD per latent)."""
        with self._lock:
            if directory not in self._listings:
                try:
                    names = self.store.fs.ls(self.store.path(directory), detail=False)
                except (FileNotFoundError, NotADirectoryError):
                    names = []
                self._listings[directory] = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in names}
            return self._listings[directory]

    def refresh(self) -> None:
        """Forget folder listings (to see answers another process wrote since)."""
        with self._lock:
            self._listings.clear()

    def get(self, request: ExplainRequest, explainer_name: str, version: str) -> ExplainAnswer | None:
        """The stored answer for this request, or None (missing, unreadable or for other examples)."""
        directory = self._dir(explainer_name, request.kind, request.prompting, version)
        name = f"latent={request.latent}.json"
        if name not in self._listing(directory):
            return None
        try:
            data = self.store.read_json(directory, name)
            if data.get("examples") != examples_digest(request):
                return None
            answer = ExplainAnswer(**data["answer"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as err:  # truncated/corrupt file: a miss
            log.warning("explanation cache: ignoring unreadable %s/%s (%s)", directory, name, type(err).__name__)
            return None
        if (answer.latent, answer.kind, answer.prompting) != (request.latent, request.kind, request.prompting):
            return None
        if answer.status == "error":  # never written by put; a stored failure must not become final
            return None
        return answer

    def put(self, answer: ExplainAnswer, request: ExplainRequest) -> None:
        """Store one answer (errors are skipped). ``request`` supplies the examples digest."""
        if answer.status == "error":
            return
        if (answer.latent, answer.kind, answer.prompting) != (request.latent, request.kind, request.prompting):
            raise ValueError("answer and request disagree on latent/kind/prompting")
        directory = self._dir(answer.explainer, answer.kind, answer.prompting, answer.prompt_version)
        name = f"latent={answer.latent}.json"
        payload = {"format": CACHE_FORMAT, "examples": examples_digest(request), "answer": asdict(answer)}
        data = json.dumps(payload, indent=1, sort_keys=True).encode()
        with self._lock:  # Store.write_bytes uses a fixed temp name per target
            self.store.write_bytes(data, directory, name)
            if directory in self._listings:
                self._listings[directory].add(name)

    def __len__(self) -> int:
        """Answers stored under the folder (all explainers and versions)."""
        root = self.store.path(self.folder)
        try:
            files = self.store.fs.find(root)
        except FileNotFoundError:
            return 0
        return sum(1 for f in files if str(f).endswith(".json"))


def split_cached(cache: ExplanationCache | None, requests: Sequence[ExplainRequest], explainer_name: str,
                 version: Callable[[str, str], str]) -> tuple[list[ExplainAnswer | None], list[int]]:
    """(answers with the cached ones filled in, indices of the requests still to ask)."""
    answers: list[ExplainAnswer | None] = [None] * len(requests)
    todo: list[int] = []
    for i, request in enumerate(requests):
        hit = cache.get(request, explainer_name, version(request.kind, request.prompting)) if cache else None
        if hit is not None:
            answers[i] = hit
        else:
            todo.append(i)
    return answers, todo
