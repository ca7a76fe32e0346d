"""What the worker writes outside its own memory: score blocks (Redis or a shared directory, by size:
contract/scores.py), the result summary (JSON, TTL), base losses (raw bytes of the job's dtype, keyed by
`artifact_id`: model, dataset, shard, dtype and engine version), curvature estimates (safetensors bytes,
Redis or the directory, by size), a fan-out's per-part progress, and the job-end event that wakes the API's
long polls (app/events.py). Nothing here is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from redis import Redis
from redis.exceptions import LockError, RedisError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from contract.cost import WEIGHT, cost_key, method_id
from contract.indexes import IndexEntry, index_dir
from contract.jobs import ModelRef, artifact_id
from contract.method import Method
from contract.results import PartProgress, Stored, channel, result_key
from contract.scores import Block, blob_key, blob_path, block_key, block_path, place
from contract.settings import Settings


def write_aside(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file next to `path`, then rename it there: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with open(partial, "wb") as f:
        write(f)
    partial.replace(path)


def claim(path: Path) -> bool:
    """Whether `path` exists, marking it in use when it does (its mtime: Store.free_indexes frees only the
    files older than their index's deletion, so a build that reuses one keeps it)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


class Store:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings

    # -- scores and results ------------------------------------------------------------------------
    def put_block(self, key: str, lo: int, scores: np.ndarray) -> Block:
        """Columns [lo, lo + width) of result `key`: in Redis when small, else an .npy file."""
        data = np.ascontiguousarray(scores, dtype="<f4")
        block = Block(lo=lo, hi=lo + data.shape[1], at=place(self.settings, data.nbytes))
        if block.at == "redis":
            self.redis.set(block_key(self.settings, key, lo), data.tobytes(), ex=self.settings.score_ttl_s)
        else:
            write_aside(block_path(self.settings, key, lo), lambda f: np.save(f, data, allow_pickle=False))
        return block

    def get_block(self, key: str, block: Block, rows: int) -> np.ndarray:
        """(rows, hi - lo) float32 scores of one block (the reduce job of an analysis reads them all)."""
        if block.at == "redis":
            raw = self.redis.get(block_key(self.settings, key, block.lo))
            if raw is None:
                raise LookupError(f"score block {block.lo} of {key} expired before the reduce")
            return np.frombuffer(raw, dtype="<f4").reshape(rows, block.hi - block.lo)
        return np.load(block_path(self.settings, key, block.lo), mmap_mode="r", allow_pickle=False)

    def put_result(self, key: str, result: Stored) -> None:
        """The result summary (its blocks written before): visible at once with all its scores. Refused
        where it holds a NaN or an infinity (JSON has neither: it would be read back as null)."""
        ttl = self.settings.score_ttl_s
        with self.redis.pipeline() as pipe:
            pipe.set(
                result_key(self.settings, key), json.dumps(result.model_dump(mode="json"), allow_nan=False), ex=ttl
            )
            pipe.publish(channel(self.settings), key)
            pipe.execute()

    def ended(self, key: str) -> None:
        """Wake the long polls waiting on job `key` (after RQ has stored how it ended)."""
        self.redis.publish(channel(self.settings), key)

    def progress(self, key: str, part: int, done: int, total: int | None, eta_s: float | None) -> None:
        """One part's progress in the fan-out's hash (the API sums the parts)."""
        name = PartProgress.key(self.settings, key)
        value = PartProgress(done=done, total=total, eta_s=eta_s).model_dump_json()
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(name, str(part), value).expire(name, self.settings.job_record_ttl_s).execute()

    def measured(self, model: ModelRef, dtype: str, method: Method, seconds: float, units: int) -> None:
        """A sweep of `method` took `seconds` for `units` record-rows: into its moving average (contract/cost.py),
        which prices the next requests on this model at the door."""
        if units <= 0 or seconds <= 0:
            return
        name, field = cost_key(self.settings, model, dtype), method_id(method)
        rate, old = seconds / units, self.redis.hget(name, field)
        if old is not None:
            rate = (1 - WEIGHT) * float(old) + WEIGHT * rate
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(name, field, repr(rate)).expire(name, self.settings.score_ttl_s).execute()

    def sweep_files(self) -> int:
        """Remove score files whose result is gone (expired, deleted, or never finished) and that are older
        than a job's time limit (so a running fan-out's blocks stay); curvature files past their TTL."""
        root, removed = self.settings.score_dir, 0
        if not root.is_dir():
            return 0
        now = time.time()
        for entry in root.iterdir():
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            if entry.name == "indexes":  # kept until their index is deleted (app/indexes.py): free_indexes
                continue
            if entry.name == "blobs":
                for blob in entry.iterdir():
                    if now - blob.stat().st_mtime > self.settings.base_loss_ttl_s:
                        blob.unlink(missing_ok=True)
                        removed += 1
            elif age > self.settings.job_timeout_s and not self.redis.exists(result_key(self.settings, entry.name)):
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed + self.free_indexes()

    def free_indexes(self) -> int:
        """Remove the files of deleted indexes (the API only forgets them: its mount of the score directory is
        read-only): in each basis a deleted index used, the shard files no remaining index of that basis names,
        and the folder where none remains; files written after the deletion (a rebuild) are kept."""
        orphans, removed = IndexEntry.orphans(self.settings), 0
        for raw, deleted in self.redis.zrange(orphans, 0, -1, withscores=True):
            basis = raw.decode()
            kept = {s.sha256[:32] for e in self.indexes() if e.basis == basis for s in e.shards}
            folder = index_dir(self.settings, basis)
            for path in folder.iterdir() if folder.is_dir() else ():
                stem = path.name.split(".")[0]  # a shard's sha256 (its sketches, its inputs), or the basis' own
                needed = bool(kept) if stem in ("basis", "inputs") else stem in kept
                if needed:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < deleted:
                        path.unlink()
                        removed += 1
            with contextlib.suppress(OSError):  # empty: no index of this basis remains
                folder.rmdir()
            self.redis.zrem(orphans, raw)
        return removed

    # -- the index catalog (contract/indexes.py) ---------------------------------------------------
    def put_index(self, entry: IndexEntry) -> None:
        """A finished index's catalog entry: kept until the index is deleted (no TTL)."""
        with self.redis.pipeline() as pipe:
            pipe.set(IndexEntry.key(self.settings, entry.id), entry.model_dump_json())
            pipe.sadd(IndexEntry.catalog(self.settings), entry.id)
            pipe.publish(channel(self.settings), entry.id)
            pipe.execute()

    def index(self, id: str) -> IndexEntry | None:
        raw = self.redis.get(IndexEntry.key(self.settings, id))
        return None if raw is None else IndexEntry.model_validate_json(raw)

    def indexes(self) -> list[IndexEntry]:
        ids = [i.decode() for i in self.redis.smembers(IndexEntry.catalog(self.settings))]
        raws = self.redis.mget([IndexEntry.key(self.settings, i) for i in ids]) if ids else []
        return [IndexEntry.model_validate_json(raw) for raw in raws if raw is not None]

    # -- artifacts computed once across the fleet ---------------------------------------------------
    def _base_key(self, model_digest: str, dataset_digest: str, shard: int, dtype: str) -> str:
        return self.settings.key("base", artifact_id("base", model_digest, dataset_digest, shard, dtype))

    def get_base(self, model_digest: str, dataset_digest: str, shard: int, dtype: str) -> bytes | None:
        return self.redis.get(self._base_key(model_digest, dataset_digest, shard, dtype))

    def put_base(self, model_digest: str, dataset_digest: str, shard: int, dtype: str, raw: bytes) -> None:
        self.redis.set(
            self._base_key(model_digest, dataset_digest, shard, dtype), raw, ex=self.settings.base_loss_ttl_s
        )

    def get_blob(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """A stored artifact (arrays and string metadata), from Redis or the directory."""
        raw = self.redis.get(blob_key(self.settings, name))
        if raw is None:
            path = blob_path(self.settings, name)
            if not path.is_file():
                return None
            raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + length]).get("__metadata__", {})
        return load_safetensors(raw), meta

    def has_blob(self, name: str) -> bool:
        return bool(self.redis.exists(blob_key(self.settings, name))) or blob_path(self.settings, name).is_file()

    def put_blob(self, name: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
        # C order first: safetensors writes an array's memory as it lies, so a column-major one (a Cholesky
        # factor from torch) would come back transposed
        raw = save_safetensors({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
        if place(self.settings, len(raw)) == "redis":
            self.redis.set(blob_key(self.settings, name), raw, ex=self.settings.base_loss_ttl_s)
            return
        write_aside(blob_path(self.settings, name), lambda f: f.write(raw))

    def once(self, name: str, compute: Callable[[], None], done: Callable[[], bool]) -> None:
        """Run `compute` on one worker of the fleet at a time until `done()`: a worker that finds another
        computing the same artifact waits for it. The lock (redis-py's; not thread-local, since a second
        thread renews it) lives heartbeat_ttl_s and its holder renews it every third of that, so a holder
        that dies frees it about when its job is found abandoned."""
        ttl = self.settings.heartbeat_ttl_s
        lock = self.redis.lock(self.settings.key("lock", name), timeout=ttl, sleep=0.1, thread_local=False)
        with lock:
            if done():
                return
            computing = threading.Event()

            def renew():
                while not computing.wait(ttl / 3):
                    try:
                        lock.extend(ttl, replace_ttl=True)
                    except (LockError, RedisError):  # lost: the job is abandoned or Redis is away; RQ decides
                        return

            threading.Thread(target=renew, daemon=True, name="lock-renewal").start()
            try:
                compute()
            finally:
                computing.set()
