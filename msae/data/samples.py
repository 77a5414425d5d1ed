"""The validated VQA sample table (the ``vqa_samples`` asset) and how it is built.

Loaders (:mod:`msae.data.llava`, :mod:`msae.data.hf`) yield raw :class:`Record` s or
:class:`Skip` s; :func:`build_samples` checks each record once here (text, duplicate id, image
lies inside the dataset's image root and decodes fully within the size limits, see
:func:`image_policy`) so every later stage can trust the table. Bad samples are skipped and counted by
reason rather than failing the run: real datasets always have a few broken images.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import polars as pl
from PIL import Image
from tqdm.auto import tqdm

from msae.config import DatasetConfig
from msae.data.images import (
    BadImage,
    ImageLimits,
    ImagePolicy,
    ImageReason,
    check_pixels,
    decode_image,
    open_dataset_image,
    save_png,
)
from msae.store import Store

logger = logging.getLogger("msae.data")

SkipReason = Literal[
    ImageReason,  # every way an image can fail (msae.data.images), then the record's own
    "no_image",
    "empty_question",
    "empty_answer",
    "malformed_record",
    "duplicate_id",
]
SKIP_REASONS: tuple[str, ...] = get_args(SkipReason)

SAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "sample_id": pl.Utf8(),
    "image": pl.Utf8(),
    "question": pl.Utf8(),
    "answer": pl.Utf8(),
    "source_index": pl.Int64(),
}


class DatasetError(ValueError):
    """The dataset cannot be used at all (not found, unparseable, or no sample survived)."""


@dataclass(frozen=True)
class VQASample:
    """One validated sample; ``image`` is a local absolute path, an fsspec URL inside the dataset's
    image root or the store, or an http(s) URL (``allow_image_urls``), checked when the table was built."""

    sample_id: str
    image: str | None
    question: str
    answer: str


RecordImage = str | bytes | Image.Image | None


@dataclass(frozen=True)
class Record:
    """A sample as a loader found it, not yet validated.

    ``image`` is a path/URL (llava), encoded bytes or a decoded PIL image (hf), or None.
    """

    sample_id: str
    image: RecordImage
    question: str
    answer: str


@dataclass(frozen=True)
class Skip:
    """A source record a loader could not turn into a :class:`Record`."""

    reason: SkipReason
    detail: str
    sample_id: str | None = None


SourceItem = tuple[int, Record | Skip]
Source = Generator[SourceItem, None, None]


@dataclass
class SkipLog:
    """Counts skipped samples by reason and keeps the first few as examples for the asset's metadata."""

    dataset: str
    max_examples: int = 20
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, sample_id: str, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.counts[reason] += 1
        level = logging.WARNING if self.total <= self.max_examples else logging.DEBUG
        logger.log(level, "%s: skipping sample %s (%s): %s", self.dataset, sample_id, reason, detail)
        if len(self.examples) < self.max_examples:
            self.examples.append({"sample_id": sample_id, "reason": reason, "detail": detail})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


@dataclass(frozen=True)
class SamplesResult:
    """The sample table plus what was read and skipped to build it."""

    table: pl.DataFrame
    n_seen: int
    skips: dict[str, int]
    examples: list[dict[str, str]]


def fraction_count(fraction: float | None, total: int | None) -> int | None:
    """How many leading records ``fraction`` keeps: ceil(fraction × total), ignoring float noise
    (0.07 × 100 is 7.000000000000001 in floats, which must give 7, not 8); at least one record."""
    if fraction is None or total is None:
        return None
    return min(total, max(1, math.ceil(round(fraction * total, 6))))


def describe(cfg: DatasetConfig) -> str:
    """A short name of the dataset for logs and error messages."""
    if cfg.kind == "llava":
        return f"llava dataset {cfg.path}"
    if cfg.kind == "hf":
        subset = f" ({cfg.subset})" if cfg.subset else ""
        return f"hf dataset {cfg.name}{subset} split {cfg.split}"
    return f"shapes world (seed {cfg.shapes.seed if cfg.shapes else None})"


def _shapes_records(cfg: DatasetConfig, store: Store) -> Source:
    """Generate the synthetic world under ``<store>/world`` and read it as a LLaVA dataset."""
    from msae.data.llava import iter_llava_records
    from msae.world.shapes import generate_world

    assert cfg.shapes is not None  # DatasetConfig fills it in for kind "shapes"
    if store.is_local:
        generate_world(cfg.shapes, store.path("world"))
    else:  # the generator writes plain files: draw locally, then upload
        with tempfile.TemporaryDirectory() as tmp:
            generate_world(cfg.shapes, tmp)
            store.fs.put(tmp + "/", store.path("world"), recursive=True)
    return iter_llava_records(store.url("world", "conversations.json"), fraction=cfg.fraction)


def _records(cfg: DatasetConfig, store: Store) -> Source:
    # Loaders are imported here: they import this module's record types, and hf pulls in `datasets`.
    if cfg.kind == "llava":
        from msae.data.llava import iter_llava_records

        assert cfg.path is not None
        return iter_llava_records(cfg.path, cfg.image_root, fraction=cfg.fraction)
    if cfg.kind == "hf":
        from msae.data.hf import iter_hf_records

        assert cfg.name is not None
        return iter_hf_records(
            cfg.name, cfg.subset, split=cfg.split, revision=cfg.revision, fraction=cfg.fraction
        )
    return _shapes_records(cfg, store)


def _text_problem(rec: Record, kept_ids: set[str]) -> tuple[str, str] | None:
    """The cheap checks, done before touching the image."""
    if rec.image is None:
        return "no_image", "record has no image"
    if not rec.question.strip():
        return "empty_question", "question is empty"
    if not rec.answer.strip():
        return "empty_answer", "answer is empty"
    if rec.sample_id in kept_ids:
        return "duplicate_id", f"id {rec.sample_id!r} already used by an earlier sample"
    return None


def image_policy(cfg: DatasetConfig, store: Store) -> ImagePolicy:
    """Where this dataset's image references may point (see ``DatasetConfig.allowed_image_roots``).

    The dataset's own image root: llava, ``image_root`` or the JSON file's folder; hf,
    ``image_root`` or the dataset folder when ``name`` is a local folder (hub datasets have none:
    their images arrive as bytes); shapes, the world folder in the store.
    """
    if cfg.kind == "llava":
        from msae.data.llava import llava_image_root

        assert cfg.path is not None
        root: str | None = llava_image_root(cfg.path, cfg.image_root)
    elif cfg.kind == "hf":
        assert cfg.name is not None
        root = cfg.image_root or (cfg.name if Path(cfg.name).is_dir() else None)
    else:
        root = store.url("world")
    return ImagePolicy.build(root, cfg.allowed_image_roots, cfg.allow_image_urls, ImageLimits.from_config(cfg))


def _materialise(rec: Record, store: Store, policy: ImagePolicy) -> str:
    """Check the image may be read and decodes fully; in-memory images are written to the store as PNG.

    Returns the path/URL the extractor will open. Raises :class:`BadImage`.
    """
    label = f"image of {rec.sample_id}"
    if isinstance(rec.image, str):
        ref, _ = open_dataset_image(rec.image, policy)  # decoded for validation only, then dropped
        return ref
    if isinstance(rec.image, bytes):
        return save_png(decode_image(rec.image, label, policy.limits), rec.sample_id, store)
    assert isinstance(rec.image, Image.Image)
    check_pixels(rec.image, label, policy.limits)
    return save_png(rec.image, rec.sample_id, store)


def _no_samples_message(name: str, n_seen: int, skips: SkipLog) -> str:
    if n_seen == 0:
        return f"{name}: no records found (check the path/split, and fraction)"
    counts = ", ".join(f"{r}={n}" for r, n in skips.as_dict().items())
    first = "; ".join(f"{e['sample_id']}: {e['reason']} ({e['detail']})" for e in skips.examples[:3])
    return f"{name}: none of the {n_seen} records is usable; skipped: {counts}. First: {first}"


def build_samples(cfg: DatasetConfig, store: Store) -> SamplesResult:
    """Read the configured dataset, validate every sample and return the kept ones.

    ``fraction`` cuts the source's records first (before any skipping); ``limit`` then caps the
    number of kept samples. Only hf images are written (under ``<store>/images``).
    """
    name = describe(cfg)
    skips = SkipLog(name)
    columns: dict[str, list] = {c: [] for c in SAMPLES_SCHEMA}
    kept_ids: set[str] = set()
    n_seen = 0
    with contextlib.closing(_records(cfg, store)) as records:  # closes files when `limit` stops early
        policy = image_policy(cfg, store)
        for index, item in tqdm(records, desc=f"samples of {name}", unit=" rec", disable=None):
            n_seen += 1
            if isinstance(item, Skip):
                skips.add(item.sample_id or f"record {index}", item.reason, item.detail)
                continue
            problem = _text_problem(item, kept_ids)
            if problem is not None:
                skips.add(item.sample_id, *problem)
                continue
            try:
                image = _materialise(item, store, policy)
            except BadImage as err:
                skips.add(item.sample_id, err.reason, err.detail)
                continue
            kept_ids.add(item.sample_id)
            for col, value in zip(
                SAMPLES_SCHEMA, (item.sample_id, image, item.question, item.answer, index), strict=True
            ):
                columns[col].append(value)
            if cfg.limit is not None and len(kept_ids) >= cfg.limit:
                break
    if not kept_ids:
        raise DatasetError(_no_samples_message(name, n_seen, skips))
    logger.info("%s: kept %d of %d records; skipped %s", name, len(kept_ids), n_seen, skips.as_dict())
    return SamplesResult(
        table=pl.DataFrame(columns, schema=SAMPLES_SCHEMA),
        n_seen=n_seen,
        skips=skips.as_dict(),
        examples=list(skips.examples),
    )


def write_samples(result: SamplesResult, store: Store) -> None:
    """Write the sample table to ``<store>/samples.parquet``."""
    store.write_parquet(result.table, store.SAMPLES)


def sample_image_ids(samples: pl.DataFrame) -> dict[str, str]:
    """sample id → image id (the image file's stem: how the shapes world's annotations name images)."""
    from pathlib import PurePath

    return {str(s): PurePath(i).stem for s, i in zip(samples["sample_id"], samples["image"]) if i}


def read_samples(store: Store) -> pl.DataFrame:
    """Read back what :func:`write_samples` wrote, checking it has the expected columns."""
    df = store.read_parquet(store.SAMPLES)
    missing = [c for c in SAMPLES_SCHEMA if c not in df.columns]
    if missing:
        raise DatasetError(f"{store.url(store.SAMPLES)} lacks columns {missing}; rebuild vqa_samples")
    return df.select(list(SAMPLES_SCHEMA)).cast(SAMPLES_SCHEMA)


def iter_samples(df: pl.DataFrame) -> Iterator[VQASample]:
    """The rows of a sample table as :class:`VQASample` s, in order."""
    for row in df.select("sample_id", "image", "question", "answer").iter_rows(named=True):
        yield VQASample(**row)
