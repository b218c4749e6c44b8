"""`load_saelens`, kept for its callers: `saelab.saes.formats` reads and writes every format, SAELens included."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from saelab.saes.shallow import ShallowSAE

logger = logging.getLogger(__name__)

# TransformerLens hook names whose tensor is the same as a saelab hookpoint's (see saelab.models.hookpoints).
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


def load_saelens(
    folder: str | Path, device: str | torch.device = "cpu", norm_scaling_factor: float | None = None
) -> ShallowSAE:
    """Load a SAELens SAE folder (see `saelab.saes.formats.saelens.read`), its TransformerLens hook name
    translated to the saelab hookpoint of the same tensor (`blocks.3.hook_resid_post` -> `resid_post.3`)."""
    from saelab.saes.formats import saelens  # imported on use: the formats import the saes package

    sae = saelens.read(Path(folder), norm_scaling_factor)
    hook = sae.cfg.hookpoint
    match = _TL_HOOK.match(hook or "")
    if hook and match is None:
        logger.warning("SAELens hook %r has no saelab hookpoint name; the SAE records none", hook)
    sae.cfg.hookpoint = f"{match.group(2)}.{match.group(1)}" if match else None
    return sae.to(device)
