"""What the API pays to read a stored result (contract/results.py) once per process, and to assemble its
first view; measured side by side in one process.

    python -m bench.results [--rows 16 1000] [--k 100]

A made-up attribution of `rows` test points with `k` proponents and opponents each (max_top_k), stored
as the worker stores it. Rows: the stored JSON's size; json.loads (the floor: what a reader without types
pays); the typed parse as pydantic does it, and as the API does it (app.jobs.parse: the cyclic garbage
collector paused); the first view's assembly and encoding at top_k 10. Medians of 7; one process, no
threads of torch involved.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from app.jobs import Jobs, _encode, parse
from contract.jobs import AttributionJob, DatasetRef, ModelRef, RecordPoints
from contract.method import Method
from contract.results import STORED, StoredAttribution
from contract.schemas import Execution, Influence, Progress, RowAttribution, TestPoint, Timing


def stored(rows: int, k: int) -> bytes:
    data = DatasetRef(id="train", digest="d")
    job = AttributionJob(model=ModelRef(id="m", digest="m"), dataset=data, dtype="float32", method=Method(),
                         test=RecordPoints(dataset=data, indices=list(range(rows))))  # fmt: skip
    execution = Execution(method=Method(), parameters=["w"], parameter_count=1, curvature=None, stacking="vmap",
                          dtype="float32", device="cpu", engine_version="x", notes=[])  # fmt: skip

    def ends() -> list[Influence]:
        return [
            Influence(record_id=f"train:{i}", index=i, score=random.random()) for i in random.sample(range(10**6), k)
        ]

    result = StoredAttribution(
        job=job, execution=execution, progress=Progress(done=1, total=1), blocks=[], shape=(rows, 10**6),
        timing=Timing(), rows=[RowAttribution(row=j, test=TestPoint(dataset="train", index=j), test_loss=0.1,
                                              memorized=False, proponents=ends(), opponents=ends()) for j in range(rows)],
    )  # fmt: skip
    return json.dumps(result.model_dump(mode="json")).encode()


def median_ms(f, n: int = 7) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 1000])
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args()
    print("| rows x k | stored, MB | json.loads, ms | typed parse, ms | app.jobs.parse, ms | first view, ms |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        raw = stored(rows, args.k)
        result = parse(raw)
        readers = (json.loads, STORED.validate_json, parse, lambda _: _encode(Jobs._finished(None, "h", result, 10)))  # noqa: B023
        cells = [median_ms(lambda read=read: read(raw)) for read in readers]  # noqa: B023
        print(f"| {rows} x {args.k} | {len(raw) / 1e6:.1f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
