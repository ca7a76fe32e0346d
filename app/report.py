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

from contract.jobs import JOB, InlinePoints, RecordPoints
from contract.registry import DatasetManifest, InputSpec, Registry

Decode = Callable[[Sequence[int]], str]  # token ids -> text

ROWS = 20  # test points (attribution, leakage) shown in full; the JSON has all of them
LIST = 60  # records per list (review list, audited records)
SAMPLE = 100_000  # scores per histogram: of a larger training set, every k-th record's
STYLE = """
body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:20px} h2{font-size:16px;margin-top:28px} table{border-collapse:collapse}
td,th{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
.row{display:flex;gap:16px;align-items:flex-start;margin:12px 0;padding:8px;border:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:6px} .card{font-size:11px;width:96px;overflow:hidden}
.card img,.query img{image-rendering:pixelated;border:1px solid #999;display:block}
.card pre,.query pre{white-space:pre-wrap;font-size:11px;margin:0;max-height:7em;overflow:hidden}
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
        shapes.append(f'<text x="{x + 3:.1f}" y="{pad + 10}" font-size="10" fill="#b00020">{html.escape(label)}</text>')
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

    def cards(self, entries: Iterable[dict], caption) -> str:
        entries = list(entries)
        if not entries:
            return "<p class=muted>none</p>"
        self.load(e["index"] for e in entries)
        cards = []
        for e in entries:
            x, label = self.rows[e["index"]]
            cards.append(
                f'<div class="card">{show(x, self.spec, decode=self.decode)}<div>{html.escape(e["record_id"])}</div>'
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


def _score(e: dict) -> str:
    return f'<div class="muted">{e["score"]:.3g}</div>'


def render(key: str, result: dict, scores: np.ndarray, step: int, registry: Registry) -> str:
    """The page; `scores`: the first ROWS rows of the score matrix, every `step`-th column (the histograms')."""
    job = JOB.validate_python(result["job"])
    dataset = registry.dataset(job.dataset.id)
    if dataset is None:
        body = f"<p class=bad>The training dataset {html.escape(job.dataset.id)} is no longer registered.</p>"
        return _page(key, result, body, step)
    model = registry.model(job.model.id)
    decode = model.decode if model is not None and model.input.text else None
    body = SECTIONS[job.kind](
        result, scores, Records(dataset, decode), Queries(job.points, registry, dataset.input, decode)
    )
    return _page(key, result, body, step)


def _attribution(result, scores, records, queries) -> str:
    parts, shown = [], result["rows"][:ROWS]
    records.load(e["index"] for row in shown for e in row["proponents"][:10] + row["opponents"][:10])
    query_html = queries([row["row"] for row in shown])
    for row in shown:
        j = row["row"]
        query = query_html.get(j, "")
        parts.append(
            f'<div class="row"><div class="query"><b>test point {j}</b>{query}'
            f'<div class="muted">loss {row["test_loss"]:.3g}{" (memorised)" if row["memorized"] else ""}</div>'
            f"{histogram(scores[j], 'scores of all training records')}</div><div>"
            f"<h3>proponents</h3>{records.cards(row['proponents'][:10], _score)}"
            f"<h3>opponents</h3>{records.cards(row['opponents'][:10], _score)}</div></div>"
        )
    return "".join(parts)


def _match(e: dict) -> str:
    similar = "" if e["similarity"] is None else f" · similarity {e['similarity']:.3f}"
    return f'<div class="muted">distance {e["distance"]:.2g}{similar}</div>'


def _leakage(result, scores, records, queries) -> str:
    a, cal = result["analysis"], result["analysis"]["calibration"]
    best = np.array([r["best"]["distance"] for r in a["rows"]])
    rows = sorted(a["rows"], key=lambda r: (not r["leaked"], r["best"]["distance"]))[:ROWS]
    records.load(e["index"] for r in rows for e in r["evidence"])
    query_html = queries([r["row"] for r in rows])
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in cal.items())
    parts = [
        f"<p>{html.escape(a['summary'])}</p><table>{table}</table>",
        histogram(
            np.log10(np.maximum(best, 1e-12)),
            "log10 best distance per test point",
            {"threshold": float(np.log10(max(cal["threshold"], 1e-12)))},
        ),
        "<h2>closest test points</h2>",
    ]
    for r in rows:
        j = r["row"]
        verdict = (
            f'<span class="bad">leaked: {r["match"]}</span>' if r["leaked"] else '<span class="ok">not found</span>'
        )
        parts.append(
            f'<div class="row"><div class="query"><b>test point {j}</b>{query_html.get(j, "")}'
            f"<div>{verdict}</div></div>" + records.cards(r["evidence"], _match) + "</div>"
        )
    return "".join(parts)


def _mislabeled(result, scores, records, queries) -> str:
    a = result["analysis"]
    records.load(e["index"] for e in a["review"][:LIST])
    classes = "".join(
        f"<tr><td>{c['label']}</td><td>{c['records']}</td><td>{c['in_review']}</td>"
        f"<td>{c['mean_loss']:.3g}</td><td>{c['mean_harm']:.3g}</td></tr>"
        for c in a["classes"]
    )
    return (
        f"<p>{html.escape(a['summary'])}</p><p class=muted>{html.escape(a['precision_method'])}</p>"
        + histogram(-scores[0], "harm to the reference set, all training records")
        + "<h2>per class</h2><table><tr><th>label</th><th>records</th><th>in review</th><th>mean loss</th>"
        f"<th>mean harm</th></tr>{classes}</table>"
        + f"<h2>review list (first {min(LIST, len(a['review']))} of {a['review_size']})</h2>"
        + records.cards(
            a["review"][:LIST],
            lambda e: f'<div>#{e["rank"]}</div><div class="muted">p(wrong) {e["p_wrong"]:.2g}</div>',
        )
    )


def _memorization(result, scores, records, queries) -> str:
    a = result["analysis"]
    records.load(e["index"] for r in a["records"][:LIST] for e in [r, *r["neighbours"]])
    parts = [
        f"<p>{html.escape(a['summary'])}</p><p class=muted>{html.escape(a['threshold_method'])}</p>",
        histogram(
            np.array([r["reliance"] for r in a["records"]]),
            "reliance of the audited records",
            {"threshold": a["threshold"]},
        ),
    ]
    for r in a["records"][:LIST]:
        flags = " ".join(f'<span class="bad">{f}</span>' for f in r["flags"])
        parts.append(
            f'<div class="row"><div class="query"><b>#{r["rank"]}</b>{records.cards([r], lambda e: "")}'
            f'<div>reliance {r["reliance"]:.2f} {flags}</div><div class="muted">{len(r["copies"])} copies</div></div>'
            f"<div><h3>supporting neighbours</h3>{records.cards(r['neighbours'], _score)}</div></div>"
        )
    return "".join(parts)


SECTIONS = {
    "attribution": _attribution,
    "leakage": _leakage,
    "mislabeled": _mislabeled,
    "memorization": _memorization,
}


def _page(key: str, result: dict, body: str, step: int) -> str:
    method, job = result["execution"]["method"], result["job"]
    summary = ", ".join(f"{k}={method[k]}" for k in ("mode", "optimizer", "lr", "precondition", "group", "score"))
    title = f"{job['kind']} {key}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>model <b>{html.escape(job['model']['id'])}</b>, training set <b>{html.escape(job['dataset']['id'])}</b>"
        f" ({int(result['shape'][1])} records{f'; histograms of every {step}th' if step > 1 else ''})"
        f"<br><span class=muted>{html.escape(summary)}</span></p>{body}"
        f"<script>{READY}</script></body></html>"
    )
