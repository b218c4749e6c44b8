"""Serve a run folder on the loopback interface, for browsers that refuse pages opened from file://.

Read-only (GET and HEAD of the folder's files), bound to 127.0.0.1 by default, on a free port unless one is asked
for. The caller is told the address through `on_ready` once the socket listens; serving stops on KeyboardInterrupt.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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
        on_ready(f"http://{bound_host}:{bound_port}/")
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
