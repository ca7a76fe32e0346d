"""The worker's warm state: models, training-set shards and base losses, in an LRU under a byte budget.

Everything a job's dtype changes is kept per dtype (each job carries its own: contract/jobs.py). Base
losses are looked up warm, then in Redis (so a restarted worker does not recompute them), and only then
computed. Counters say what was loaded or computed; the worker publishes them in its heartbeat (tests
and /metrics read them).
"""

from __future__ import annotations

import importlib
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from contract.jobs import artifact_id
from contract.registry import DatasetManifest, ModelManifest, RegistryError, verify

from .forward_inf import AttributionInputError, ForwardInf, MirrorConfig, Task, build, make_task
from .forward_inf.curvature import Curvature
from .store import Store


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, torch.nn.Module):
        return sum(nbytes(t) for t in (*value.parameters(), *value.buffers()))
    if isinstance(value, str):
        return len(value) + 49  # CPython's str header
    if isinstance(value, Curvature):
        return nbytes(value.raw) + nbytes(value.factor)
    if isinstance(value, ForwardInf):
        return nbytes(value.model)  # its scratch copy of the model, once made
    if isinstance(value, dict | tuple | list):
        return sum(nbytes(v) for v in (value.values() if isinstance(value, dict) else value))
    return 0


class Warm:
    def __init__(self, store: Store, budget_bytes: int, device: torch.device):
        self.store, self.budget, self.device = store, budget_bytes, device
        self.items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.counters: Counter[str] = Counter()

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.items.values())

    def _get(self, key: tuple, load: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            self.counters["warm_hits"] += 1
            return self.items[key][0]
        value = load()
        size = nbytes(value)
        self.items[key] = (value, size)
        while self.bytes > self.budget and len(self.items) > 1:  # evict least recently used, keep the newest
            self.items.popitem(last=False)
            self.counters["evictions"] += 1
        return value

    # -- models --------------------------------------------------------------------------------------
    def model(self, m: ModelManifest, dtype: str) -> tuple[torch.nn.Module, Task]:
        return self._get(("model", m.digest, dtype), lambda: self._load_model(m, getattr(torch, dtype)))

    def _load_model(self, m: ModelManifest, dtype: torch.dtype) -> tuple[torch.nn.Module, Task]:
        self.counters["model_loads"] += 1
        if m.architecture.startswith("builtin:"):
            model = build(m.architecture, m.params)
        else:  # python:package.module:factory, operator code named in the operator's manifest
            _, module, factory = m.architecture.split(":")
            model = getattr(importlib.import_module(module), factory)(**m.params)
        state = load_file(verify(m.path / m.weights, m.sha256))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RegistryError(f"model {m.id!r}: weights do not fit the architecture: {exc}") from exc
        return model.to(self.device, dtype).eval(), make_task(m.task, **m.task_params)

    def engine(self, m: ModelManifest, d: DatasetManifest, config: MirrorConfig) -> ForwardInf:
        """A ForwardInf per (model, training set, settings), kept warm: its measured stacking choice, its
        scratch copy of the model and its curvature estimate carry over to the next job."""

        def make():
            model, task = self.model(m, config.dtype or "float32")
            return ForwardInf(model, task, config)

        return self._get(("engine", m.digest, d.digest, config), make)

    def curvature(self, m: ModelManifest, d: DatasetManifest, fi: ForwardInf, estimate: Callable[[], Curvature]):
        """The damped curvature for this model, training set and what it depends on (perturbed
        parameters, kind, damping, samples, dtype): one estimate serves every preset that uses it."""
        c, params = fi.config, list(fi.fm.theta)  # as resolved by fi.plan()
        key = (
            "curvature",
            artifact_id(m.digest, d.digest, fi.precondition, *params, c.damping, c.curvature_samples, c.dtype),
        )

        def load():
            self.counters["curvature_estimates"] += 1
            return estimate()

        return self._get(key, load)

    # -- data ----------------------------------------------------------------------------------------
    def shard(self, d: DatasetManifest, n: int) -> dict[str, torch.Tensor]:
        return self._get(("shard", d.digest, n), lambda: self._load_shard(d, n))

    def _load_shard(self, d: DatasetManifest, n: int) -> dict[str, torch.Tensor]:
        self.counters["shard_loads"] += 1
        arrays = d.load_shard(n)
        return {k: torch.tensor(v, device=self.device) for k, v in arrays.items()}  # copies: arrays may be read-only

    def record_ids(self, d: DatasetManifest) -> list[str]:
        return self._get(("records", d.digest), d.record_ids)

    def examples(self, d: DatasetManifest, indices: list[int]) -> dict[str, torch.Tensor]:
        """Records of a dataset by global index (for test points given by reference)."""
        bounds = d.bounds
        parts: dict[str, list[torch.Tensor]] = {}
        for i in indices:
            if not 0 <= i < bounds[-1]:
                raise AttributionInputError(f"record index {i} is out of range for {d.id!r}")
            n = int(np.searchsorted(bounds, i, side="right") - 1)
            for k, v in self.shard(d, n).items():
                parts.setdefault(k, []).append(v[i - bounds[n]])
        return {k: torch.stack(v) for k, v in parts.items()}

    # -- base losses ---------------------------------------------------------------------------------
    def norms(self, m: ModelManifest, d: DatasetManifest, n: int, dtype: str, compute: Callable[[], torch.Tensor]):
        """Shard n's last-layer gradient norms (score="cosine"): computed once, kept warm."""
        return self._get(("norms", m.digest, d.digest, n, dtype), compute)

    def base(
        self, m: ModelManifest, d: DatasetManifest, n: int, dtype: str, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """L(theta; z_i) for shard n: warm, else from Redis, else computed (and stored in both)."""
        key = ("base", artifact_id(m.digest, d.digest, n, dtype))
        torch_dtype = getattr(torch, dtype)

        def load():
            raw = self.store.get_base(m.digest, d.digest, n, dtype)
            if raw is not None and len(raw) == d.shards[n].size * torch_dtype.itemsize:
                self.counters["base_from_redis"] += 1
                return torch.frombuffer(bytearray(raw), dtype=torch_dtype).to(self.device)
            self.counters["base_computes"] += 1
            value = compute().detach()
            self.store.put_base(m.digest, d.digest, n, dtype, value.cpu().numpy().tobytes())
            return value

        return self._get(key, load)
