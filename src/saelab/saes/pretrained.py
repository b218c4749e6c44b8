"""The JumpReLU SAE (Gemma Scope, SAELens "jumprelu", dictionary_learning's BatchTopK at inference), and
`load_saelens`, kept for its callers: `saelab.saes.formats` reads and writes every format, SAELens included.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.saes.base import SAEConfig, register
from saelab.saes.shallow import ShallowSAE

logger = logging.getLogger(__name__)

# TransformerLens hook names whose tensor is the same as a saelab hookpoint's (see saelab.models.hookpoints).
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")


@dataclasses.dataclass
class JumpReLUSAEConfig(SAEConfig):
    # Gemma Scope encodes x itself (False); SAELens-trained SAEs subtract b_dec first (True).
    apply_b_dec_to_input: bool = False


@register
class JumpReLUSAE(ShallowSAE):
    """z = ReLU(pre) · [pre > ReLU(threshold)], pre = (x − b_dec·apply_b_dec_to_input) @ W_enc.T + b_enc;
    x_hat = z @ W_dec + b_dec. For loading and evaluating pretrained SAEs (saelab trains no JumpReLU)."""

    architecture = "jumprelu"
    trainable = False
    config_class = JumpReLUSAEConfig
    cfg: JumpReLUSAEConfig

    def __init__(self, cfg: JumpReLUSAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.n_latents))

    def encode(self, x: Tensor) -> Tensor:
        pre = F.linear(x - self.b_dec if self.cfg.apply_b_dec_to_input else x, self.W_enc, self.b_enc)
        return torch.relu(pre) * (pre > self.threshold.relu())

    def latent_parameters(self) -> dict[str, int]:
        return {**super().latent_parameters(), "threshold": 0}

    def flops_per_token(self) -> int:
        return 4 * self.d_in * self.n_latents


def load_saelens(
    folder: str | Path, device: str | torch.device = "cpu", norm_scaling_factor: float | None = None
) -> ShallowSAE:
    """Load a SAELens SAE folder (see `saelab.saes.formats.saelens.read`), its TransformerLens hook name
    translated to the saelab hookpoint of the same tensor (`blocks.3.hook_resid_post` -> `resid_post.3`)."""
    from saelab.saes.formats import saelens  # the formats import this module for JumpReLUSAE

    sae = saelens.read(Path(folder), norm_scaling_factor)
    hook = sae.cfg.hookpoint
    match = _TL_HOOK.match(hook or "")
    if hook and match is None:
        logger.warning("SAELens hook %r has no saelab hookpoint name; the SAE records none", hook)
    sae.cfg.hookpoint = f"{match.group(2)}.{match.group(1)}" if match else None
    return sae.to(device)
