"""Datasets in LLaVA's conversation format (LLaVA-Instruct, LLaVA-NeXT-Data, the shapes world).

A record is ``{"id", "image": "relative/path.jpg", "conversations": [{"from", "value"}, ...]}``;
the first human→gpt turn pair is the sample's question and answer. Files are ``.json`` (one
list, loaded whole) or ``.jsonl`` (streamed line by line, so a bad line only skips itself).
Paths may be local or fsspec URLs; image paths must stay inside the image root (``image_root``,
default the file's folder), see :func:`msae.data.samples.image_policy`.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs

from msae.data.samples import DatasetError, Record, RecordImage, Skip, Source, fraction_count

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant"})
IMAGE_MARKER = "<image>"
SUFFIXES = (".json", ".jsonl")


def first_qa(conversations: object) -> tuple[str, str]:
    """(question, answer) of the first human→gpt turn pair, ``<image>`` markers removed.

    Raises ValueError saying what is wrong, for the skip log.
    """
    if isinstance(conversations, dict):  # a datasets Sequence(dict) column: a dict of lists
        conversations = [dict(zip(conversations, turn)) for turn in zip(*conversations.values())]
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("no conversations")

    def role(turn: object) -> str | None:
        r = turn.get("from") if isinstance(turn, dict) else None
        return r.lower() if isinstance(r, str) else None

    for turn, reply in zip(conversations, conversations[1:], strict=False):
        if role(turn) in HUMAN_ROLES and role(reply) in ASSISTANT_ROLES:
            question, answer = turn.get("value"), reply.get("value")
            if not isinstance(question, str) or not isinstance(answer, str):
                raise ValueError("a turn's value is not a string")
            return question.replace(IMAGE_MARKER, "").strip(), answer.strip()
    raise ValueError("no human→gpt turn pair in conversations")


def parse_record(obj: object, where: str, image: Callable[[object], RecordImage]) -> Record | Skip:
    """One raw record -> :class:`Record`, or a malformed_record :class:`Skip` naming ``where``.

    ``image`` maps the record's image field to ``Record.image`` (raising ValueError if unusable).
    """
    if not isinstance(obj, dict):
        return Skip("malformed_record", f"{where}: record is a {type(obj).__name__}, not an object")
    raw_id = obj.get("id")
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or str(raw_id) == "":
        return Skip("malformed_record", f"{where}: missing or invalid id {raw_id!r}")
    sample_id = str(raw_id)
    try:
        question, answer = first_qa(obj.get("conversations"))
        return Record(sample_id, image(obj.get("image")), question, answer)
    except ValueError as err:
        return Skip("malformed_record", f"{where}: {err}", sample_id)


def _is_local(ref: str) -> bool:
    return "://" not in ref or ref.startswith("file://")


def _find_file(path: str) -> tuple[AbstractFileSystem, str, str]:
    """The .json/.jsonl file itself, or the only one directly inside a folder.

    Returns the filesystem, the file's path in it, and a reference to it in the caller's form
    (an absolute local path, or a URL under ``path``).
    """
    fs, p = url_to_fs(path)
    if not fs.exists(p):
        raise DatasetError(f"llava dataset not found: {path}")
    if not fs.isdir(p):
        return fs, p, p if _is_local(path) else path
    candidates = sorted(
        f
        for f in fs.ls(p, detail=False)
        if f.endswith(SUFFIXES) and not posixpath.basename(f).startswith(".") and fs.isfile(f)
    )
    if len(candidates) != 1:
        found = ", ".join(posixpath.basename(c) for c in candidates) or "none"
        raise DatasetError(
            f"llava dataset folder {path} must hold exactly one .json/.jsonl file (found: {found}); "
            "set dataset.path to the file"
        )
    file = candidates[0]
    return fs, file, file if _is_local(path) else f"{path.rstrip('/')}/{posixpath.basename(file)}"


def llava_image_root(path: str, image_root: str | None = None) -> str:
    """The folder a dataset's image paths resolve against and must stay inside: ``image_root``,
    else the folder of the .json/.jsonl file (see :mod:`msae.data.images` for the confinement)."""
    return image_root or posixpath.dirname(_find_file(path)[2])


def _image_resolver(image_root: str) -> Callable[[object], str | None]:
    """Maps a record's image field to an absolute local path, or a URL under a remote root.

    Only joins and normalises: whether the result may be opened (inside the root, an allowed
    scheme) is decided later, for every dataset kind alike, by :func:`msae.data.images.check_image_ref`.
    """
    root = url_to_fs(image_root)[1] if _is_local(image_root) else image_root.rstrip("/")

    def resolve(value: object) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError(f"image must be a path string, got {type(value).__name__}")
        if "://" in value:
            return value
        if _is_local(image_root):
            return posixpath.normpath(posixpath.join(root, value))
        return f"{root}/{posixpath.normpath(value.lstrip('/'))}"

    return resolve


def _jsonl_objects(fs: AbstractFileSystem, file: str) -> Iterator[tuple[str, object]]:
    """(where, parsed object or Skip) per non-blank line; bytes are decoded per line so one bad
    line cannot stop the rest."""
    with fs.open(file, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {line_no}", json.loads(line)
            except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
                detail = f"line {line_no}: invalid JSON ({err})"
                yield f"line {line_no}", Skip("malformed_record", detail)


def _count_jsonl(fs: AbstractFileSystem, file: str) -> int:
    with fs.open(file, "rb") as f:
        return sum(1 for line in f if line.strip())


def _json_objects(fs: AbstractFileSystem, file: str) -> list[object]:
    with fs.open(file, "rb") as f:
        try:
            data = json.load(f)
        except ValueError as err:
            raise DatasetError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{file} must hold a JSON list of records, not a {type(data).__name__}")
    return data


def iter_llava_records(
    path: str, image_root: str | None = None, fraction: float | None = None
) -> Source:
    """Yield ``(record index, Record | Skip)`` for a LLaVA-format file or folder.

    Image paths resolve against ``image_root`` (default: the file's folder). With ``fraction``,
    only the first ``ceil(fraction × records)`` records are read.
    """
    fs, file, ref = _find_file(path)
    resolve = _image_resolver(image_root or posixpath.dirname(ref))  # as llava_image_root
    if file.endswith(".jsonl"):
        objects: Iterator[tuple[str, object]] = _jsonl_objects(fs, file)
        total = _count_jsonl(fs, file) if fraction is not None else None
    else:
        records = _json_objects(fs, file)
        objects = ((f"record {i}", obj) for i, obj in enumerate(records))
        total = len(records)
    stop = fraction_count(fraction, total)
    for index, (where, obj) in enumerate(objects):
        if stop is not None and index >= stop:
            break
        yield index, obj if isinstance(obj, Skip) else parse_record(obj, where, resolve)
