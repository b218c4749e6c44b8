"""The feature browser: a static site in `<run>/features/` that opens from disk (file://) with no server.

    features/index.html          the page: density histogram, latent table, latent panel (logic in feature_browser.js)
    features/data/index.js       saelabIndex({...}): every latent's count, max activation, explanation, scores
    features/data/chunk_NNNNN.js saelabChunk({...}): windows, histograms, logits, layer norms of `chunk_size` latents

Data files are scripts rather than JSON because Chromium refuses fetch() on file:// pages; the page loads the index
at once and a chunk only when one of its latents is opened, so 100k latents cost one ~1 MB index and nothing more
until a latent is chosen. The table is paginated and sorted in the page. All text reaches the page as JSON data and
is set with textContent, and every piece of this file's own markup is escaped, so a token such as `<script>` shows
as text. The same density histogram and window rendering serve the reports that show a few features inline.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from saelab.io import atomic_write_text
from saelab.report.feature_pages import ContextView, context_html
from saelab.report.html import format_value

ASSETS = Path(__file__).parent
INDEX_NAME = "index.html"
DATA_FOLDER = "data"

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#1d1d1f;line-height:1.4}
h1{font-size:1.4em;border-bottom:2px solid #ddd;padding-bottom:.3em;margin-top:0}h2{font-size:1.2em;margin:.2em 0}
h3{font-size:1em;margin:1.2em 0 .3em}.note{color:#555;font-size:.88em}
.layout{display:flex;gap:2em;align-items:flex-start}.list{flex:0 0 auto;max-width:48%}.panel{flex:1 1 auto;min-width:0}
table{border-collapse:collapse;font-size:.88em}th,td{border:1px solid #ccc;padding:.2em .45em}td.num{text-align:right}
th[data-key]{cursor:pointer;background:#f3f3f3}th[aria-sort=ascending]::after{content:" \\25B2"}
th[aria-sort=descending]::after{content:" \\25BC"}tr.selected td{background:#fff4e0}
td.explanation{max-width:22em}input[type=search]{font-size:1em;padding:.25em;width:18em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.84em;white-space:pre-wrap;border:1px solid #eee;
padding:.3em .5em;margin:.25em 0}.tok{white-space:pre-wrap}.act{border-radius:2px;cursor:default}
.logit-pair{display:flex;gap:2em}svg .bar{fill:#4477aa}svg .dead{fill:#aa3377}
.normbar{display:inline-block;height:.7em}.normbar.encoder{background:#4477aa}.normbar.decoder{background:#228833}
"""


def js_data(function: str, data: Any) -> str:
    """`function(<data as JSON>);`: a data file a page can load with <script src> even from file://. "<" is
    written as \\u003c, so no text in it can close a script element even if the data is ever inlined."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return f"{function}({text});\n"


def density_svg(density: Mapping[str, Any], width: int = 640, height: int = 150) -> str:
    """The density histogram: latents per bin of log10 firing frequency, dead latents as a separate bar at the
    left. Each bar carries its count (data-count) and a hover title."""
    counts, edges, dead = list(density["counts"]), list(density["edges"]), int(density["dead"])
    top = max(counts + [dead, 1])
    gap = 24  # between the dead bar and the histogram
    bar = (width - gap) / (len(counts) + 1)
    rects = [_bar("dead", 0, bar, dead, top, height,
                  f"dead (never fire on {density['n_tokens']:,} tokens): {dead}")]
    for i, count in enumerate(counts):
        rects.append(_bar("bar", bar + gap + i * bar, bar, count, top, height,
                          f"log10 frequency [{edges[i]:.3g}, {edges[i + 1]:.3g}): {count}"))
    ticks = []
    for tick in range(math.ceil(edges[0]), 1):
        x = bar + gap + (tick - edges[0]) / (edges[-1] - edges[0]) * (width - bar - gap)
        anchor = "end" if tick == 0 else "middle"
        ticks.append(f'<text x="{x:.1f}" y="{height + 14}" font-size="11" text-anchor="{anchor}">{tick}</text>')
    return (
        f'<svg class="density" width="{width}" height="{height + 32}" role="img" '
        f'aria-label="density histogram: latents per log10 firing frequency">{"".join(rects)}'
        f'<text x="0" y="{height + 14}" font-size="11">dead</text>{"".join(ticks)}'
        f'<text x="{width / 2 + bar:.1f}" y="{height + 29}" font-size="11" text-anchor="middle">'
        "log10 firing frequency (fraction of recorded tokens)</text></svg>"
        f'<p class="note">{density["alive"]:,} latents fire, {dead:,} never fire (dead), on '
        f"{density['n_tokens']:,} recorded tokens.</p>"
    )


def _bar(cls: str, x: float, width: float, count: int, top: int, height: int, title: str) -> str:
    h = height * count / top
    return (f'<rect class="{cls}" x="{x:.2f}" y="{height - h:.2f}" width="{max(width - 1, 1):.2f}" '
            f'height="{h:.2f}" data-count="{count}"><title>{html.escape(title)}</title></rect>')


def window_views(entry: Mapping[str, Any], strings: Sequence[str], windows: Sequence[Mapping[str, Any]]
                 ) -> list[ContextView]:
    """Windows of one latent's chunk entry as `ContextView`s (for the inline HTML of `context_html`)."""
    scale = float(entry["max"]) or 1.0
    return [
        ContextView(
            f"context {w['context']}, from position {w['start']}", [strings[t] for t in w["tokens"]], w["acts"],
            [0 if a <= 0 else max(1, min(10, int(10 * a / scale + 0.5))) for a in w["acts"]],
        )
        for w in windows
    ]


def windows_html(entry: Mapping[str, Any], strings: Sequence[str], windows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(context_html(view) for view in window_views(entry, strings, windows))


def latent_html(latent: int, entry: Mapping[str, Any], strings: Sequence[str], n_tokens: int, href: str,
                windows: int = 3) -> str:
    """One latent inline: its numbers, a link to its panel in the browser, and its strongest windows."""
    count = int(entry["count"])
    line = (f'<p class="latent" data-latent="{latent}" data-count="{count}" data-max="{entry["max"]}">'
            f'<a href="{html.escape(href, quote=True)}">latent {latent}</a>: density '
            f"{format_value(count / n_tokens)} ({count:,} of {n_tokens:,} tokens), max activation "
            f"{format_value(float(entry['max']))}</p>")
    return line + windows_html(entry, strings, entry.get("top", [])[:windows])


def write_feature_browser(folder: str | Path, index: Mapping[str, Any],
                          chunks: Iterable[tuple[int, Mapping[str, Any]]]) -> Path:
    """Write the site into `folder` (see the module docstring); returns the path of its index.html.

    `index` and `chunks` are `saelab.interp.feature_data.FeatureData`'s `index()` and `chunks()`. Chunk files a
    previous, larger browser left behind are removed."""
    folder = Path(folder)
    data = folder / DATA_FOLDER
    data.mkdir(parents=True, exist_ok=True)
    written = set()
    for number, chunk in chunks:
        name = f"chunk_{number:05d}.js"
        atomic_write_text(data / name, js_data("saelabChunk", chunk))
        written.add(name)
    for stale in data.glob("chunk_*.js"):
        if stale.name not in written:
            stale.unlink()
    atomic_write_text(data / "index.js", js_data("saelabIndex", index))
    page = folder / INDEX_NAME
    atomic_write_text(page, _page(index))
    return page


def _page(index: Mapping[str, Any]) -> str:
    e = html.escape
    notes = "".join(f'<p class="note">{e(note)}</p>' for note in index["notes"])
    facts = (f"{index['architecture']} SAE at {index['hookpoint']}: {index['n_latents']:,} latents, "
             f"{index['n_tokens']:,} recorded tokens.")
    if index["explanation"]:
        facts += f" {len(index['explanation']):,} latents explained by autointerp."
    help_text = ("Click a column to sort, search explanations (or type a latent number), click a latent to see what "
                 "it fires on; tokens are shaded by activation (hover for the value). The view is kept in the "
                 "address, so it can be bookmarked.")
    body = (
        f"<h1>{e(index['title'])}</h1><p>{e(facts)}</p>{notes}"
        f"<h2>Activation density</h2>{density_svg(index['density'])}"
        f'<p class="note">{e(help_text)}</p>'
        '<div class="layout"><div class="list">'
        '<p><input id="search" type="search" placeholder="search explanations or a latent number" '
        'aria-label="search explanations or a latent number"> <button id="prev" type="button">previous</button> '
        '<button id="next" type="button">next</button> <span id="shown" class="note"></span></p>'
        '<table id="latents"><thead><tr></tr></thead><tbody></tbody></table></div>'
        '<div class="panel" id="panel"><p class="note">loading the index\u2026</p></div></div>'
        f'<noscript><p>{e("The feature browser needs JavaScript.")}</p></noscript>'
    )
    script = (ASSETS / "feature_browser.js").read_text()
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(index["title"])}</title>'
        f"<style>{_STYLE}</style></head><body>\n{body}\n<script>{script}</script>"
        f'<script src="{DATA_FOLDER}/index.js"></script></body></html>\n'
    )
