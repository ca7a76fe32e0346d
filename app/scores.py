"""Windows of a finished result's (rows, N) score matrix, read from the score store (contract/scores.py)
without loading the matrix: Redis blocks by byte range (GETRANGE), file blocks as memory maps. What /scores
pages and streams, and what the report's histograms sample. A two-stage result's matrix has a column per
candidate it re-scored (`records`: their training records), not one per record of the set."""

from __future__ import annotations

import numpy as np
from redis import asyncio as aioredis
from starlette.concurrency import run_in_threadpool

from contract.problems import Conflict
from contract.results import Stored
from contract.scores import Block, block_key, block_path
from contract.settings import Settings

F4 = np.dtype("<f4")


class Scores:
    def __init__(self, aredis: aioredis.Redis, settings: Settings, key: str, result: Stored):
        self.aredis, self.settings, self.key = aredis, settings, key
        self.blocks: list[Block] = result.blocks
        self.rows, self.columns = result.shape
        self.records = result.columns  # two-stage: the candidates' records, in order
        if self.records is not None:
            self.columns = len(self.records)

    async def window(self, r0: int, r1: int, c0: int, c1: int, step: int = 1) -> np.ndarray:
        """(r1 - r0, len(range(c0, c1, step))) float32 scores: rows r0..r1-1, every step-th column of c0..c1-1."""
        wanted = np.arange(c0, c1, step)
        out = np.empty((r1 - r0, len(wanted)), F4)
        for b in self.blocks:
            inside = np.flatnonzero((wanted >= b.lo) & (wanted < b.hi))
            if not len(inside):
                continue
            local = wanted[inside] - b.lo  # columns of this block, ascending
            if b.at == "file":
                part = await run_in_threadpool(self._file, b, r0, r1, local)
            else:
                part = await self._redis(b, r0, r1, local)
            out[:, inside] = part
        return out

    def _file(self, b: Block, r0: int, r1: int, local: np.ndarray) -> np.ndarray:
        try:
            block = np.load(block_path(self.settings, self.key, b.lo), mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise Conflict("the result's score files were removed; submit the request again") from None
        span = block[r0:r1, local[0] : local[-1] + 1]
        return np.array(span[:, local - local[0]])

    async def _redis(self, b: Block, r0: int, r1: int, local: np.ndarray) -> np.ndarray:
        """The rows' spans from the first to the last wanted column, one GETRANGE each (one for all rows
        when the span is the block's full width), then the wanted columns of them."""
        name, width = block_key(self.settings, self.key, b.lo), b.hi - b.lo
        first, last = int(local[0]), int(local[-1]) + 1
        if (first, last) == (0, width):
            raw = [await self.aredis.getrange(name, r0 * width * 4, r1 * width * 4 - 1)]
        else:
            async with self.aredis.pipeline(transaction=False) as pipe:
                for r in range(r0, r1):
                    pipe.getrange(name, (r * width + first) * 4, (r * width + last) * 4 - 1)
                raw = await pipe.execute()
        data = b"".join(raw)
        if len(data) != (r1 - r0) * (last - first) * 4:
            raise Conflict("the result's scores expired; submit the request again")
        return np.frombuffer(data, F4).reshape(r1 - r0, last - first)[:, local - first]
