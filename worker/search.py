"""FAISS over records' sketches (worker/forward_inf/sketch.py): one index per shard, compared by inner product
and searched at both ends of the ranking (proponents: the largest inner products; opponents: the largest
with the negated query). A shard of at most FLAT_RECORDS records is searched exactly over float16 codes
(2 bytes a dimension); a larger one by 4-bit product-quantization codes of two dimensions each (a quarter
of a byte a dimension), scanned with SIMD. The candidates are re-scored exactly by the mirrored step
anyway, so the codes only have to rank the true top-10 within the candidates. Measured on 10^6 sketches
of 256 dimensions, 1,000 candidates (bench.index; docs/benchmarks.md, "Index"): the true top-10 found
0.955 / 0.98 (both ends) against the exact search's 0.97 / 0.99, 1.4 ms per query instead of 18.5, 64
bytes a record instead of 512; re-ranking the codes' top 4,000 exactly added nothing measurable; inverted
files (IVF, by inner product or its reduction to L2) kept only 0.1-0.78 at any probe count. FAISS writes
its own binary format, never pickle.
"""

from __future__ import annotations

import faiss
import numpy as np

FLAT_RECORDS = 1 << 16  # exact search up to this many records per shard
PQ_TRAIN = 1 << 16  # records the codebooks are trained on (spread over the shard)


def threads(n: int) -> None:
    """FAISS' OpenMP threads (ATTR_TORCH_THREADS sets both: FAISS's default, every core, oversubscribes a host
    of several workers)."""
    faiss.omp_set_num_threads(n)


def make(vectors: np.ndarray) -> faiss.Index:
    """The index of (n, D) float32 sketches, in their order (ids 0..n-1)."""
    n, dims = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= FLAT_RECORDS:
        index = faiss.IndexScalarQuantizer(dims, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    else:  # two dimensions per 4-bit code
        index = faiss.IndexPQFastScan(dims, dims // 2, 4, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.linspace(0, n - 1, min(n, PQ_TRAIN)).astype(np.int64)])
    index.add(vectors)
    return index


def kind_for(records: int) -> str:
    """How a shard of this many records is searched (make)."""
    return "flat" if records <= FLAT_RECORDS else "pq"


def dump(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def load(raw: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))


class Shards:
    """A training set's shard indexes, each with the global index of its first record."""

    def __init__(self, parts: list[tuple[int, faiss.Index]], nbytes: int):
        self.parts, self.nbytes = parts, nbytes  # nbytes: their size in memory (that of their files)

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
