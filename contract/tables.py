"""Each kind's result as one flat table: what the exports (CSV, JSON Lines) and the CLI's tables show. Read
from the public result (JSON, as the API answers it), so the API and the client make the same rows. A kind
names its table (contract/kinds.py `table`); these are the attribution's and the shipped analyses'."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}
TEST = ("test_row", "test", "label", "predicted", "p_predicted")


class Table(NamedTuple):
    """A kind's table: its columns, and its rows (dicts keyed by them) read off the public result's JSON."""

    columns: tuple[str, ...]
    rows: Callable[[dict], Iterable[dict]]


def test_name(test: dict) -> str:
    """A test point in words: its record id, or `inline:` and its digest."""
    return test.get("record_id") or f"inline:{test.get('digest')}"


def test_columns(row: dict) -> dict:
    """A result row's TEST columns: which test point it is, and what the model predicted for it."""
    test = row["test"]
    return {"test_row": row["row"], "test": test_name(test), **{k: test.get(k) for k in TEST[2:]}}


def listed(key: str, columns: tuple[str, ...]) -> Table:
    """A table of one list in the result (`result[key]`), one row per entry, its `columns` as they are."""
    return Table(columns, lambda result: ({k: e[k] for k in columns} for e in result[key]))


def _attribution(result: dict) -> Iterator[dict]:  # one row per proponent and opponent of a test point
    for row in result["rows"]:
        for side in ("proponents", "opponents"):
            for rank, e in enumerate(row[side], 1):
                yield test_columns(row) | {
                    "side": side[:-1],
                    "rank": rank,
                    **{k: e[k] for k in ATTRIBUTION.columns[-3:]},
                }


def _leakage(result: dict) -> Iterator[dict]:  # one row per test point: its best match
    for row in result["rows"]:
        best, match = row["best"], LEAKAGE.columns[-4:]
        yield test_columns(row) | {"leaked": row["leaked"], "match": row["match"]} | {k: best[k] for k in match}


ATTRIBUTION = Table((*TEST, "side", "rank", "record_id", "index", "score"), _attribution)
LEAKAGE = Table((*TEST, "leaked", "match", "record_id", "index", "distance", "similarity"), _leakage)
MISLABELED = listed(
    "review", ("rank", "record_id", "index", "label", "predicted", "p_predicted", "p_wrong", "loss", "harm")
)
MEMORIZATION = listed(
    "records", ("rank", "record_id", "index", "reliance", "self_influence", "neighbour_support", "flags", "copies")
)


def export(table: Table, result: dict, format: str) -> str:
    """The table as CSV (lists joined by spaces, null as empty) or JSON Lines (values as in the result)."""
    if format == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in table.rows(result))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, table.columns, lineterminator="\n")
    writer.writeheader()
    for row in table.rows(result):
        writer.writerow({k: " ".join(v) if isinstance(v, list) else v for k, v in row.items()})
    return buf.getvalue()
