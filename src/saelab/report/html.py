"""A self-contained one-page HTML report: headings, text, tables and figures (PNG embedded as data URIs).

Every experiment writes its results through this one builder so reports look alike and every piece of text is
escaped (tokens such as `<script>` come straight from corpora).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.io import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}h2{font-size:1.25em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f3f3f3}td.text,th.text{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}.note{color:#555;font-size:.9em}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.82em;white-space:pre-wrap;border:1px solid #eee;
padding:.25em .5em;margin:.2em 0}.act{border-radius:2px}.tok{white-space:pre-wrap}svg .bar{fill:#4477aa}
svg .dead{fill:#aa3377}.latent{margin:1em 0 .3em;font-size:.95em}
"""


def format_value(value: Any) -> str:
    """Numbers to 4 significant digits (floats) so tables stay readable; everything else via str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.4g}"
    return str(value)


@dataclass
class Report:
    title: str
    _parts: list[str] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self._parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self._parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
              caption: str | None = None) -> None:
        if not rows:
            return
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th{_cls(rows[0].get(c))}>{html.escape(str(c))}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td{_cls(r.get(c))}>{html.escape(format_value(r.get(c, '')))}</td>" for c in columns)
            + "</tr>"
            for r in rows
        )
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def key_values(self, values: Mapping[str, Any], caption: str | None = None) -> None:
        self.table([{"name": k, "value": v} for k, v in values.items()], caption=caption)

    def figure(self, png_path: str | Path, caption: str = "") -> None:
        data = base64.b64encode(Path(png_path).read_bytes()).decode("ascii")
        self._parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )

    def fragment(self, markup: str) -> None:
        """Markup built by another builder of this package (which escapes its own text), e.g. an inline SVG."""
        self._parts.append(markup)

    def link(self, href: str, text: str, before: str = "", after: str = "") -> None:
        """A paragraph `before <a href>text</a> after`, every part escaped."""
        self._parts.append(f"<p>{html.escape(before)}<a href=\"{html.escape(href, quote=True)}\">{html.escape(text)}"
                           f"</a>{html.escape(after)}</p>")

    def code(self, obj: Any) -> None:
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str)
        self._parts.append(f"<pre>{html.escape(text)}</pre>")

    def render(self) -> str:
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>\n"
            + "\n".join(self._parts)
            + "\n</body></html>\n"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.render())
        return path


def _cls(value: Any) -> str:
    return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else ' class="text"'
