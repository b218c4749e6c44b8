"""Pretrained SAEs in SAELens's folder format (`cfg.json` + `sae_weights.safetensors`), e.g. Gemma Scope.

SAELens stores `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for JumpReLU,
`threshold [d_sae]`; its encoders compute `(x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc`. Each architecture maps
onto a saelab SAE that computes the same function:

- "jumprelu" -> `JumpReLUSAE` (below), exactly, keeping the apply_b_dec_to_input switch (folding it into b_enc
  would move pre-activations by a rounding error, enough to flip a discontinuous threshold);
- "standard" (ReLU) -> `ReluSAE`, "topk" -> `TopKSAE`. These always subtract b_dec before encoding, so without
  apply_b_dec_to_input b_enc absorbs W_enc·b_dec, and a TopK SAE that ranks latents by pre-activation × decoder
  norm gets those norms folded into its encoder; both are exact up to float rounding (ReLU is continuous, and a
  top-k choice changes only between pre-activations equal to rounding).

Anything that cannot be mapped faithfully is a CheckpointError, never a silent approximation: a TopK SAE must not
load as ReLU (SAELens #553), a threshold must not be dropped (SAELens PR #608), an unused tensor in the file is an
error, and so are input normalisations whose statistics the folder does not carry.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from saelab.errors import CheckpointError
from saelab.saes.base import SAEConfig, register
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.shallow import ShallowSAE
from saelab.saes.topk import TopKSAE, TopKSAEConfig

logger = logging.getLogger(__name__)

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
# TransformerLens hook names whose tensor is the same as a saelab hookpoint's (see saelab.models.hookpoints).
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)$")
# SAELens before 6.0 used other names for these keys.
_OLD_KEYS = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}


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
    """Load a SAELens SAE folder as the saelab SAE computing the same function, in float32.

    `norm_scaling_factor`: for SAEs trained with normalize_activations="expected_average_only_in", the dataset
    constant that SAELens keeps outside the folder (in its pretrained-SAE directory); it becomes the SAE's
    `preprocessing="scale"`.
    """
    folder = Path(folder)
    cfg = _read_cfg(folder / SAELENS_CFG)
    where = str(folder / SAELENS_CFG)
    arch = _architecture(cfg, where)
    if cfg.get("rescale_acts_by_decoder_norm") and arch != "topk":
        raise CheckpointError(f"{where}: rescale_acts_by_decoder_norm is only defined for TopK SAEs, not {arch!r}")
    d_in, n = _positive_int(cfg, "d_in", where), _positive_int(cfg, "d_sae", where)
    _refuse_reshaped_inputs(cfg, where)
    tensors = _read_weights(folder / SAELENS_WEIGHTS)
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    state = {name: _take(tensors, name, shape, folder) for name, shape in shapes.items()}
    state["W_enc"] = state["W_enc"].T.contiguous()
    _fold_finetuning_scale(tensors, state, cfg, folder)
    if arch == "jumprelu":
        state["threshold"] = _take_threshold(tensors, n, folder)
    if tensors:
        raise CheckpointError(
            f"{folder / SAELENS_WEIGHTS} holds tensors {sorted(tensors)} that a {arch!r} SAE does not use; "
            "loading without them would compute a different function"
        )
    fields: dict[str, Any] = dict(
        d_in=d_in, n_latents=n, **_preprocessing(cfg, norm_scaling_factor, where), **_provenance(cfg)
    )
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    if arch == "jumprelu":
        sae: ShallowSAE = JumpReLUSAE(JumpReLUSAEConfig(**fields, apply_b_dec_to_input=apply_b_dec))
    else:
        if cfg.get("rescale_acts_by_decoder_norm"):
            _fold_decoder_norms(state)  # checked to be a TopK SAE
        if not apply_b_dec:
            state["b_enc"] = (state["b_enc"].double() + state["W_enc"].double() @ state["b_dec"].double()).float()
        if arch == "topk":
            sae = TopKSAE(TopKSAEConfig(**fields, k=_topk_k(cfg, n, where)))
        else:
            sae = ReluSAE(ReluSAEConfig(**fields))
    sae.load_state_dict(state)
    return sae.to(device)


def _read_cfg(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise CheckpointError(f"{path.parent} holds no {SAELENS_CFG}; point at a SAELens SAE folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    cfg = {**(raw.get("metadata") or {}), **raw}  # SAELens 6 keeps model and hook names under "metadata"
    return {_OLD_KEYS.get(key, key): value for key, value in cfg.items()}


def _architecture(cfg: dict[str, Any], where: str) -> str:
    arch = cfg.get("architecture", "standard")
    activation = cfg.get("activation_fn", "relu")
    if activation == "topk" and arch in ("standard", "topk"):
        return "topk"  # SAELens < 6 wrote TopK SAEs as "standard" with activation_fn "topk"
    if activation not in ("relu", None):
        raise CheckpointError(f"{where}: activation_fn {activation!r} with architecture {arch!r} is not supported")
    if arch not in ("standard", "jumprelu", "topk"):
        raise CheckpointError(
            f"{where}: SAELens architecture {arch!r} is not supported; supported: standard, jumprelu, topk"
        )
    return arch


def _positive_int(cfg: dict[str, Any], key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _topk_k(cfg: dict[str, Any], n: int, where: str) -> int:
    k, kwargs_k = cfg.get("k"), (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is not None and kwargs_k is not None and k != kwargs_k:
        raise CheckpointError(f"{where}: k={k} disagrees with activation_fn_kwargs.k={kwargs_k}")
    k = k if k is not None else kwargs_k
    if not isinstance(k, int) or not 0 < k <= n:
        raise CheckpointError(f"{where}: a TopK SAE needs an integer k in 1..{n} (top-level or activation_fn_kwargs)")
    return k


def _refuse_reshaped_inputs(cfg: dict[str, Any], where: str) -> None:
    per_head = str(cfg.get("hook_name") or "").endswith("hook_z")
    if per_head or cfg.get("hook_head_index") is not None or cfg.get("reshape_activations", "none") != "none":
        raise CheckpointError(
            f"{where}: this SAE reads attention heads (hook_head_index / reshape_activations), which no saelab "
            "hookpoint provides"
        )


def _preprocessing(cfg: dict[str, Any], norm_scaling_factor: float | None, where: str) -> dict[str, Any]:
    mode = cfg.get("normalize_activations", "none")
    if mode in ("none", None, False):
        if norm_scaling_factor is not None:
            raise CheckpointError(f"{where}: norm_scaling_factor was given but the SAE normalises nothing")
        return {"preprocessing": "none"}
    if mode in ("expected_average_only_in", True):
        if norm_scaling_factor is None or not (math.isfinite(norm_scaling_factor) and norm_scaling_factor > 0):
            raise CheckpointError(
                f"{where}: normalize_activations={mode!r} scales inputs by a dataset constant that the folder does "
                "not carry; pass norm_scaling_factor (SAELens lists it in its pretrained-SAE directory)"
            )
        return {"preprocessing": "scale", "input_scale": float(norm_scaling_factor)}
    raise CheckpointError(f"{where}: normalize_activations={mode!r} has no saelab equivalent")


def _provenance(cfg: dict[str, Any]) -> dict[str, Any]:
    hook = cfg.get("hook_name")
    match = _TL_HOOK.match(hook or "")
    if hook and match is None:
        logger.warning("SAELens hook %r has no saelab hookpoint name; the SAE records none", hook)
    return {
        "hookpoint": f"{match.group(2)}.{match.group(1)}" if match else None,
        "model_name": cfg.get("model_name"),
    }


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the SAELens folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{path} cannot be read ({exc}); it is truncated or corrupted") from None


def _take(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...], folder: Path) -> Tensor:
    if name not in tensors:
        raise CheckpointError(f"{folder / SAELENS_WEIGHTS} lacks {name!r}")
    tensor = tensors.pop(name)
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{folder / SAELENS_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, cfg says {shape}")
    return tensor.float()


def _take_threshold(tensors: dict[str, Tensor], n: int, folder: Path) -> Tensor:
    if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens JumpReLU checkpoints
        return _take(tensors, "log_threshold", (n,), folder).double().exp().float()
    return _take(tensors, "threshold", (n,), folder)


def _fold_finetuning_scale(
    tensors: dict[str, Tensor], state: dict[str, Tensor], cfg: dict[str, Any], folder: Path
) -> None:
    """Older SAELens decodes (z · scaling_factor) @ W_dec: the same as z @ (W_dec scaled per row)."""
    if "scaling_factor" not in tensors:
        return
    scale = _take(tensors, "scaling_factor", (state["W_dec"].shape[0],), folder)
    if torch.equal(scale, torch.ones_like(scale)):
        return
    if not cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(
            f"{folder}: scaling_factor is not all ones but finetuning_scaling_factor is off; the cfg and the "
            "weights disagree about how the SAE decodes"
        )
    state["W_dec"] = state["W_dec"] * scale[:, None]


def _fold_decoder_norms(state: dict[str, Tensor]) -> None:
    """SAELens TopK with rescale_acts_by_decoder_norm ranks pre-activations × ||W_dec row|| and decodes with
    unit rows: scaling encoder rows and b_enc up by the norms and decoder rows down is the same function."""
    norms = state["W_dec"].double().norm(dim=1).clamp_min(1e-8)
    state["W_enc"] = (state["W_enc"].double() * norms[:, None]).float()
    state["b_enc"] = (state["b_enc"].double() * norms).float()
    state["W_dec"] = (state["W_dec"].double() / norms[:, None]).float()
