"""The feature browser site in headless Chromium, from file://: the table, its sorting, search and pages, and the
latent panel loaded lazily from its chunk, every number equal to the data and every text shown as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from saelab.report.feature_browser import density_svg, js_data, write_feature_browser

SCRIPT = "<script>alert(1)</script>"
N_LATENTS, CHUNK, N_TOKENS = 130, 16, 1000
STRINGS = [" the", " king", SCRIPT, "\n", " <b>bold</b>"]


def _count(latent: int) -> int:
    return 0 if latent % 10 == 9 else (latent * 37) % 200 + 1


def _entry(latent: int) -> dict[str, Any]:
    count = _count(latent)
    entry: dict[str, Any] = {"count": count, "max": round(1 + latent / 7, 3),
                             "layers": {"encoder": [0.5, 1.5], "decoder": [2.0, 0.25]}}
    if count:
        window = {"context": latent, "start": 3, "tokens": [0, 1, 2, 3, 4], "acts": [0.0, entry["max"], 0.5, 0.0, 0.25]}
        entry.update({
            "histogram": {"edges": [0.0, entry["max"] / 2, entry["max"]], "counts": [count - 1, 1]},
            "top": [window], "quantiles": [[{**window, "start": 9}], []],
            "logits": {"top": [[1, 1.25], [2, 0.5]], "bottom": [[4, -0.75]]},
        })
    return entry


def _data() -> tuple[dict[str, Any], list[tuple[int, dict[str, Any]]]]:
    counts = [_count(i) for i in range(N_LATENTS)]
    index = {
        "title": "SAE <i>test</i>", "notes": ["a note & <u>markup</u>"], "architecture": "topk",
        "hookpoint": "resid_post.1", "n_latents": N_LATENTS, "n_tokens": N_TOKENS, "chunk_size": CHUNK,
        "n_chunks": -(-N_LATENTS // CHUNK), "count": counts, "max": [_entry(i)["max"] for i in range(N_LATENTS)],
        "explanation": {"3": "kings and " + SCRIPT, "40": "the word KING", "41": "queens"},
        "scores": {"detection": {"3": 0.9, "40": 0.6}},
        "density": {"edges": [-3.0, -2.0, -1.0, 0.0], "counts": [5, 60, 52], "dead": 13, "alive": 117,
                    "n_tokens": N_TOKENS},
        "logits": True, "layers": [0, 3],
    }
    chunks = []
    for number in range(index["n_chunks"]):
        latents = range(number * CHUNK, min((number + 1) * CHUNK, N_LATENTS))
        chunks.append((number, {"chunk": number, "first": number * CHUNK, "strings": STRINGS,
                                "latents": {str(i): _entry(i) for i in latents}}))
    return index, chunks


@pytest.fixture
def site(tmp_path: Path) -> Path:
    index, chunks = _data()
    return write_feature_browser(tmp_path / "features", index, chunks)


def _rows(page) -> list[dict[str, Any]]:
    return page.evaluate("""Array.from(document.querySelectorAll('#latents tbody tr')).map(r => ({
        latent: +r.dataset.latent, cells: Array.from(r.cells).map(c => c.textContent),
        density: +r.cells[1].dataset.value}))""")


def test_files_are_scripts_and_hold_no_raw_markup(site: Path) -> None:
    data = site.parent / "data"
    assert sorted(p.name for p in data.iterdir()) == [f"chunk_{i:05d}.js" for i in range(9)] + ["index.js"]
    text = (data / "index.js").read_text()
    assert text.startswith("saelabIndex(") and text.endswith(");\n") and "<" not in text  # JSON escapes it
    assert json.loads(text[len("saelabIndex("):-3])["count"][:3] == [1, 38, 75]
    page = site.read_text()
    assert "SAE &lt;i&gt;test&lt;/i&gt;" in page and "&lt;u&gt;markup&lt;/u&gt;" in page and "<i>" not in page
    assert js_data("f", {"a": "</script>"}) == 'f({"a":"\\u003c/script>"});\n'


def test_rewriting_a_smaller_browser_removes_stale_chunks(site: Path) -> None:
    index, chunks = _data()
    write_feature_browser(site.parent, {**index, "n_chunks": 2}, chunks[:2])
    assert sorted(p.name for p in (site.parent / "data").iterdir()) == ["chunk_00000.js", "chunk_00001.js",
                                                                        "index.js"]


def test_density_histogram_bars_are_the_counts() -> None:
    svg = density_svg({"edges": [-2.0, -1.0, 0.0], "counts": [3, 4], "dead": 2, "alive": 7, "n_tokens": 100})
    assert svg.count("<rect") == 3 and 'class="dead"' in svg
    assert [int(part.split('"')[0]) for part in svg.split('data-count="')[1:]] == [2, 3, 4]


def test_table_pages_sorts_and_searches(site: Path, open_page) -> None:
    page, check = open_page(site, ready="document.body.dataset.ready")
    index, _ = _data()
    rows = _rows(page)
    assert [r["latent"] for r in rows] == list(range(50))  # first page of 50, by latent
    for row in rows:  # numbers on the page are the data's
        latent = row["latent"]
        assert row["cells"][2] == str(index["count"][latent])
        assert row["density"] == pytest.approx(index["count"][latent] / N_TOKENS)
        assert float(row["cells"][1]) == pytest.approx(index["count"][latent] / N_TOKENS, rel=1e-3)
        assert float(row["cells"][3]) == pytest.approx(index["max"][latent], rel=1e-3)
    assert rows[3]["cells"][-1] == "kings and " + SCRIPT and rows[3]["cells"][4] == "0.9"
    assert page.evaluate("document.getElementById('shown').textContent") == "130 of 130 latents; page 1 of 3"
    density = page.evaluate("Array.from(document.querySelectorAll('svg.density rect')).map(r => +r.dataset.count)")
    assert density == [13, 5, 60, 52]

    page.evaluate("document.getElementById('next').click()")
    assert [r["latent"] for r in _rows(page)] == list(range(50, 100))
    page.evaluate("document.querySelector('th[data-key=count]').click()")  # descending first
    by_count = sorted(range(N_LATENTS), key=lambda i: (-index["count"][i], i))
    assert [r["latent"] for r in _rows(page)] == by_count[:50]
    assert "sort=count" in page.evaluate("location.hash") and "page=0" in page.evaluate("location.hash")
    page.evaluate("document.querySelector('th[data-key=count]').click()")  # then ascending
    assert [r["latent"] for r in _rows(page)] == sorted(range(N_LATENTS), key=lambda i: (index["count"][i], i))[:50]

    page.evaluate("""(() => { const s = document.getElementById('search'); s.value = 'KING';
                     s.dispatchEvent(new Event('input')); })()""")
    assert sorted(r["latent"] for r in _rows(page)) == [3, 40]  # case-insensitive, in explanations
    page.evaluate("""(() => { const s = document.getElementById('search'); s.value = '41';
                     s.dispatchEvent(new Event('input')); })()""")
    assert [r["latent"] for r in _rows(page)] == [41]  # a number finds the latent
    assert page.evaluate("document.querySelectorAll('script').length") == 2  # the page's own two
    assert page.evaluate("document.querySelectorAll('b, i, u').length") == 0
    assert page.check().problems == []


def test_state_in_the_address_and_the_latent_panel(site: Path, open_page) -> None:
    page, _ = open_page(site.as_uri() + "#sort=detection&dir=desc&q=&page=0&latent=3",
                        ready="document.getElementById('panel').dataset.latent === '3'")
    assert [r["latent"] for r in _rows(page)][:2] == [3, 40]  # scored latents first, best first
    panel = page.evaluate("""(() => { const p = document.getElementById('panel'); return {
        heading: p.querySelector('h2').textContent,
        stats: Object.fromEntries(Array.from(p.querySelectorAll('.stats td')).map(td => [td.dataset.name,
                                                                                         td.textContent])),
        windows: Array.from(p.querySelectorAll('.ctx')).map(w => Array.from(w.children).map(s => ({
            text: s.textContent, act: s.dataset.act === undefined ? null : +s.dataset.act, title: s.title}))),
        histogram: Array.from(p.querySelectorAll('svg.histogram rect')).map(r => +r.dataset.count),
        logits: Array.from(p.querySelectorAll('table.logits tbody tr')).map(r => [r.cells[0].textContent,
                                                                                 +r.cells[1].dataset.value]),
        layers: Array.from(p.querySelectorAll('table.layers tbody tr')).map(r => [+r.cells[0].textContent,
            +r.cells[1].dataset.value, +r.cells[2].dataset.value]),
        headings: Array.from(p.querySelectorAll('h3')).map(h => h.textContent),
        scripts: p.querySelectorAll('script, b').length}; })()""")
    entry = _entry(3)
    assert panel["heading"] == "Latent 3" and panel["scripts"] == 0
    assert panel["stats"]["count"] == str(entry["count"]) and float(panel["stats"]["max activation"]) == entry["max"]
    assert panel["stats"]["explanation"] == "kings and " + SCRIPT and panel["stats"]["detection"] == "0.9"
    assert len(panel["windows"]) == 2  # the top window and quantile 1's
    tokens = panel["windows"][0]
    assert [t["text"] for t in tokens] == [" the", " king", SCRIPT, "\u21b5", " <b>bold</b>"]
    assert [t["act"] for t in tokens] == [None, entry["max"], 0.5, None, 0.25]
    assert tokens[1]["title"] == f"activation {entry['max']}" and tokens[0]["title"] == ""
    assert panel["histogram"] == entry["histogram"]["counts"]
    assert panel["logits"] == [[" king", 1.25], [SCRIPT, 0.5], [" <b>bold</b>", -0.75]]
    assert panel["layers"] == [[0, 0.5, 2.0], [3, 1.5, 0.25]]
    assert panel["headings"][-1] == "Quantile 1 of 2 (1 = weakest)"

    page.evaluate("location.hash = '#latent=129'")  # the last chunk, and a dead latent
    page.wait_until("document.getElementById('panel').dataset.latent === '129'")
    assert "never fires" in page.evaluate("document.getElementById('panel').textContent")
    loaded = page.evaluate("Array.from(document.querySelectorAll('script[src]')).map(s => s.getAttribute('src'))")
    assert sorted(loaded) == ["data/chunk_00000.js", "data/chunk_00008.js", "data/index.js"]  # only those opened
    assert page.check().problems == []


def test_a_missing_chunk_is_reported_on_the_page(site: Path, open_page) -> None:
    (site.parent / "data" / "chunk_00002.js").unlink()
    page, check = open_page(site.as_uri() + "#latent=40", ready="document.body.dataset.ready", clean=False)
    page.wait_until("document.getElementById('panel').textContent.includes('could not load')")
    assert [p.split(": ")[-1] for p in page.check().problems] == ["net::ERR_FILE_NOT_FOUND"]
