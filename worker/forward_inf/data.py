"""Turn what callers pass as data into a re-iterable stream of indexed batches.

Accepted forms (for training and test sets alike):
  - a tensor of inputs (tasks that need no targets: causal LM, diffusion);
  - a tuple `(inputs, targets)` of tensors with the same first dimension;
  - a dict with "inputs" (and optionally "targets");
  - any re-iterable (list, DataLoader, ...) of batches in one of the forms above; a training set larger
    than memory is swept batch by batch this way. A one-shot iterator is refused: the training set is
    read more than once (base losses, then each query). A re-iterable that knows its length without
    being read says so with `size()` (examples) and `num_batches(batch_size)`, for progress and planning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .config import AttributionInputError

Batch = dict[str, torch.Tensor]


def is_batch(item) -> bool:
    return (
        isinstance(item, torch.Tensor)
        or (isinstance(item, tuple) and len(item) == 2 and all(isinstance(t, torch.Tensor) for t in item))
        or (isinstance(item, dict) and isinstance(item.get("inputs"), torch.Tensor))
    )


def spread(size: int, limit: int) -> torch.Tensor:
    """Indices of min(size, limit) records spaced evenly over 0..size-1: the sample the curvature is
    estimated from (every record where size <= limit; the whole range however the set is ordered)."""
    taken = min(size, limit)
    return torch.arange(taken) * size // max(taken, 1)


def as_batch(item) -> Batch:
    """One batch in any accepted form -> {"inputs", ["targets"]}."""
    if isinstance(item, torch.Tensor):
        batch = {"inputs": item}
    elif isinstance(item, tuple) and is_batch(item):
        batch = {"inputs": item[0], "targets": item[1]}
    elif isinstance(item, dict) and is_batch(item):
        batch = {k: v for k, v in item.items() if k in ("inputs", "targets")}
    else:
        raise AttributionInputError(
            f"cannot read a batch from {type(item).__name__}: expected a tensor, an (inputs, targets) "
            "tuple of tensors or a dict with 'inputs'"
        )
    n = batch["inputs"].shape[0] if batch["inputs"].dim() else 0
    if "targets" in batch and batch["targets"].shape[:1] != batch["inputs"].shape[:1]:
        raise AttributionInputError(
            f"inputs and targets differ in length: {n} inputs, {batch['targets'].shape[0]} targets"
        )
    return batch


class Examples:
    """A re-iterable view of a data source as batches of at most `batch_size`, each with "index"."""

    def __init__(self, source, batch_size: int, what: str = "training set"):
        self.what, self.batch_size = what, batch_size
        self._whole: Batch | None = None
        self._source: Iterable | None = None
        if is_batch(source) or not isinstance(source, Iterable) or isinstance(source, str | bytes):
            self._whole = as_batch(source)
        elif isinstance(source, Iterator):
            raise AttributionInputError(
                f"the {what} is a one-shot iterator; pass a list, a DataLoader or another re-iterable"
            )
        else:
            self._source = source

    def __iter__(self) -> Iterator[Batch]:
        offset = 0
        for batch in [self._whole] if self._whole is not None else map(as_batch, self._source):
            n = batch["inputs"].shape[0] if batch["inputs"].dim() else 0
            for lo in range(0, n, self.batch_size):
                part = {k: v[lo : lo + self.batch_size] for k, v in batch.items()}
                part["index"] = torch.arange(offset + lo, offset + min(n, lo + self.batch_size))
                yield part
            offset += n
        if offset == 0:
            raise AttributionInputError(f"the {self.what} is empty")

    def num_batches(self) -> int | None:
        if self._whole is not None:
            return -(-self._whole["inputs"].shape[0] // self.batch_size)
        if isinstance(self._source, (list, tuple)):
            return sum(-(-as_batch(b)["inputs"].shape[0] // self.batch_size) for b in self._source)
        if hasattr(self._source, "num_batches"):
            return self._source.num_batches(self.batch_size)
        return None

    def size(self) -> int | None:
        """Number of examples, where known without reading the data."""
        if self._whole is not None:
            return self._whole["inputs"].shape[0]
        if isinstance(self._source, (list, tuple)):
            return sum(as_batch(b)["inputs"].shape[0] for b in self._source)
        if hasattr(self._source, "size"):
            return self._source.size()
        return None
