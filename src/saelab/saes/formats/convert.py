"""`saelab convert SRC DST --to saelens|sparsify|saelab`: read an SAE in any known format, write it in another."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from saelab.config import Config
from saelab.errors import ConfigError


@dataclasses.dataclass
class ConvertConfig(Config):
    src: str = dataclasses.field(metadata={"positional": True, "help": "SAE folder in any format saelab reads "
                                           "(saelab, saelens, sparsify, dictionary_learning, gemma_scope)"})
    dst: str = dataclasses.field(metadata={"positional": True, "help": "folder to write (must not exist unless "
                                           "--overwrite); for sparsify, name it after the hookpoint (layers.3)"})
    to: Literal["saelens", "sparsify", "saelab"] | None = dataclasses.field(
        default=None, metadata={"help": "format to write: saelens, sparsify or saelab (required)"})
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing DST (atomically)"})
    norm_scaling_factor: float | None = dataclasses.field(default=None, metadata={
        "help": "for a SAELens SAE trained with normalize_activations=expected_average_only_in: its dataset "
                "constant (SAELens lists it in its pretrained-SAE directory)"})

    def validate(self) -> None:
        if not self.src or not self.dst:
            raise ConfigError("convert needs SRC and DST folders: saelab convert SRC DST --to FORMAT")
        if self.to is None:
            raise ConfigError("convert needs the format to write: --to saelens, --to sparsify or --to saelab")
        if Path(self.src).resolve() == Path(self.dst).resolve():
            raise ConfigError(f"SRC and DST are the same folder ({self.src}); write the conversion elsewhere")


def convert(cfg: ConvertConfig) -> str:
    """Convert and return one line saying what was written."""
    from saelab.saes.formats import detect_format, load_any, write

    source = detect_format(cfg.src)
    sae = load_any(cfg.src, norm_scaling_factor=cfg.norm_scaling_factor)
    write(sae, cfg.dst, to=str(cfg.to), overwrite=cfg.overwrite)
    return (f"{cfg.src} ({source}, {sae.architecture}, d_in={sae.d_in}, n_latents={sae.n_latents}, "
            f"hookpoint={sae.cfg.hookpoint}) -> {cfg.dst} ({cfg.to})")
