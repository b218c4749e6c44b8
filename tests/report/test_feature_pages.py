"""Feature pages, checked in headless Chromium: the DOM after the page's own JavaScript ran, and the console.

`Node`/`dom_of` parse a rendered DOM (Python's own HTML parser) for the checks of other report tests too."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser
from pathlib import Path

import pytest

from saelab.report.feature_pages import ContextView, LatentPage, page_name, write_feature_site

SCRIPT = "<script>alert(1)</script>"
VOID = {"meta", "input", "br", "img", "link", "hr"}


@dataclasses.dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = dataclasses.field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and (cls is None or cls in child.attrs.get("class", "").split()):
                    found.append(child)
                found += child.find_all(tag, cls)
        return found


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def dom_of(html_text: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html_text)
    return builder.root


def _view(caption: str, pieces: list[str], activations: list[float]) -> ContextView:
    return ContextView(caption, pieces, activations, [int(10 * a / 4.0 + 0.5) for a in activations])


PAGES = [
    LatentPage(
        latent=3, count=40, frequency=0.2, max_activation=4.0, histogram_edges=[0.0, 2.0, 4.0],
        histogram_counts=[30, 10], explanations={"llm": "kings and <b>queens</b>", "baseline": 'the tokens "king"'},
        scores={"detection": 0.9, "fuzzing": 0.75},
        contexts=[("Top activations", [_view("c1", [" the", " king", SCRIPT, " said"], [0.0, 4.0, 1.0, 0.0])]),
                  ("Quantile 1 of 1", [_view("c2", ["&amp;", " <b>x</b>"], [0.0, 2.0])])],
        top_logits=[(" kingdom", 1.25), (SCRIPT, 0.5)], bottom_logits=[(" the", -0.75), ("\"'", -1.5)],
    ),
    LatentPage(
        latent=7, count=100, frequency=0.5, max_activation=1.0, histogram_edges=[0.0, 1.0], histogram_counts=[100],
        explanations={"llm": SCRIPT}, scores={"detection": 0.6, "fuzzing": None}, contexts=[],
    ),
    LatentPage(
        latent=12, count=20, frequency=0.1, max_activation=2.0, histogram_edges=[0.0, 2.0], histogram_counts=[20],
        explanations={"llm": None, "baseline": "kings of Judah"}, scores={"detection": None, "fuzzing": 0.5},
        contexts=[],
    ),
]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return write_feature_site(tmp_path / "site", "SAE <test>", PAGES, notes=["note & <more>"],
                              logits_note="final norm skipped")


def test_every_text_is_escaped_in_the_files(site: Path) -> None:
    index = site.read_text()
    assert index.count("<script>") == 1  # only the page's own script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in index and "&lt;b&gt;queens&lt;/b&gt;" in index
    page = (site.parent / page_name(3)).read_text()
    assert "<script>" not in page and "<b>" not in page
    expected = ["index.html"] + [page_name(p.latent) for p in PAGES]
    assert sorted(p.name for p in site.parent.iterdir()) == sorted(expected)


def test_index_sorts_and_searches_in_the_browser(site: Path, open_page) -> None:
    _, check = open_page(site.as_uri() + "#sort=frequency&dir=desc&q=KING")
    dom = dom_of(check.dom)
    (table,) = [t for t in dom.find_all("table") if t.attrs.get("id") == "latents"]
    rows = table.find_all("tbody")[0].find_all("tr")
    assert [r.attrs["data-latent"] for r in rows] == ["7", "3", "12"]  # by frequency, descending
    assert [("hidden" in r.attrs) for r in rows] == [True, False, False]  # search is case-insensitive
    assert [r.find_all("td", "explanation")[0].text() for r in rows] == [SCRIPT, "kings and <b>queens</b>",
                                                                         "kings of Judah"]
    assert [r.attrs["data-detection"] for r in rows] == ["0.6", "0.9", ""]
    assert len(dom.find_all("script")) == 1 and not dom.find_all("b")  # the injected markup stayed text
    (shown,) = [s for s in dom.find_all("span") if s.attrs.get("id") == "shown"]
    assert shown.text() == "2 of 3 latents shown"
    sorted_by = {th.attrs["data-key"]: th.attrs["aria-sort"] for th in dom.find_all("th") if "data-key" in th.attrs}
    assert sorted_by["frequency"] == "descending" and sorted_by["latent"] == "none"


def test_latent_page_shows_the_data(site: Path, open_page) -> None:
    _, check = open_page(site.parent / page_name(3))
    dom = dom_of(check.dom)
    contexts = dom.find_all("div", "ctx")
    assert len(contexts) == 2
    first = contexts[0].find_all("span", "tok")
    assert [s.text() for s in first] == [" the", " king", SCRIPT, " said"]
    view = PAGES[0].contexts[0][1][0]
    expected = [(p, a, v) for p, a, v in zip(view.pieces, view.activations, view.scaled, strict=True) if a > 0]
    marked = contexts[0].find_all("span", "act")
    assert [(s.text(), float(s.attrs["data-act"]), int(s.attrs["data-scaled"])) for s in marked] == expected
    assert expected == [(" king", 4.0, 10), (SCRIPT, 1.0, 3)]
    assert [s.text() for s in contexts[1].find_all("span", "tok")] == ["&amp;", " <b>x</b>"]
    assert not dom.find_all("b")  # no element was made from token or explanation text
    assert [int(r.attrs["data-count"]) for r in dom.find_all("rect", "bar")] == [30, 10]
    logit_rows = [tr for div in dom.find_all("div", "logits") for tr in div.find_all("tbody")[0].find_all("tr")]
    assert [(tr.find_all("td")[0].text(), float(tr.find_all("td")[1].attrs["data-value"])) for tr in logit_rows] == [
        (" kingdom", 1.25), (SCRIPT, 0.5), (" the", -0.75), ("\"'", -1.5)]
    explanations = {s.attrs["data-source"]: s.text() for s in dom.find_all("span", "explanation")}
    assert explanations == {"llm": "kings and <b>queens</b>", "baseline": 'the tokens "king"'}
    stats = {td.attrs["data-name"]: td.text() for td in dom.find_all("td") if "data-name" in td.attrs}
    assert stats["detection"] == "0.9" and stats["count"] == "40" and stats["fuzzing"] == "0.75"
    assert not dom.find_all("script")
