"""Each kind's result as one flat table: what the exports (CSV, JSON Lines) and the CLI's tables show. Read
from the public result (JSON, as the API answers it), so the API and the client make the same rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

FORMATS = {"csv": "text/csv; charset=utf-8", "jsonl": "application/x-ndjson"}

TEST = ("test_row", "test", "label", "predicted", "p_predicted")
COLUMNS: dict[str, tuple[str, ...]] = {  # one row per ...
    "attribution": (*TEST, "side", "rank", "record_id", "index", "score"),  # proponent or opponent of a test point
    "leakage": (*TEST, "leaked", "match", "record_id", "index", "distance", "similarity"),  # test point, best match
    "mislabeled": ("rank", "record_id", "index", "label", "predicted", "p_predicted", "p_wrong", "loss", "harm"),
    "memorization": (
        "rank",
        "record_id",
        "index",
        "reliance",
        "self_influence",
        "neighbour_support",
        "flags",
        "copies",
    ),  # fmt: skip
}


def test_name(test: dict) -> str:
    """A test point in words: its record id, or `inline:` and its digest."""
    return test.get("record_id") or f"inline:{test.get('digest')}"


def _test(row: dict) -> dict:
    test = row["test"]
    return {"test_row": row["row"], "test": test_name(test), **{k: test.get(k) for k in TEST[2:]}}


def rows(kind: str, result: dict) -> Iterator[dict]:
    """The table's rows (dicts keyed by COLUMNS[kind])."""
    if kind == "attribution":
        for row in result["rows"]:
            for side in ("proponents", "opponents"):
                for rank, e in enumerate(row[side], 1):
                    yield _test(row) | {"side": side[:-1], "rank": rank, **{k: e[k] for k in COLUMNS[kind][-3:]}}
    elif kind == "leakage":
        for row in result["rows"]:
            best = row["best"]
            yield (
                _test(row) | {"leaked": row["leaked"], "match": row["match"]} | {k: best[k] for k in COLUMNS[kind][-4:]}
            )
    elif kind == "mislabeled":
        for e in result["review"]:
            yield {k: e[k] for k in COLUMNS[kind]}
    else:
        for e in result["records"]:
            yield {k: e[k] for k in COLUMNS[kind]}


def export(kind: str, result: dict, format: str) -> str:
    """The table as CSV (lists joined by spaces, null as empty) or JSON Lines (values as in the result)."""
    if format == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows(kind, result))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS[kind], lineterminator="\n")
    writer.writeheader()
    for row in rows(kind, result):
        writer.writerow({k: " ".join(v) if isinstance(v, list) else v for k, v in row.items()})
    return buf.getvalue()
