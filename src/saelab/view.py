"""`saelab view RUN_DIR`: serve a run folder on 127.0.0.1 and say where its pages are; Ctrl-C stops it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from saelab.config import Config
from saelab.errors import ConfigError
from saelab.report.serve import serve

PAGES = ("report.html", "features/index.html")  # listed first when present


@dataclasses.dataclass
class ViewConfig(Config):
    run_dir: str = dataclasses.field(metadata={"positional": True, "help": "run folder to serve (e.g. runs/demo)"})
    port: int = dataclasses.field(default=0, metadata={"help": "port to listen on (0: a free one)"})
    host: str = dataclasses.field(default="127.0.0.1", metadata={"help": "address to listen on (loopback only by "
                                                                        "default)"})

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("view needs a run folder: saelab view RUN_DIR")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port {self.port} is not a port number (0-65535; 0 picks a free one)")


def view(cfg: ViewConfig) -> None:
    """Serve until Ctrl-C, printing the address and the folder's report pages (a command's own output)."""
    folder = Path(cfg.run_dir)
    pages = [page for page in PAGES if (folder / page).is_file()]
    pages += sorted(str(p.relative_to(folder)) for p in folder.glob("**/index.html")
                    if str(p.relative_to(folder)) not in pages)[:20]

    def announce(url: str) -> None:
        print(f"serving {folder.resolve()} at {url} (Ctrl-C stops)", flush=True)
        for page in pages:
            print(f"  {url}{page}", flush=True)

    serve(folder, cfg.host, cfg.port, announce)
    print("stopped", file=sys.stderr, flush=True)
