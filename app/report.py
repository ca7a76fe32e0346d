"""The visual report: one self-contained HTML page per finished job (no external assets, so it can be
saved or mailed). Records are shown as PNG thumbnails (data: URIs) for image data, as text for byte
tokens, else as their first values; scores as inline SVG histograms. Torch-free: records are read
through the registry with numpy, every record a page shows in one read of only those rows."""

from __future__ import annotations

import base64
import hashlib
import html
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from contract.jobs import InlinePoints, RecordPoints
from contract.kinds import ANALYSES
from contract.registry import DatasetManifest, InputSpec, Registry
from contract.results import Stored
from contract.schemas import Influence, LeakageRow, Match, MemorizedRecord, Suspect, TestPoint
from contract.tables import FORMATS, test_name

Decode = Callable[[Sequence[int]], str]  # token ids -> text
Card = Influence | Match | Suspect | MemorizedRecord  # a training record a page shows

ROWS = 20  # test points (attribution, leakage) shown in full; the JSON has all of them
LIST = 60  # records shown with their data (review list, audited records, leaked points)
PAGE = 500  # review-list lines (the export has all)
SAMPLE = 100_000  # scores per histogram: of a larger training set, every k-th record's
STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px} table{border-collapse:collapse}
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.row{display:flex;gap:16px;align-items:flex-start;margin:12px 0;padding:8px;border:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:6px} .card{font-size:11px;width:140px;overflow:hidden}
.card img,.query img{image-rendering:pixelated;border:1px solid #999;display:block}
.card pre,.query pre{white-space:pre-wrap;font-size:11px;margin:0;max-height:7em;overflow:hidden}
.card .id{white-space:nowrap;overflow:hidden;text-overflow:ellipsis} .answer{font-size:16px}
.legend{background:#f4f6fb;padding:8px;border-left:3px solid #5c7cfa;max-width:900px}
.bad{color:#b00020;font-weight:600} .ok{color:#1b5e20} .muted{color:#666} mark{background:#ffe08a}
"""


# marks the page once every image has loaded (report screenshots and the browser test wait on it)
READY = (
    "addEventListener('load',()=>{const i=[...document.images];"
    "document.body.dataset.images=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length})"
)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# A page runs its own script and style alone, shows data: images alone, and reaches nothing: a record's text
# that got past escaping still could not load or send anything. In the page itself too (a <meta>), so a saved
# or mailed copy keeps it; the header adds what a <meta> cannot say (no framing).
PAGE_CSP = (
    f"default-src 'none'; script-src {_hash(READY)}; style-src {_hash(STYLE)}; img-src data:; "
    "base-uri 'none'; form-action 'none'"
)
CSP = PAGE_CSP + "; frame-ancestors 'none'"


def png(pixels: np.ndarray) -> bytes:
    """8-bit grayscale (H, W) or RGB (H, W, 3) pixels as a PNG file."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels.astype(np.uint8))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if pixels.ndim == 3 else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _image(x: np.ndarray, spec: InputSpec) -> str:
    shape = spec.image_shape or list(x.shape)
    img = np.asarray(x, dtype=np.float64).reshape(shape)
    if img.ndim == 3:  # (C, H, W) -> (H, W, C); one channel -> grayscale
        img = img.transpose(1, 2, 0) if img.shape[0] in (1, 3) else img
        img = img[..., 0] if img.shape[-1] == 1 else img
    lo, hi = spec.range or (float(img.min()), float(img.max()))
    img = np.clip((img - lo) / ((hi - lo) or 1.0), 0, 1) * 255
    scale = max(1, 64 // max(img.shape[:2]))
    img = img.repeat(scale, 0).repeat(scale, 1)
    data = base64.b64encode(png(img)).decode()
    return f'<img src="data:image/png;base64,{data}" width="{img.shape[1]}" height="{img.shape[0]}" alt="record">'


def _text(tokens: np.ndarray, mask: np.ndarray | None, spec: InputSpec, decode: Decode | None) -> str:
    tokens = [int(t) for t in np.asarray(tokens).ravel()]
    marks = [bool(m) for m in np.asarray(mask).ravel()] if mask is not None else [False] * len(tokens)
    while tokens and tokens[-1] == spec.pad_id:  # padding
        tokens.pop()
    parts, current, run = [], None, []
    for t, m in zip(tokens, marks, strict=False):
        if m != current and run:
            parts.append((current, run))
            run = []
        current = m
        run.append(t)
    if run:
        parts.append((current, run))

    def show(run):
        if decode is not None:
            return html.escape(decode(run))
        return html.escape(" ".join(map(str, run)) + " ")

    return "<pre>" + "".join(f"<mark>{show(r)}</mark>" if m else show(r) for m, r in parts) + "</pre>"


def show(x: np.ndarray, spec: InputSpec, mask: np.ndarray | None = None, decode: Decode | None = None) -> str:
    """One record as HTML: an image, text (token ids shown through `decode`), or its first values."""
    if spec.dtype == "int64":
        return _text(x, mask, spec, decode)
    if spec.image_shape or len(spec.shape) in (2, 3):
        return _image(x, spec)
    values = ", ".join(f"{v:.3g}" for v in np.asarray(x).ravel()[:12])
    return f"<pre>[{html.escape(values)}{', ...' if np.asarray(x).size > 12 else ''}]</pre>"


def histogram(values: np.ndarray, title: str, marks: dict[str, float] | None = None, bins: int = 40) -> str:
    """An inline SVG histogram with optional labelled vertical marks."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return ""
    lo, hi = float(values.min()), float(values.max())
    for v in (marks or {}).values():
        lo, hi = min(lo, v), max(hi, v)
    hi = hi if hi > lo else lo + 1.0
    counts, _ = np.histogram(values, bins=bins, range=(lo, hi))
    w, h, pad = 480, 140, 20
    bar = (w - 2 * pad) / bins
    top = max(int(counts.max()), 1)
    shapes = [
        f'<rect x="{pad + i * bar:.1f}" y="{h - pad - c / top * (h - 2 * pad):.1f}" width="{bar - 1:.1f}" '
        f'height="{c / top * (h - 2 * pad):.1f}" fill="#5c7cfa"/>'
        for i, c in enumerate(counts)
    ]
    for label, v in (marks or {}).items():
        x = pad + (v - lo) / (hi - lo) * (w - 2 * pad)
        shapes.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{pad}" y2="{h - pad}" stroke="#b00020"/>')
        side = f'x="{x - 3:.1f}" text-anchor="end"' if x > w / 2 else f'x="{x + 3:.1f}"'  # inside the frame
        shapes.append(f'<text {side} y="{pad + 10}" font-size="10" fill="#b00020">{html.escape(label)}</text>')
    axis = (
        f'<text x="{pad}" y="{h - 4}" font-size="10">{lo:.3g}</text>'
        f'<text x="{w - pad}" y="{h - 4}" font-size="10" text-anchor="end">{hi:.3g}</text>'
        f'<text x="{w / 2}" y="12" font-size="11" text-anchor="middle">{html.escape(title)} (n={values.size})</text>'
    )
    return f'<svg width="{w}" height="{h}" role="img" aria-label="{html.escape(title)}">{"".join(shapes)}{axis}</svg>'


class Records:
    """Records of one dataset, read once per page: a section `load`s every index it shows, then draws."""

    def __init__(self, dataset: DatasetManifest, decode: Decode | None):
        self.dataset, self.spec, self.decode = dataset, dataset.input, decode
        self.rows: dict[int, tuple[np.ndarray, object]] = {}

    def load(self, indices: Iterable[int]) -> None:
        missing = sorted(set(indices) - set(self.rows))
        if missing:
            data = self.dataset.read(missing)
            targets = data.get("targets")
            labelled = targets is not None and targets.ndim == 1 and targets.dtype.kind in "iu"
            for j, i in enumerate(missing):
                self.rows[i] = (data["inputs"][j], targets[j] if labelled else None)

    def cards(self, entries: Iterable[Card], caption) -> str:
        entries = list(entries)
        if not entries:
            return "<p class=muted>none</p>"
        self.load(e.index for e in entries)
        cards = []
        for e in entries:
            x, label = self.rows[e.index]
            cards.append(
                f'<div class="card">{show(x, self.spec, decode=self.decode)}'
                f'<div class="id" title="{html.escape(e.record_id)}">{html.escape(e.record_id)}</div>'
                + (f"<div>label {label}</div>" if label is not None else "")
                + f"{caption(e)}</div>"
            )
        return '<div class="cards">' + "".join(cards) + "</div>"


class Queries:
    """The test points of the job (inline arrays or dataset records, as its payload holds them), as HTML."""

    def __init__(self, points: InlinePoints | RecordPoints, registry: Registry, spec: InputSpec, decode: Decode | None):
        self.points, self.registry, self.spec, self.decode = points, registry, spec, decode

    def __call__(self, rows: list[int]) -> dict[int, str]:
        points = self.points
        if isinstance(points, InlinePoints):
            masks = points.targets if self.spec.dtype == "int64" else None
            return {
                j: show(
                    np.asarray(points.inputs[j]),
                    self.spec,
                    None if masks is None else np.asarray(masks[j]),
                    self.decode,
                )
                for j in rows
                if j < len(points.inputs)
            }
        dataset = self.registry.dataset(points.dataset.id)
        if dataset is None:
            return {}
        rows = [j for j in rows if j < len(points.indices)]
        data = dataset.read([points.indices[j] for j in rows])["inputs"] if rows else []
        return {j: show(x, dataset.input, decode=self.decode) for j, x in zip(rows, data, strict=True)}


def _score(e: Influence) -> str:
    return f'<div class="muted">{e.score:.3g}</div>'


def _num(v) -> str:
    """A setting or figure for people: floats to 3 significant digits, a dict as `key value` pairs."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_num(x)}" for k, x in v.items())
    return str(v)


def _pct(p: float) -> str:
    """A probability as a percentage that does not round 0.99995 to 100%."""
    return ">99.99%" if p > 0.9999 else "<0.01%" if 0 < p < 1e-4 else f"{p:.2%}"


def _point(test: TestPoint) -> str:
    """A test point in words: its record id (or inline digest), its label and the model's prediction."""
    said = f"<b>{html.escape(test_name(test.model_dump()))}</b>"
    if test.predicted is not None:
        verdict = "ok" if test.predicted == test.label else "bad"
        said += (
            f' · label {test.label}, <span class="{verdict}">the model says {test.predicted} '
            f"({_pct(test.p_predicted)})</span>"
        )
    return said


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already."""
    head = "".join(f"<th>{h}</th>" for h in header)
    return (
        f"<table><tr>{head}</tr>"
        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
        + "</table>"
    )


def _legend(text: str) -> str:
    return f'<p class="legend"><b>How to read this.</b> {text}</p>'


def render(key: str, result: Stored, scores: np.ndarray, step: int, registry: Registry, top_k: int) -> str:
    """The page; `scores`: the first ROWS rows of the score matrix, every `step`-th column (the histograms');
    `top_k`: the proponents and opponents an attribution asked for."""
    job = result.job
    dataset = registry.dataset(job.dataset.id)
    if dataset is None:
        body = f"<p class=bad>The training dataset {html.escape(job.dataset.id)} is no longer registered.</p>"
        return _page(key, result, body, step)
    model = registry.model(job.model.id)
    decode = model.decode if model is not None and model.input.text else None
    section = _attribution if job.kind == "attribution" else ANALYSES[job.kind].part("report")
    body = section(
        result, scores, Records(dataset, decode), Queries(job.points, registry, dataset.input, decode), top_k
    )
    return _page(key, result, body, step)


def _attribution(result, scores, records, queries, top_k) -> str:
    rows = result.rows
    shown = rows[:ROWS]
    k = min(top_k, len(rows[0].proponents)) if rows else 0
    records.load(e.index for row in shown for e in row.proponents[:k] + row.opponents[:k])
    query_html = queries([row.row for row in shown])

    def first(row, side):
        e = getattr(row, side)[0] if getattr(row, side) else None
        return "" if e is None else f"{html.escape(e.record_id)} ({e.score:.3g})"

    overview = _table(
        ("test point", "loss", "most supported by", "most opposed by"),
        ((_point(r.test), f"{r.test_loss:.3g}", first(r, "proponents"), first(r, "opponents")) for r in shown),
    )
    parts = [
        f'<p class="answer">For each of the {len(rows)} test points, the {k} training records that most '
        f"supported the model's prediction (proponents) and the {k} that most worked against it (opponents)."
        + (f" The first {ROWS} are shown; the export has all." if len(rows) > ROWS else "")
        + "</p>",
        _legend(
            "A score is the change of a training record's loss when the model takes a small step to unlearn the test "
            "point (Forward-INF). Positive: the record and the test point are learnt together, so the record supports "
            "the prediction (a proponent); negative: learning one hurts the other (an opponent). Scores compare "
            "records of one test point; their scale depends on the method's step. The histogram shows every "
            "training record's score."
        ),
        overview,
    ]
    for row in shown:
        j = row.row
        memorised = " · memorised (a training record the model fits almost exactly)" if row.memorized else ""
        parts.append(
            f'<div class="row"><div class="query"><b>test point {j}</b>{query_html.get(j, "")}'
            f"<div>{_point(row.test)}</div>"
            f'<div class="muted">loss {row.test_loss:.3g}{memorised}</div>'
            f"{histogram(scores[j], 'scores of all training records')}</div><div>"
            f"<h3>proponents</h3>{records.cards(row.proponents[:k], _score)}"
            f"<h3>opponents</h3>{records.cards(row.opponents[:k], _score)}</div></div>"
        )
    return "".join(parts)


def _match(e: Match) -> str:
    similar = "" if e.similarity is None else f" · similarity {e.similarity:.3f}"
    return f'<div class="muted">distance {e.distance:.2g}{similar}</div>'


def _found(r: LeakageRow) -> str:
    best = r.best
    similar = "" if best.similarity is None else f", similarity {best.similarity:.3f}"
    return (
        f"test {_point(r.test)} matches training record <b>{html.escape(best.record_id)}</b> "
        f"({'a copy' if r.match == 'copy' else 'a near duplicate'}{similar})"
    )


def leakage(result, scores, records, queries, top_k) -> str:
    a, cal = result.analysis, result.analysis.calibration
    best = np.array([r.best.distance for r in a.rows])
    leaked = [r for r in a.rows if r.leaked]
    rows = sorted(a.rows, key=lambda r: (not r.leaked, r.best.distance))[:ROWS]
    records.load(e.index for r in rows for e in r.evidence)
    query_html = queries([r.row for r in rows])
    found = "".join(f"<li>{_found(r)}</li>" for r in leaked[:LIST])
    more = f"<p class=muted>and {len(leaked) - LIST} more (in the export)</p>" if len(leaked) > LIST else ""
    parts = [
        f'<p class="answer">{html.escape(a.summary)}</p>',
        f"<ul>{found}</ul>{more}" if leaked else "<p>No test point was found in the training set.</p>",
        _legend(
            "Distance: how differently a training record and the test point respond to the same small step of the "
            "model (0: identically, as an exact copy does); a test point is a copy at a distance up to the calibrated "
            "threshold. Similarity: the largest correlation of the two inputs over small shifts (1: the same up to "
            "brightness and contrast); above its calibrated threshold, a near duplicate."
        ),
        "<h2>calibration</h2>",
        _table(("setting", "value"), ((html.escape(k), html.escape(_num(v))) for k, v in cal.model_dump().items())),
        histogram(
            np.log10(np.maximum(best, 1e-12)),
            "log10 best distance per test point",
            {"threshold": float(np.log10(max(cal.threshold, 1e-12)))},
        ),
        "<h2>each test point's closest training records</h2>",
    ]
    for r in rows:
        j = r.row
        verdict = f'<span class="bad">leaked: {r.match}</span>' if r.leaked else '<span class="ok">not found</span>'
        parts.append(
            f'<div class="row"><div class="query"><b>test point {j}</b>{query_html.get(j, "")}'
            f"<div>{_point(r.test)}</div><div>{verdict}</div></div>" + records.cards(r.evidence, _match) + "</div>"
        )
    return "".join(parts)


def mislabeled(result, scores, records, queries, top_k) -> str:
    a = result.analysis
    review = a.review
    records.load(e.index for e in review[:LIST])
    classes = _table(
        ("label", "records", "in review", "mean loss", "mean harm"),
        ((c.label, f"{c.records:,}", c.in_review, f"{c.mean_loss:.3g}", f"{c.mean_harm:.3g}")
         for c in a.classes),
    )  # fmt: skip
    listing = _table(
        ("#", "record", "labelled", "the model says", "p(label wrong)"),
        (
            (e.rank, f"<b>{html.escape(e.record_id)}</b>", e.label,
             f"{e.predicted} ({_pct(e.p_predicted)})", _pct(e.p_wrong))
            for e in review[:PAGE]
        ),
    )  # fmt: skip
    more = f"<p class=muted>the first {PAGE} of {len(review)}; the export has all</p>" if len(review) > PAGE else ""
    return (
        f'<p class="answer">{html.escape(a.summary)}</p>'
        + _legend(
            "p(label wrong): the probability that the recorded label is wrong, from the model's calibrated "
            "probabilities and the record's harm. The model says: the label the model finds most probable, with its "
            "probability (where it memorised a wrong label, that label). Harm: how much the clean reference set's loss rises with this record (positive: the record "
            "hurts the model on clean data)."
        )
        + f"<p class=muted>{html.escape(a.precision_method)}</p>"
        + f"<h2>review list ({len(review)} records)</h2>{listing}{more}"
        + histogram(-scores[0], "harm to the reference set, all training records")
        + f"<h2>per class</h2>{classes}"
        + f"<h2>the first {min(LIST, len(review))} of the review list</h2>"
        + records.cards(
            review[:LIST],
            lambda e: f'<div>#{e.rank}: says {e.predicted}</div><div class="muted">p(wrong) {_pct(e.p_wrong)}</div>',
        )
    )


def memorization(result, scores, records, queries, top_k) -> str:
    a = result.analysis
    records.load(e.index for r in a.records[:LIST] for e in [r, *r.neighbours])
    parts = [
        f'<p class="answer">{html.escape(a.summary)}</p>',
        _legend(
            "Reliance: how much of what the model learnt about a record comes from the record itself (and its exact "
            "copies) rather than from similar records: self / (self + neighbours), 1 = only itself. Above the "
            "threshold a record is an outlier the model memorised. Copies: other training records with identical "
            "responses (exact duplicates). Supporting neighbours: the records that most support it, with scores."
        ),
        f"<p class=muted>{html.escape(a.threshold_method)}</p>",
        histogram(
            np.array([r.reliance for r in a.records]),
            "reliance of the audited records",
            {"threshold": a.threshold},
        ),
    ]
    for r in a.records[:LIST]:
        flags = " ".join(f'<span class="bad">{f}</span>' for f in r.flags)
        copies = ", ".join(html.escape(c) for c in r.copies)
        parts.append(
            f'<div class="row"><div class="query"><b>#{r.rank} {html.escape(r.record_id)}</b>'
            f"{records.cards([r], lambda e: '')}"
            f"<div>reliance {r.reliance:.2f} {flags}</div>"
            f'<div class="muted">{f"copies: {copies}" if copies else "no copies"}</div></div>'
            f"<div><h3>supporting neighbours</h3>{records.cards(r.neighbours, _score)}</div></div>"
        )
    return "".join(parts)


def _page(key: str, result: Stored, body: str, step: int) -> str:
    method, job = result.execution.method, result.job
    settings = _table(
        ("mode", "optimizer", "lr", "precondition", "group", "score"),
        [
            [
                html.escape(_num(getattr(method, k)))
                for k in ("mode", "optimizer", "lr", "precondition", "group", "score")
            ]
        ],
    )
    title = f"{job.kind} {key}"
    exports = " · ".join(f'<a href="export?format={f}">{f.upper()}</a>' for f in FORMATS)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>model <b>{html.escape(job.model.id)}</b>, training set <b>{html.escape(job.dataset.id)}</b>"
        f" ({int(result.shape[1]):,} records{f'; histograms of every {step}th' if step > 1 else ''})."
        f' <span class="exports">Download the table: {exports}</span></p>{body}'
        f"<h2>method</h2>{settings}<script>{READY}</script></body></html>"
    )
