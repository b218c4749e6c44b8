"""Serve a run folder on the loopback interface, for browsers that refuse pages opened from file://.

Read-only (GET and HEAD of the folder's files), bound to 127.0.0.1 by default, on a free port unless one is asked
for. The caller is told the address through `on_ready` once the socket listens; serving stops on Ctrl-C (SIGINT)
or SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # a request log would drown the address in the terminal


class _Server(ThreadingHTTPServer):
    # Closing does not wait for open connections: a browser keeps speculative ones open without sending a request,
    # and their handler threads (daemons) would hold Ctrl-C's stop until the browser gave them up.
    block_on_close = False


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A listening server of `folder`'s files (port 0: a free port; read it from `server.server_address`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; pass a run folder (e.g. runs/demo)")
    try:
        return _Server((host, port), functools.partial(_QuietHandler, directory=str(folder)))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port, or 0 for "
                          "a free one") from None


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 0,
          on_ready: Callable[[str], None] = lambda url: None) -> None:
    """Serve `folder` until interrupted (Ctrl-C), calling `on_ready(base_url)` once listening."""
    server = make_server(folder, host, port)
    bound_host, bound_port = server.server_address[:2]
    try:
        with _stoppable():
            on_ready(f"http://{bound_host}:{bound_port}/")
            server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stoppable() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt while serving. A process started with SIGINT ignored (as children
    of some launchers and of shells running jobs in the background are) keeps ignoring it in Python, so Ctrl-C
    would never stop the server; set here, it does. Only the main thread can set handlers: elsewhere, as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
