"""Feature pages: a static HTML site per SAE, an index of latents plus one page per latent.

The index is a table sortable by every numeric column and searchable by explanation (a few lines of inline vanilla
JavaScript; the state lives in the URL fragment, e.g. `index.html#sort=frequency&dir=desc&q=name`, so a view can be
shared). A latent page shows the explanation and scores, the density histogram (inline SVG), the tokens its
decoder direction promotes and suppresses, and its top and quantile contexts with each activating token
highlighted by strength. Every piece of text is escaped: tokens and explanations come from corpora and models.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence
from pathlib import Path

from saelab.io import atomic_write_text
from saelab.report.html import format_value

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.5em;border-bottom:2px solid #ddd;padding-bottom:.3em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em}
td.num{text-align:right}th[data-key]{cursor:pointer;background:#f3f3f3}th[aria-sort=ascending]::after{content:" ▲"}
th[aria-sort=descending]::after{content:" ▼"}.note{color:#555;font-size:.88em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;border:1px solid #eee;
padding:.3em .5em;margin:.3em 0}.act{border-radius:2px}.logits{display:inline-block;vertical-align:top;margin-right:2em}
.tok{white-space:pre-wrap}input[type=search]{font-size:1em;padding:.3em;width:24em}
"""

_INDEX_SCRIPT = """
(function () {
  var table = document.getElementById("latents");
  var body = table.tBodies[0];
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  var keys = Array.prototype.map.call(table.tHead.querySelectorAll("th[data-key]"), function (th) {
    return th.getAttribute("data-key");
  });
  var key = "latent";
  var dir = 1;
  function value(row) {
    var v = parseFloat(row.getAttribute("data-" + key));
    return isNaN(v) ? null : v;
  }
  function apply() {
    var query = search.value.trim().toLowerCase();
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a), y = value(b);
      if (x === null || y === null) { return (x === null) - (y === null); }
      return dir * (x - y);
    });
    var count = 0;
    rows.forEach(function (row) {
      var text = row.querySelector(".explanation").textContent.toLowerCase();
      row.hidden = query !== "" && text.indexOf(query) < 0;
      if (!row.hidden) { count += 1; }
      body.appendChild(row);
    });
    shown.textContent = count + " of " + rows.length + " latents shown";
    Array.prototype.forEach.call(table.tHead.querySelectorAll("th[data-key]"), function (th) {
      var active = th.getAttribute("data-key") === key;
      th.setAttribute("aria-sort", active ? (dir > 0 ? "ascending" : "descending") : "none");
    });
    var state = new URLSearchParams({sort: key, dir: dir > 0 ? "asc" : "desc", q: search.value});
    history.replaceState(null, "", "#" + state.toString());
  }
  table.tHead.addEventListener("click", function (event) {
    var th = event.target.closest("th[data-key]");
    if (!th) { return; }
    var clicked = th.getAttribute("data-key");
    dir = clicked === key ? -dir : (clicked === "latent" ? 1 : -1);
    key = clicked;
    apply();
  });
  search.addEventListener("input", apply);
  var params = new URLSearchParams(location.hash.slice(1));
  if (keys.indexOf(params.get("sort")) >= 0) { key = params.get("sort"); }
  if (params.get("dir") === "desc") { dir = -1; }
  search.value = params.get("q") || "";
  apply();
})();
"""


@dataclasses.dataclass(frozen=True)
class ContextView:
    """One window: each token's text piece, its raw activation and its 0-10 strength."""

    caption: str
    pieces: Sequence[str]
    activations: Sequence[float]
    scaled: Sequence[int]


@dataclasses.dataclass(frozen=True)
class LatentPage:
    latent: int
    count: int
    frequency: float
    max_activation: float
    histogram_edges: Sequence[float]  # len(counts) + 1 bin edges of the nonzero activations
    histogram_counts: Sequence[int]
    explanations: dict[str, str | None]  # e.g. {"LLM": ..., "baseline": ...}
    scores: dict[str, float | None]  # e.g. {"detection": 0.7, "fuzzing": 0.6}; the index shows these columns
    contexts: Sequence[tuple[str, Sequence[ContextView]]]  # (section title, windows)
    top_logits: Sequence[tuple[str, float]] | None = None  # None: no logit table for this SAE
    bottom_logits: Sequence[tuple[str, float]] | None = None


def page_name(latent: int) -> str:
    return f"latent_{latent:06d}.html"


def write_feature_site(
    folder: str | Path, title: str, pages: Sequence[LatentPage], notes: Sequence[str] = (), logits_note: str = ""
) -> Path:
    """Write `index.html` and one page per latent into `folder`; returns the index path."""
    folder = Path(folder)
    for position, page in enumerate(pages):
        atomic_write_text(folder / page_name(page.latent), _latent_html(title, page, logits_note, position, pages))
    index = folder / "index.html"
    atomic_write_text(index, _index_html(title, pages, notes))
    return index


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _document(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n{tail}</body></html>\n"
    )


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "score"


def _index_html(title: str, pages: Sequence[LatentPage], notes: Sequence[str]) -> str:
    score_names = list(dict.fromkeys(name for page in pages for name in page.scores))
    numeric = [("latent", "latent"), ("frequency", "frequency"), ("count", "count")]
    numeric += [(_key(name), name) for name in score_names]
    head = "".join(f'<th data-key="{_e(key)}" aria-sort="none">{_e(label)}</th>' for key, label in numeric)
    rows = []
    for page in pages:
        values = {"latent": page.latent, "frequency": page.frequency, "count": page.count}
        values.update({_key(name): page.scores.get(name) for name in score_names})
        attributes = "".join(
            f' data-{_e(key)}="{_e("" if values[key] is None else values[key])}"' for key, _ in numeric
        )
        cells = f'<td class="num"><a href="{_e(page_name(page.latent))}">{page.latent}</a></td>'
        cells += "".join(f'<td class="num">{_e(format_value(values[key]))}</td>' for key, _ in numeric[1:])
        explanation = next((text for text in page.explanations.values() if text), "")
        cells += f'<td class="explanation">{_e(explanation)}</td>'
        rows.append(f"<tr{attributes}>{cells}</tr>")
    body = (
        f"<h1>{_e(title)}</h1>"
        + "".join(f'<p class="note">{_e(note)}</p>' for note in notes)
        + '<p><input id="search" type="search" placeholder="search explanations" aria-label="search explanations"> '
        + '<span id="shown"></span></p>'
        + f'<table id="latents"><thead><tr>{head}<th>explanation</th></tr></thead>'
        + f'<tbody>{"".join(rows)}</tbody></table>'
    )
    return _document(title, body, _INDEX_SCRIPT)


def _latent_html(title: str, page: LatentPage, logits_note: str, position: int, pages: Sequence[LatentPage]) -> str:
    nav = ['<a href="index.html">index</a>']
    if position > 0:
        nav.append(f'<a href="{_e(page_name(pages[position - 1].latent))}">previous</a>')
    if position + 1 < len(pages):
        nav.append(f'<a href="{_e(page_name(pages[position + 1].latent))}">next</a>')
    parts = [f"<p>{' · '.join(nav)}</p>", f"<h1>{_e(title)}: latent {page.latent}</h1>"]
    parts += [f'<p><strong>{_e(name)} explanation:</strong> <span class="explanation" data-source="{_e(name)}">'
              f"{_e(text if text else '(none)')}</span></p>" for name, text in page.explanations.items()]
    stats = {"count": page.count, "frequency": page.frequency, "max activation": page.max_activation, **page.scores}
    parts.append('<table class="stats">' + "".join(
        f'<tr><th>{_e(name)}</th><td class="num" data-name="{_e(name)}">{_e(format_value(value))}</td></tr>'
        for name, value in stats.items()) + "</table>")
    parts.append("<h2>Activation density</h2>" + _histogram_svg(page))
    parts.append("<h2>Logit effects</h2>" + _logits_html(page, logits_note))
    for section, views in page.contexts:
        parts.append(f"<h2>{_e(section)}</h2>")
        parts += [context_html(view) for view in views] or ['<p class="note">no windows</p>']
    return _document(f"{title}: latent {page.latent}", "\n".join(parts))


def _histogram_svg(page: LatentPage) -> str:
    counts, edges = list(page.histogram_counts), list(page.histogram_edges)
    if not counts or max(counts) == 0:
        return '<p class="note">the latent never fires on the recorded tokens</p>'
    width, height, bar = 600, 140, 600 / len(counts)
    top = max(counts)
    rects = []
    for i, count in enumerate(counts):
        h = height * count / top
        label = f"[{edges[i]:.4g}, {edges[i + 1]:.4g}): {count}"
        rects.append(
            f'<rect class="bar" x="{i * bar:.2f}" y="{height - h:.2f}" width="{max(bar - 1, 1):.2f}" height="{h:.2f}" '
            f'fill="#4477aa" data-count="{count}" data-lo="{edges[i]:.6g}" data-hi="{edges[i + 1]:.6g}">'
            f"<title>{_e(label)}</title></rect>"
        )
    return (
        f'<svg class="histogram" width="{width}" height="{height + 20}" role="img" '
        f'aria-label="histogram of nonzero activations">{"".join(rects)}'
        f'<text x="0" y="{height + 15}" font-size="11">{edges[0]:.3g}</text>'
        f'<text x="{width}" y="{height + 15}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text></svg>'
        f'<p class="note">{page.count} activating tokens (frequency {format_value(page.frequency)}); '
        "bars: counts of nonzero activation values in equal-width bins</p>"
    )


def _logits_html(page: LatentPage, note: str) -> str:
    if page.top_logits is None or page.bottom_logits is None:
        return f'<p class="note">{_e(note or "no logit effects for this SAE")}</p>'

    def table(cls: str, heading: str, rows: Sequence[tuple[str, float]]) -> str:
        body = "".join(
            f'<tr><td class="tok">{_e(token)}</td><td class="num" data-value="{value:.6g}">{value:+.3f}</td></tr>'
            for token, value in rows
        )
        return f'<div class="logits {cls}"><table><thead><tr><th colspan="2">{_e(heading)}</th></tr></thead>' \
               f"<tbody>{body}</tbody></table></div>"

    return (table("positive", "promoted tokens", page.top_logits)
            + table("negative", "suppressed tokens", page.bottom_logits)
            + (f'<p class="note">{_e(note)}</p>' if note else ""))


def context_html(view: ContextView) -> str:
    spans = []
    for piece, activation, scaled in zip(view.pieces, view.activations, view.scaled, strict=True):
        text = _e(piece.replace("\n", "↵"))
        if scaled > 0:
            spans.append(
                f'<span class="tok act" data-act="{activation:.6g}" data-scaled="{scaled}" '
                f'title="activation {activation:.4g}" style="background:rgba(255,136,0,{scaled / 10:.2f})">'
                f"{text}</span>"
            )
        else:
            spans.append(f'<span class="tok">{text}</span>')
    return f'<div class="ctx" title="{_e(view.caption)}">{"".join(spans)}</div>'
