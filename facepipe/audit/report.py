"""``report.html``: one self-contained page (images inlined as data URIs) to review an audit by eye.

One section per check with its counts and threshold, and a table of the flagged cases (at most
``max_cases`` per check, most suspicious first): each case shows the crop(s) in question beside typical crops of
the identities involved (their most central images), so a reviewer sees at a glance whether "Alice" really is
Alice. Tables sort by any column (click its header) and filter by text. When the page has loaded, ``<body>``
carries ``data-images-loaded`` / ``data-images-total`` and each table ``data-rows``: what a headless browser test
checks.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
import cv2
from facepipe.audit.data import EmbeddingSet
from facepipe.audit.run import AuditResult

THUMB = 72
TYPICAL = 3

_SCRIPT = """
function sortTable(th) {
  const table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const key = r => { const t = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); })
    .forEach(r => body.appendChild(r));
}
function filterTable(input) {
  const q = input.value.toLowerCase();
  for (const r of document.getElementById(input.dataset.table).tBodies[0].rows)
    r.style.display = r.textContent.toLowerCase().includes(q) ? '' : 'none';
}
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.imagesTotal = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  for (const t of document.querySelectorAll('table.cases')) t.dataset.rows = t.tBodies[0].rows.length;
});
"""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222} h2{margin-top:1.6em}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:middle}
th{background:#f0f0f0;cursor:pointer} img{width:72px;height:72px;margin:1px;border:2px solid transparent}
img.case{border-color:#d33} .muted{color:#777} input{margin:.4em 0;padding:3px;width:22em}
"""


class _Thumbnails:
    """Data-URI thumbnails of crops, read once each."""

    def __init__(self, root: Path | None) -> None:
        self.root, self.cache = root, {}

    def __call__(self, path: str, css: str = "") -> str:
        if path not in self.cache:
            self.cache[path] = self._encode(path)
        uri = self.cache[path]
        label = html.escape(path)
        if uri is None:
            return f'<span class="muted" title="{label}">(no image)</span>'
        return f'<img class="{css}" src="{uri}" title="{label}" alt="{label}">'

    def _encode(self, path: str) -> str | None:
        if self.root is None:
            return None
        image = cv2.imread(str(self.root / path), cv2.IMREAD_COLOR)
        if image is None:
            return None
        ok, data = cv2.imencode(".jpg", cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA), [cv2.IMWRITE_JPEG_QUALITY, 80])
        return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode() if ok else None


def _typical_crops(result: AuditResult) -> dict[str, list[str]]:
    """Each identity's most central images (highest leave-one-out score)."""
    noise = result.tables["label_noise"]
    ordered = noise.sort_values("score", ascending=False, kind="stable")
    return {identity: group["path"].head(TYPICAL).tolist() for identity, group in ordered.groupby("identity", sort=False)}


def _table(table_id: str, headers: list[str], rows: list[list[tuple[str, str | None]]]) -> str:
    """Rows of (cell html, sort value) pairs."""
    head = "".join(f'<th onclick="sortTable(this)">{html.escape(h)}</th>' for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td{"" if v is None else f" data-v={json.dumps(v)}"}>{cell}</td>' for cell, v in row) + "</tr>"
        for row in rows
    )
    return (
        f'<input placeholder="filter…" data-table="{table_id}" oninput="filterTable(this)">'
        f'<table class="cases" id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    )


def render_report(train: EmbeddingSet, result: AuditResult, max_cases: int = 200) -> str:
    thumb = _Thumbnails(train.image_root)
    typical = _typical_crops(result)
    esc = html.escape

    def sheet(identity: str) -> str:
        return "".join(thumb(p) for p in typical.get(identity, []))

    def num(x: float) -> tuple[str, str]:
        return f"{x:.4f}", f"{x:.6f}"

    sections = []
    t = result.thresholds
    flagged = result.tables["label_noise"].loc[lambda d: d["flagged"]].head(max_cases)
    rows = [
        [(thumb(r.path, "case") + f'<br><span class="muted">{esc(r.path)}</span>', r.path), (esc(r.identity), r.identity),
         (sheet(r.identity), None), num(r.score), (esc(r.best_other_identity), r.best_other_identity),
         (sheet(r.best_other_identity), None), num(r.best_other_score)]
        for r in flagged.itertuples()
    ]
    sections.append(_section("Label noise", "images whose own identity's centre (leaving them out) is less similar than "
                             f"T_image = {t.image:.4f}", result, "label_noise",
                             _table("label_noise", ["image", "identity", "identity's typical crops", "score", "most similar other",
                                                    "its typical crops", "its score"], rows)))
    flagged = result.tables["duplicate_identities"].loc[lambda d: d["flagged"]].head(max_cases)
    rows = [[(esc(r.identity_a), r.identity_a), (sheet(r.identity_a), None), (esc(r.identity_b), r.identity_b),
             (sheet(r.identity_b), None), num(r.similarity)] for r in flagged.itertuples()]
    sections.append(_section("Duplicate identities", f"identity centres at least T_identity = {t.identity:.4f} alike",
                             result, "duplicate_identities",
                             _table("duplicate_identities", ["identity A", "A's crops", "identity B", "B's crops", "similarity"], rows)))
    flagged = result.tables["near_duplicates"].loc[lambda d: d["flagged"]].head(max_cases)
    rows = [[(thumb(r.path_a, "case") + thumb(r.path_b, "case"), None), (esc(r.path_a), r.path_a), (esc(r.path_b), r.path_b),
             num(r.similarity)] for r in flagged.itertuples()]
    sections.append(_section("Near-duplicate images", f"image pairs at least T_copy = {t.copy:.4f} alike", result,
                             "near_duplicates", _table("near_duplicates", ["images", "image A", "image B", "similarity"], rows)))
    flagged = result.tables["overlap"].loc[lambda d: d["flagged"]].head(max_cases)
    rows = [[(esc(r.identity), r.identity), (sheet(r.identity), None), (esc(r.against), r.against), (esc(str(r.other)), str(r.other)),
             num(r.similarity)] for r in flagged.itertuples()]
    sections.append(_section("Overlap with evaluation sets", "training identities that match an evaluation identity "
                             "(≥ T_identity) or image (≥ T_image)", result, "overlap",
                             _table("overlap", ["training identity", "its crops", "evaluation set", "matches", "similarity"], rows)))
    summary = result.summary
    head = (
        f"<h1>Training-set audit</h1><p>{summary['images']} images, {summary['identities']} identities; skipped: "
        f"{esc(json.dumps(summary['skipped']))}; {summary['single_image_identities']} single-image identities (no label-noise "
        f"score). Thresholds derived from the data unless given: {esc(json.dumps(t.how))}.</p>"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>facepipe audit</title><style>{_STYLE}</style>"
        f"<script>{_SCRIPT}</script></head><body>{head}{''.join(sections)}</body></html>"
    )


def _section(title: str, rule: str, result: AuditResult, name: str, table_html: str) -> str:
    flagged, total = result.summary["flagged"][name], result.summary["rows"][name]
    return (
        f'<h2 id="section-{name}">{title}: <span class="count">{flagged}</span> flagged</h2>'
        f"<p class='muted'>Flagged: {rule}. {total} candidate rows in {name}.csv; the first flagged ones below.</p>{table_html}"
    )


def write_report(train: EmbeddingSet, result: AuditResult, path: str | Path, max_cases: int = 200) -> Path:
    from facepipe.io.atomic import atomic_write_text

    return atomic_write_text(path, render_report(train, result, max_cases))
