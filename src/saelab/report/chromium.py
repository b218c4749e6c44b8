"""Open pages in headless Chromium and see what a reader would: console errors, failed requests, the DOM.

Talks the DevTools protocol over `--remote-debugging-pipe` (JSON messages separated by NUL bytes on file
descriptors 3 and 4), so it needs only the `chromium` binary: no websocket client and no driver. Used by the tests
that check every report in a real browser and by the load-time benchmark of the feature browser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from saelab.errors import SaelabError

BINARIES = ("chromium", "chromium-browser", "google-chrome", "chrome")

# Broken images, and every link with its resolved URL, read from the page after it settled.
_AUDIT = """(() => ({
  images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.currentSrc || i.src),
  links: Array.from(document.querySelectorAll("a[href]")).map(a => a.href),
  ids: Array.from(document.querySelectorAll("[id]")).map(e => e.id),
}))()"""


class BrowserError(SaelabError):
    """Chromium is missing, did not start, or a page did not load in time."""


def find_chromium() -> str | None:
    """Path of a Chromium-family binary on PATH, or None."""
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


@dataclasses.dataclass
class PageCheck:
    """What loading one page produced."""

    url: str
    console_errors: list[str]  # console.error/assert calls, uncaught exceptions, error-level log entries
    failed_requests: list[str]  # "URL: net::ERR_..." for every request that failed, HTTP errors included
    broken_images: list[str]
    broken_links: list[str]  # file:// links to missing files, and #fragments naming no element of this page
    dom: str  # document.documentElement.outerHTML once loaded (and `ready` held)
    load_ms: float  # navigation start to the load event, plus the wait for `ready`

    @property
    def problems(self) -> list[str]:
        return ([f"console: {m}" for m in self.console_errors] + [f"request: {m}" for m in self.failed_requests]
                + [f"image: {m}" for m in self.broken_images] + [f"link: {m}" for m in self.broken_links])


class Chromium:
    """One headless Chromium process; `open` loads a page in a fresh tab and returns a `Page`.

    Use as a context manager (the process is closed on exit)."""

    def __init__(self, binary: str | None = None, timeout_s: float = 60.0) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium on PATH; install it (Debian: apt-get install -y chromium)")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="saelab-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire() -> None:  # in the child: the protocol's pipe ends become fds 3 (commands) and 4 (replies)
            commands, replies = os.dup(to_browser_read), os.dup(from_browser_write)
            os.dup2(commands, 3)
            os.dup2(replies, 4)

        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}", "about:blank"],
            preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._send("Browser.close")
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, BrowserError):
                self._process.kill()
                self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._profile.cleanup()

    # ---- the protocol -------------------------------------------------------------------------------------

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _receive(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium exited")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Send a command and return its result; events that arrive meanwhile go to `events`."""
        sent = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._receive(deadline)
            if message.get("id") == sent:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            if events is not None:
                events.append(message)

    def open(self, url: str, ready: str | None = None, width: int = 1280, height: int = 900) -> Page:
        """Load `url` in a new tab; with `ready` (a JavaScript expression), also wait until it is truthy."""
        events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"}, events=events)["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True}, events=events)["sessionId"]
        page = Page(self, session, target, url)
        for domain in ("Page", "Runtime", "Network", "Log"):
            page.call(f"{domain}.enable")
        page.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        page.events.clear()  # what about:blank did is not the page's
        started = time.perf_counter()
        page.call("Page.navigate", {"url": url})
        page.wait_for_event("Page.loadEventFired")
        if ready is not None:
            page.wait_until(ready)
        page.load_ms = 1000 * (time.perf_counter() - started)
        return page


class Page:
    """One loaded tab: run JavaScript in it, wait for conditions, take screenshots, and check it."""

    def __init__(self, browser: Chromium, session: str, target: str, url: str) -> None:
        self.browser, self.session, self.target, self.url = browser, session, target, url
        self.events: list[dict[str, Any]] = []
        self.load_ms = 0.0

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session, self.events)

    def wait_for_event(self, method: str) -> None:
        deadline = time.monotonic() + self.browser.timeout_s
        while not any(e.get("method") == method and e.get("sessionId") == self.session for e in self.events):
            self.events.append(self.browser._receive(deadline))

    def evaluate(self, expression: str) -> Any:
        """The JSON value of `expression` in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]!r} threw: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.browser.timeout_s)
        while not self.evaluate(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise BrowserError(f"{self.url}: {expression!r} did not become true in time")
            time.sleep(0.02)

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        import base64

        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        if full_page:
            size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            params["clip"] = {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}
        data = self.call("Page.captureScreenshot", params)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def check(self) -> PageCheck:
        """Everything a reader would notice as broken, from the events so far and the page's current state."""
        console, failed = [], []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if event.get("sessionId") not in (None, self.session):
                continue
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                console.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                if entry.get("source") != "network":  # network failures are listed as failed requests
                    console.append(entry["text"])
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                failed.append(f"{_request_url(self.events, params['requestId'])}: {params['errorText']}")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400:
                failed.append(f"{params['response']['url']}: HTTP {params['response']['status']}")
        audit = self.evaluate(_AUDIT)
        return PageCheck(
            url=self.url, console_errors=console, failed_requests=failed, broken_images=audit["images"],
            broken_links=_broken_links(self.url, audit["links"], set(audit["ids"])),
            dom=self.evaluate("document.documentElement.outerHTML"), load_ms=self.load_ms,
        )

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})


def _request_url(events: list[dict[str, Any]], request_id: str) -> str:
    for event in events:
        if event.get("method") == "Network.requestWillBeSent" and event["params"]["requestId"] == request_id:
            return event["params"]["request"]["url"]
    return f"request {request_id}"


def _broken_links(page_url: str, links: list[str], ids: set[str]) -> list[str]:
    """Links to missing local files, and links to #fragments of this page that name no element."""
    page = urlsplit(page_url)
    broken = []
    for link in links:
        parts = urlsplit(link)
        same_page = (parts.scheme, parts.netloc, parts.path) == (page.scheme, page.netloc, page.path)
        if parts.scheme == "file" and not same_page and not Path(unquote(parts.path)).exists():
            broken.append(link)
        elif same_page and parts.fragment and "=" not in parts.fragment and unquote(parts.fragment) not in ids:
            broken.append(link)  # "#a=b" fragments are page state read by the page's script, not anchors
    return broken


def check_page(url: str, ready: str | None = None, browser: Chromium | None = None) -> PageCheck:
    """Load `url` once and report what is broken (a fresh Chromium unless `browser` is given)."""
    if browser is not None:
        page = browser.open(url, ready)
        try:
            return page.check()
        finally:
            page.close()
    with Chromium() as own:
        return check_page(url, ready, own)
