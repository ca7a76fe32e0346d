"""The worker's warm state: models, training-set shards, base losses and curvature, in an LRU under a
byte budget that nothing exceeds: a shard over 1/SHARD_SHARE of the budget is never held but streamed
from its file batch by batch (`Stream`), and no single item larger than the budget is kept.

Everything a job's dtype changes is kept per dtype (each job carries its own: contract/jobs.py). Base
losses and curvature are computed once across the fleet: looked up warm, then in the store (Redis, or
the shared score directory for a large curvature), and only then computed, by one worker at a time
(`Store.once`). Counters say what was loaded or computed; the worker publishes them in its heartbeat
(tests and /metrics read them).
"""

from __future__ import annotations

import importlib
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from contract.datafiles import verify
from contract.jobs import artifact_id
from contract.registry import DatasetManifest, ModelManifest, Registry, RegistryError, operator_code
from contract.settings import Settings

from .forward_inf import AttributionInputError, ForwardInf, Mirror, MirrorConfig, Task, build, families, make_task
from .forward_inf.curvature import Curvature, restore
from .forward_inf.data import spread
from .forward_inf.kronecker import Kronecker
from .forward_inf.sketch import Basis
from .store import Store

SHARD_SHARE = 4  # a shard is held warm only when it takes at most 1/SHARD_SHARE of the budget


def budget(settings: Settings, device: torch.device) -> int:
    """The warm cache's bytes: ATTR_WARM_BYTES where set; else ATTR_WARM_SHARE of the memory free where the
    tensors live when the worker starts (a GPU's; the host's available memory, within its cgroup's limit),
    on CPU split among the host's workers as its cores are (cores / ATTR_TORCH_THREADS)."""
    if settings.warm_bytes:
        return settings.warm_bytes
    if device.type == "cuda":
        return int(settings.warm_share * torch.cuda.mem_get_info(device)[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, cores // settings.torch_threads) if settings.torch_threads else 1
    return int(settings.warm_share * available_memory() / workers)


def available_memory() -> int:
    """Bytes the host can still give: MemAvailable, and no more than the cgroup (a container) has left."""
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit, used = (cgroup / "memory.max").read_text().strip(), int((cgroup / "memory.current").read_text())
    except (OSError, ValueError):
        return free
    return free if limit == "max" else min(free, int(limit) - used)


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
        return nbytes(value.raw) + nbytes(value.tensors())
    if isinstance(value, Kronecker):
        return nbytes(value.tensors())
    if isinstance(value, ForwardInf):
        return nbytes(value.model)  # its scratch copy of the model, once made
    if isinstance(value, Mirror):
        return nbytes(value.first) + nbytes(value.total)
    if isinstance(value, Basis):
        return nbytes(value.tensors())
    if hasattr(value, "nbytes") and isinstance(value.nbytes, int):  # the index's search (worker/search.py)
        return value.nbytes
    if isinstance(value, dict | tuple | list):
        return sum(nbytes(v) for v in (value.values() if isinstance(value, dict) else value))
    return 0


class Warm:
    def __init__(
        self,
        store: Store,
        budget_bytes: int,
        device: torch.device,
        registry: Registry | None = None,
        operator_modules: tuple[str, ...] = (),
    ):
        self.store, self.budget, self.device, self.registry = store, budget_bytes, device, registry
        self.operator_modules = operator_modules  # python:module:factory allowed for these modules alone
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
        if size > self.budget:  # used once and let go: holding it would break the budget
            self.counters["too_large"] += 1
            return value
        self.items[key] = (value, size)
        while self.bytes > self.budget:  # evict the least recently used
            self.items.popitem(last=False)
            self.counters["evictions"] += 1
        return value

    def keep(self, key: tuple, load: Callable[[], Any]) -> Any:
        """`load()`'s value under `key`, kept warm like everything else here (the index's basis and search)."""
        return self._get(("kept", *key), load)

    def drop(self, key: tuple) -> None:
        """Let go of what `keep` holds under `key` (its file was deleted: the next use makes it again)."""
        self.items.pop(("kept", *key), None)

    # -- models --------------------------------------------------------------------------------------
    def model(self, m: ModelManifest, dtype: str) -> tuple[torch.nn.Module, Task]:
        return self._get(("model", m.digest, dtype), lambda: self.load_model(m, getattr(torch, dtype)))

    def load_model(self, m: ModelManifest, dtype: torch.dtype) -> tuple[torch.nn.Module, Task]:
        """The model as its manifest describes it (not kept: model() keeps it warm)."""
        self.counters["model_loads"] += 1
        family = m.architecture.partition(":")[0]
        if family in families.FAMILIES:  # a library's own folder layout, every file digest-checked
            base = self.model(self._base(m), str(dtype).removeprefix("torch."))[0] if m.base else None
            model = families.load(m.architecture, m.verified(), m.weights, m.params, base, m.input.pad_id)
            return model.to(self.device, dtype).eval(), make_task(m.task, **m.task_params)
        if family == "builtin":
            model = build(m.architecture, m.params)
        else:  # python:package.module:factory, operator code the operator allowed by module name
            module, factory = operator_code(m.architecture, self.operator_modules)
            model = getattr(importlib.import_module(module), factory)(**m.params)
        state = load_file(verify(m.path / m.weights, m.sha256))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RegistryError(f"model {m.id!r}: weights do not fit the architecture: {exc}") from exc
        return model.to(self.device, dtype).eval(), make_task(m.task, **m.task_params)

    def _base(self, m: ModelManifest) -> ModelManifest:
        """An adapter's base, as it was when the adapter was registered (else its results would change
        under the same identity)."""
        base = self.registry.model(m.base) if self.registry else None
        if base is None or base.digest != m.base_digest:
            raise RegistryError(f"model {m.id!r}: its base {m.base!r} is gone or changed since it was registered")
        return base

    def engine(self, m: ModelManifest, d: DatasetManifest, config: MirrorConfig) -> ForwardInf:
        """A ForwardInf per (model, training set, settings), kept warm: its measured stacking choice, its
        scratch copy of the model and its curvature estimate carry over to the next job."""

        def make():
            model, task = self.model(m, config.dtype or "float32")
            return ForwardInf(model, task, config)

        return self._get(("engine", m.digest, d.digest, config), make)

    def curvature(
        self, m: ModelManifest, d: DatasetManifest, fi: ForwardInf, estimate: Callable[[], Curvature | Kronecker]
    ):
        """The damped curvature for this model, training set and what it depends on (perturbed
        parameters, kind, damping, samples, dtype): one estimate serves every preset that uses it, on
        every worker of the fleet (stored, and computed by one worker at a time)."""
        c, params = fi.config, list(fi.fm.theta)  # as resolved by fi.plan()
        name = "curvature-" + artifact_id(
            m.digest, d.digest, fi.precondition, *params, c.damping, c.curvature_samples, c.dtype
        )

        def stored() -> Curvature | Kronecker:  # factored: no worker factors it again
            arrays, meta = self.store.get_blob(name)
            tensors = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
            names, damping, samples = json.loads(meta["names"]), float(meta["damping"]), int(meta["samples"])
            rule, refused = meta.get("rule", ""), meta.get("refused") == "1"
            clipped, left_out = int(meta["clipped"]), float(meta.get("left_out", 0))
            return restore(meta["kind"], names, fi.model, tensors, damping, samples, clipped, rule, left_out, refused)

        computed: list[Curvature | Kronecker] = []

        def compute() -> None:
            self.counters["curvature_estimates"] += 1
            c = estimate()
            meta = {"kind": c.kind, "names": json.dumps(c.names), "damping": repr(c.damping)}
            meta.update(samples=str(c.samples), clipped=str(c.clipped), rule=c.rule)
            meta.update(left_out=repr(getattr(c, "left_out", 0)), refused=str(int(getattr(c, "refused", False))))
            self.store.put_blob(name, {k: v.cpu().numpy() for k, v in c.tensors().items()}, meta)
            computed.append(c)

        def load() -> Curvature | Kronecker:
            self.store.once(name, compute, lambda: self.store.has_blob(name))
            return computed[0] if computed else stored()

        return self._get(("curvature", name), load)

    def mirror(self, key: str, take: Callable[[], Mirror]) -> Mirror:
        """The mirrored step of request `key` (deterministic: every part of a fan-out computes the same),
        taken once on this worker and kept for its other parts."""
        return self._get(("mirror", key), take)

    # -- data ----------------------------------------------------------------------------------------
    def shard(self, d: DatasetManifest, n: int, batch_size: int):
        """Shard n: held warm as tensors when it takes at most 1/SHARD_SHARE of the budget, else a
        `Stream` that reads it from its file batch by batch."""
        if d.shard_bytes(n) * SHARD_SHARE > self.budget:
            self.counters["shard_streams"] += 1
            return Stream(d, n, batch_size)
        return self._get(("shard", d.digest, n), lambda: self._load_shard(d, n))

    def _load_shard(self, d: DatasetManifest, n: int) -> dict[str, torch.Tensor]:
        self.counters["shard_loads"] += 1
        return {k: torch.from_numpy(v).to(self.device) for k, v in d.rows(n).items()}

    def record_ids(self, d: DatasetManifest) -> Sequence[str]:
        return d.record_ids()  # default ids are made when asked; a records file is parsed once per version

    def examples(self, d: DatasetManifest, indices: list[int]) -> dict[str, torch.Tensor]:
        """Records of a dataset by global index (test points given by reference), read alone."""
        bad = [i for i in indices if not 0 <= i < d.size]
        if bad:
            raise AttributionInputError(f"record index {bad[0]} is out of range for {d.id!r}")
        return {k: torch.from_numpy(v).to(self.device) for k, v in d.read(indices).items()}

    def sample(self, d: DatasetManifest, limit: int) -> dict[str, torch.Tensor]:
        """Up to `limit` records spread evenly over the set (data.spread: the records the engine's
        curvature estimate takes from a whole training set), read alone."""
        return self._get(("sample", d.digest, limit), lambda: self.examples(d, spread(d.size, limit).tolist()))

    # -- base losses ---------------------------------------------------------------------------------
    def norms(self, m: ModelManifest, d: DatasetManifest, n: int, dtype: str, compute: Callable[[], torch.Tensor]):
        """Shard n's last-layer gradient norms (score="cosine"): computed once, kept warm."""
        return self._get(("norms", m.digest, d.digest, n, dtype), compute)

    def tail_inputs(self, m: ModelManifest, d: DatasetManifest, n: int, dtype: str, params: list[str], compute):
        """Shard n's inputs to the perturbed last module (ForwardInf.tail_inputs_of; None where the sweep runs
        the whole model): computed once, kept warm."""
        return self._get(("tail", m.digest, d.digest, n, dtype, *params), compute)

    def base(
        self, m: ModelManifest, d: DatasetManifest, n: int, dtype: str, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        """L(theta; z_i) for shard n: warm, else from Redis, else computed (by one worker of the fleet at
        a time) and stored."""
        name = artifact_id(m.digest, d.digest, n, dtype)
        torch_dtype = getattr(torch, dtype)

        def stored() -> torch.Tensor | None:
            raw = self.store.get_base(m.digest, d.digest, n, dtype)
            if raw is not None and len(raw) == d.shards[n].size * torch_dtype.itemsize:
                return torch.frombuffer(bytearray(raw), dtype=torch_dtype).to(self.device)
            return None

        def compute_and_store() -> None:
            self.counters["base_computes"] += 1
            self.store.put_base(m.digest, d.digest, n, dtype, compute().detach().cpu().numpy().tobytes())

        def load() -> torch.Tensor:
            if (value := stored()) is None:
                self.store.once(f"base-{name}", compute_and_store, lambda: stored() is not None)
                value = stored()
            else:
                self.counters["base_from_redis"] += 1
            return value

        return self._get(("base", name), load)


class Stream:
    """Shard n of a dataset as a re-iterable of batches read from its file (the engine's data protocol,
    worker/forward_inf/data.py), each next one read by a thread while the sweep computes on this one:
    sweeping it holds two batches, whatever its size, and reads overlap compute (file reads release the
    GIL)."""

    def __init__(self, d: DatasetManifest, n: int, batch_size: int):
        self.d, self.n, self.batch_size = d, n, batch_size

    def __iter__(self):
        batches = self.d.batches(self.n, self.batch_size)
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as reader:
            ahead = reader.submit(next, batches, None)
            while (arrays := ahead.result()) is not None:
                ahead = reader.submit(next, batches, None)
                yield {k: torch.from_numpy(v) for k, v in arrays.items()}

    def size(self) -> int:
        return self.d.shards[self.n].size

    def num_batches(self, batch_size: int) -> int:
        full, rest = divmod(self.size(), self.batch_size)
        return full * -(-self.batch_size // batch_size) + -(-rest // batch_size)
