"""Hugging Face datasets with LLaVA-NeXT-Data's schema (``id``, ``image``, ``conversations``).

Hub ids and local folders go through one function: a folder written by ``save_to_disk`` is
opened with ``load_from_disk``; anything else (hub id, folder of parquet/json files) is streamed
with ``load_dataset``. Images are read undecoded (``Image(decode=False)``) so a corrupt image
becomes a skipped sample instead of an exception that ends the stream. An image given as a path
string (no bytes) resolves against ``image_root``, else the dataset folder, and must stay inside it
or ``allowed_image_roots`` (:func:`msae.data.samples.image_policy`).
"""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict, IterableDataset, load_dataset, load_dataset_builder, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

from msae.data.llava import parse_record
from msae.data.samples import DatasetError, RecordImage, Source, fraction_count

SAVED_MARKERS = ("state.json", "dataset_dict.json")  # written by save_to_disk only


def _is_saved_to_disk(name: str) -> bool:
    folder = Path(name)
    return folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS)


def _num_examples(name: str, subset: str | None, split: str, revision: str | None) -> int:
    splits = load_dataset_builder(name, subset, revision=revision).info.splits or {}
    n = splits[split].num_examples if split in splits else None
    if not n:
        raise DatasetError(
            f"hf dataset {name}: the number of records in split {split!r} is not known, so "
            "dataset.fraction cannot be applied; set dataset.limit instead"
        )
    return n


def open_hf(
    name: str, subset: str | None, split: str, revision: str | None, count: bool
) -> tuple[IterableDataset, int | None]:
    """The split as a stream, plus its number of records when ``count`` (needed for fraction)."""
    if _is_saved_to_disk(name):
        ds = load_from_disk(name)
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DatasetError(f"hf dataset {name} has no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds.to_iterable_dataset(), len(ds)
    stream = load_dataset(name, subset, split=split, streaming=True, revision=revision)
    return stream, _num_examples(name, subset, split, revision) if count else None


def _image_value(value: object) -> RecordImage:
    """Undecoded ``{"bytes", "path"}`` (or already decoded PIL / bytes / path) -> Record.image."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else value.get("path")
    if value is None or isinstance(value, str | bytes | Image.Image):
        return value
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def iter_hf_records(
    name: str,
    subset: str | None = None,
    split: str = "train",
    revision: str | None = None,
    fraction: float | None = None,
) -> Source:
    """Yield ``(row index, Record | Skip)``; with ``fraction``, only the first
    ``ceil(fraction × num_examples)`` rows are read."""
    ds, total = open_hf(name, subset, split, revision, count=fraction is not None)
    if isinstance((ds.features or {}).get("image"), ImageFeature):
        ds = ds.cast_column("image", ImageFeature(decode=False))
    stop = fraction_count(fraction, total)
    for index, row in enumerate(ds):
        if stop is not None and index >= stop:
            break
        yield index, parse_record(row, f"row {index}", _image_value)
