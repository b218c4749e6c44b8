"""The browser check itself: it must see what a reader would see as broken, and nothing on a sound page."""

from __future__ import annotations

from pathlib import Path

from saelab.report.chromium import _broken_links


def test_a_sound_page_has_no_problems(open_page, tmp_path: Path) -> None:
    (tmp_path / "other.html").write_text("<!DOCTYPE html><title>o</title><p>other</p>")
    page = tmp_path / "page.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
                    '<p id="here">x</p><a href="other.html">o</a><a href="#here">h</a><a href="#sort=a&q=b">s</a>'
                    '<script>document.body.setAttribute("data-n", String(6 * 7));</script></body></html>')
    tab, check = open_page(page)
    assert check.problems == [] and tab.evaluate("document.body.dataset.n") == "42"
    assert check.load_ms > 0 and 'data-n="42"' in check.dom


def test_every_kind_of_breakage_is_reported(open_page, tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><a href="missing.html">m</a><a href="#nowhere">n</a>'
                    '<img src="missing.png" alt="m"><script>console.error("boom"); undefinedFunction();</script>'
                    '<script src="missing.js"></script></body></html>')
    _, check = open_page(page, clean=False)
    assert check.console_errors[0] == "boom"
    assert "ReferenceError: undefinedFunction is not defined" in check.console_errors[1]
    assert len(check.console_errors) == 2
    missing = {(tmp_path / name).as_uri() for name in ("missing.png", "missing.js")}
    assert {line.split(": ")[0] for line in check.failed_requests} == missing
    assert all(line.endswith("net::ERR_FILE_NOT_FOUND") for line in check.failed_requests)
    assert check.broken_images == [(tmp_path / "missing.png").as_uri()]
    assert check.broken_links == [(tmp_path / "missing.html").as_uri(), page.as_uri() + "#nowhere"]


def test_link_rules_without_a_browser(tmp_path: Path) -> None:
    (tmp_path / "there.html").write_text("x")
    page = (tmp_path / "p.html").as_uri()
    links = [(tmp_path / "there.html").as_uri(), (tmp_path / "gone.html").as_uri(), page + "#a", page + "#b",
             page + "#latent=3", "https://example.org/x"]
    assert _broken_links(page, links, {"a"}) == [(tmp_path / "gone.html").as_uri(), page + "#b"]
