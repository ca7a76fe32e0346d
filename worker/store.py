"""What the worker writes to Redis: scores (raw little-endian float32, TTL), the result summary (JSON,
TTL), base losses (raw bytes of the job's dtype, TTL, keyed by `artifact_id`: model, dataset, shard, dtype
and engine version), and the job-end event that wakes the API's long polls (app/events.py)."""

from __future__ import annotations

import json

import numpy as np
from redis import Redis

from contract.jobs import artifact_id
from contract.settings import Settings


class Store:
    def __init__(self, redis: Redis, settings: Settings):
        self.redis, self.settings = redis, settings

    def put_result(self, key: str, scores: np.ndarray, result: dict) -> None:
        ttl = self.settings.score_ttl_s
        with self.redis.pipeline() as pipe:  # scores first: a visible result always has its scores
            pipe.set(self.settings.key("scores", key), scores.astype("<f4").tobytes(), ex=ttl)
            pipe.set(
                self.settings.key("result", key),
                json.dumps({**result, "shape": list(scores.shape)}, allow_nan=False),
                ex=ttl,
            )
            pipe.publish(self.settings.key("events"), key)
            pipe.execute()

    def ended(self, key: str) -> None:
        """Wake the long polls waiting on job `key` (after RQ has stored how it ended)."""
        self.redis.publish(self.settings.key("events"), key)

    def _base_key(self, model_digest: str, dataset_digest: str, shard: int, dtype: str) -> str:
        return self.settings.key("base", artifact_id("base", model_digest, dataset_digest, shard, dtype))

    def get_base(self, model_digest: str, dataset_digest: str, shard: int, dtype: str) -> bytes | None:
        return self.redis.get(self._base_key(model_digest, dataset_digest, shard, dtype))

    def put_base(self, model_digest: str, dataset_digest: str, shard: int, dtype: str, raw: bytes) -> None:
        self.redis.set(
            self._base_key(model_digest, dataset_digest, shard, dtype), raw, ex=self.settings.base_loss_ttl_s
        )
