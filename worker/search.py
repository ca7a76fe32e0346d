"""FAISS over records' sketches (worker/forward_inf/sketch.py): one index per shard, the sketches stored as
float16 codes and compared by inner product, searched at both ends of the ranking (proponents: the
largest inner products; opponents: the largest with the negated query). A shard of at most FLAT_RECORDS
records is searched exactly; a larger one through an inverted file of IVF_LIST records per list, NPROBE
lists probed (bench.index measures both). FAISS writes its own binary format, never pickle.
"""

from __future__ import annotations

import faiss
import numpy as np

FLAT_RECORDS = 1 << 20  # exact search up to this many records per shard (bench.index: latency per shard size)
IVF_LIST = 4096  # records per inverted list, on average
NPROBE = 16  # inverted lists probed per query
TRAIN_PER_LIST = 64  # k-means sample: this many records per list


def threads(n: int) -> None:
    """FAISS' OpenMP threads (ATTR_TORCH_THREADS sets both: FAISS's default, every core, oversubscribes a host
    of several workers)."""
    faiss.omp_set_num_threads(n)


def make(vectors: np.ndarray) -> faiss.Index:
    """The index of (n, D) float32 sketches, in their order (ids 0..n-1)."""
    n, dims = vectors.shape
    fp16, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    if n <= FLAT_RECORDS:
        index = faiss.IndexScalarQuantizer(dims, fp16, ip)
    else:
        lists = n // IVF_LIST
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dims), dims, lists, fp16, ip)
        sample = np.random.default_rng(0).choice(n, min(n, lists * TRAIN_PER_LIST), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        index.nprobe = NPROBE
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def kind(index: faiss.Index) -> str:
    return "ivf" if isinstance(index, faiss.IndexIVF) else "flat"


def dump(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def load(raw: bytes) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = NPROBE
    return index


class Shards:
    """A training set's shard indexes, each with the global index of its first record."""

    def __init__(self, parts: list[tuple[int, faiss.Index]]):
        self.parts = parts
        self.nbytes = sum(index.sa_code_size() * index.ntotal for _, index in parts)

    def search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """((k, m) the records with the largest inner products with each query, (k, m) the smallest), as
        global indices, best first (fewer where the set is smaller)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self._best(queries, m), self._best(-queries, m)

    def _best(self, queries: np.ndarray, m: int) -> np.ndarray:
        values, ids = [], []
        for lo, index in self.parts:
            found, at = index.search(queries, min(m, index.ntotal))
            values.append(np.where(at >= 0, found, -np.inf))
            ids.append(np.where(at >= 0, at + lo, -1))
        values, ids = np.concatenate(values, axis=1), np.concatenate(ids, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")[:, :m]
        return np.take_along_axis(ids, order, axis=1)
