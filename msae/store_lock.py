"""One writer per stage output: an exclusive lock, held while a stage computes, that names its holder.

Two processes extracting into one store at once used to trample each other (one deleted the
``_progress`` parts the other was reading). :func:`stage_lock` takes an OS file lock
(``filelock``, ``flock`` on Unix) on ``<store>/_locks/<stage>[/<partition>].lock`` with timeout 0:
a second writer fails at once with :class:`StoreLockedError`, naming the holder from the JSON
beside the lock (pid, host, run id, stage, partition, start time) and what to do. The OS releases
the lock when its process dies, even by ``kill -9``, so a crashed run never blocks its resume; a
stale holder JSON is simply overwritten by the next writer.

Granularity: per (stage, partition), because a multiprocess Dagster run may legitimately write
``sae[1|256]`` and ``sae[1|512]`` side by side; except for the stages in :data:`WHOLE_STAGE`,
whose partitions share files. Readers take no lock (a stage's inputs are verified by checksum,
:mod:`msae.integrity`).

Non-local stores (``s3://``, ``memory://``, …) have no OS lock: a warning is logged once per
store and the stage runs unlocked — keep to one writer per store location there.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from filelock import FileLock, Timeout

from msae.store import Store

log = logging.getLogger(__name__)

LOCK_DIR = "_locks"
WHOLE_STAGE = {
    "activations": "every layer is extracted in one pass, into one tokens.parquet and one _progress/",
}
"""Stages locked as a whole, whatever the partition, with the reason."""


class StoreLockedError(RuntimeError):
    """Another writer holds the lock of the stage output this one was about to write."""


def lock_name(stage: str, partition: str | None = None) -> str:
    """The lock's store path; partitions of :data:`WHOLE_STAGE` stages share one."""
    if partition is None or stage in WHOLE_STAGE:
        return f"{LOCK_DIR}/{stage}.lock"
    return f"{LOCK_DIR}/{stage}/{partition}.lock"


def holder_name(stage: str, partition: str | None = None) -> str:
    return lock_name(stage, partition).removesuffix(".lock") + ".holder.json"


def read_holder(store: Store, stage: str, partition: str | None = None) -> dict[str, Any] | None:
    """The holder record beside the lock, or None (absent, or unreadable)."""
    try:
        return store.read_json(holder_name(stage, partition))
    except Exception:  # noqa: BLE001 - a missing or half-written record only makes the message vaguer
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (its holder record is missing)"
    parts = [f"pid {holder.get('pid')} on host {holder.get('host')}"]
    if holder.get("run_id"):
        parts.append(f"Dagster run {holder['run_id']}")
    parts.append(f"since {holder.get('started')}")
    return ", ".join(parts)


_warned_remote: set[str] = set()


@contextmanager
def stage_lock(store: Store, stage: str, partition: str | None = None, run_id: str | None = None) -> Iterator[None]:
    """Hold the exclusive write lock of ``stage``/``partition`` in ``store`` for the block.

    Raises :class:`StoreLockedError` at once when another writer holds it (see module doc)."""
    if not store.is_local:
        if store.root not in _warned_remote:
            _warned_remote.add(store.root)
            log.warning("store %s is not a local folder: no OS lock is possible, so stages write unlocked; "
                        "make sure only one run writes to it at a time", store.root)
        yield
        return
    where = stage if partition is None else f"{stage}[{partition}]"
    path = store.path(lock_name(stage, partition))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path, timeout=0, fallback_to_soft=False)  # a soft lock would outlive a killed process
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = read_holder(store, stage, partition)
        scope = f"all of {stage} ({WHOLE_STAGE[stage]})" if stage in WHOLE_STAGE else where
        raise StoreLockedError(
            f"{where}: another writer is computing {scope} in store {store.root}: {_describe(holder)} "
            f"holds {path}. Wait for it to finish (a re-run then reuses its output), or stop that process; "
            "the lock is released when it exits, even if killed. Two runs must not write the same stage "
            "output at once.") from None
    except (NotImplementedError, OSError) as err:  # a filesystem without flock (some network mounts)
        log.warning("%s: cannot lock %s (%s): writing unlocked; make sure only one run writes this stage", where,
                    path, err)
        locked = False
    else:
        locked = True
    if not locked:
        yield
        return
    try:
        store.write_json({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "stage": stage,
                          "partition": partition, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                          "lock": path}, holder_name(stage, partition))
        yield
    finally:
        try:
            store.rm(holder_name(stage, partition))
        finally:
            lock.release()
