"""SAELens folders: `cfg.json` + `sae_weights.safetensors` [+ `sparsity.safetensors`], architectures "standard"
(ReLU), "topk" and "jumprelu" (SAELens also saves its BatchTopK and Matryoshka SAEs as "jumprelu").

SAELens stores `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for JumpReLU,
`threshold [d_sae]`; its encoders compute `(x − b_dec·apply_b_dec_to_input) @ W_enc + b_enc`. Reading:

- "jumprelu" -> `JumpReLUSAE`, exactly, keeping the apply_b_dec_to_input switch (folding it into b_enc would move
  pre-activations by a rounding error, enough to flip a discontinuous threshold);
- "standard" -> `ReluSAE`, "topk" -> `TopKSAE`. These always subtract b_dec before encoding, so without
  apply_b_dec_to_input b_enc absorbs W_enc·b_dec, and a TopK SAE that ranks latents by pre-activation × decoder
  norm (rescale_acts_by_decoder_norm) gets those norms folded into its encoder, as SAELens's own fold_W_dec_norm
  does; both are exact up to float rounding.

Writing: ReLU -> "standard", TopK -> "topk", JumpReLU -> "jumprelu", and any SAE with an `as_jumprelu()` method
(a BatchTopK whose inference is a threshold) -> "jumprelu" through it. A fixed input scale is folded into the
weights; everything else (deep, multi-layer, per-token normalisation, transcoders) is refused before anything is
written. `sparsity.safetensors` holds training statistics, not part of the function: it is neither read nor written.

Never a silent approximation: a TopK SAE must not load as ReLU (SAELens #553), a threshold must not be dropped
(SAELens #608), an unused tensor is an error, and so are input normalisations whose statistics the folder lacks.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import save_file
from torch import Tensor

from saelab.errors import CheckpointError, ConfigError
from saelab.saes.base import SparseAutoencoder
from saelab.saes.formats.common import (
    check_preprocessing,
    describe,
    json_writer,
    positive_int,
    read_json,
    read_safetensors,
    refuse_leftovers,
    take,
    unscaled_state,
)
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from saelab.saes.relu import ReluSAE, ReluSAEConfig
from saelab.saes.shallow import ShallowSAE
from saelab.saes.topk import TopKSAE, TopKSAEConfig

NAME = "saelens"
CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
FILES = f"{CFG} (with d_sae) + {WEIGHTS}"
# SAELens before 6.0 used other names for these keys.
_OLD_KEYS = {
    "hook_point": "hook_name",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
# saelab hookpoints whose TransformerLens hook is the same tensor (see saelab.models.hookpoints).
_SAELAB_HOOK = re.compile(r"^(resid_pre|resid_mid|resid_post|attn_out|mlp_out)\.(\d+)$")


@runtime_checkable
class ExportsJumpReLU(Protocol):
    """An SAE whose inference is a per-latent threshold (e.g. BatchTopK with its learned threshold) implements
    this to be written as SAELens "jumprelu", the way SAELens saves its own BatchTopK and Matryoshka SAEs."""

    def as_jumprelu(self) -> JumpReLUSAE: ...


def detect(folder: Path) -> bool:
    if not (folder / CFG).is_file() or not (folder / WEIGHTS).is_file():
        return False
    try:
        return "d_sae" in read_json(folder / CFG, "SAELens")
    except CheckpointError:
        return False


def read(folder: Path, norm_scaling_factor: float | None = None) -> ShallowSAE:
    """The saelab SAE computing the same function, in float32, hookpoint and model name as the cfg gives them.

    `norm_scaling_factor`: for SAEs trained with normalize_activations="expected_average_only_in", the dataset
    constant that SAELens keeps outside the folder (in its pretrained-SAE directory); it becomes the SAE's
    `preprocessing="scale"`.
    """
    cfg = _read_cfg(folder / CFG)
    where = str(folder / CFG)
    arch = _architecture(cfg, where)
    if cfg.get("rescale_acts_by_decoder_norm") and arch != "topk":
        raise CheckpointError(f"{where}: rescale_acts_by_decoder_norm is only defined for TopK SAEs, not {arch!r}")
    d_in, n = positive_int(cfg, "d_in", where), positive_int(cfg, "d_sae", where)
    _refuse_reshaped_inputs(cfg, where)
    weights = folder / WEIGHTS
    tensors = read_safetensors(weights)
    shapes = {"W_enc": (d_in, n), "b_enc": (n,), "W_dec": (n, d_in), "b_dec": (d_in,)}
    state = {name: take(tensors, name, shape, weights) for name, shape in shapes.items()}
    state["W_enc"] = state["W_enc"].T.contiguous()
    _fold_finetuning_scale(tensors, state, cfg, weights)
    if arch == "jumprelu":
        state["threshold"] = _take_threshold(tensors, n, weights)
    refuse_leftovers(tensors, weights, f"SAELens {arch!r} SAE")
    fields: dict[str, Any] = dict(
        d_in=d_in, n_latents=n, hookpoint=cfg.get("hook_name"), model_name=cfg.get("model_name"),
        **_preprocessing(cfg, norm_scaling_factor, where),
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
    return sae


def check(sae: SparseAutoencoder) -> None:
    """Raise ConfigError when `sae` cannot be written as a SAELens folder (called before anything is written)."""
    _architecture_of(sae)
    check_preprocessing(sae, NAME)


def write(sae: SparseAutoencoder, folder: Path) -> None:
    """Write `sae` into the (empty, in-progress) `folder` as SAELens 6 writes it (`SAE.save_model`)."""
    arch = _architecture_of(sae)
    sae = as_written(sae)
    state = unscaled_state(sae, NAME)
    tensors = {"W_enc": state["W_enc"].T, "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    cfg: dict[str, Any] = {
        "d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {key: value for key, value in (("hook_name", _hook_name(sae.cfg.hookpoint)),
                                                   ("model_name", sae.cfg.model_name)) if value is not None},
        "architecture": arch,
    }
    if arch == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)  # type: ignore[attr-defined]
    if arch == "jumprelu":
        cfg["apply_b_dec_to_input"] = bool(sae.cfg.apply_b_dec_to_input)  # type: ignore[attr-defined]
        tensors["threshold"] = state["threshold"]
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / WEIGHTS))
    json_writer(cfg)(folder / CFG)


def _architecture_of(sae: SparseAutoencoder) -> str:
    if isinstance(sae, (JumpReLUSAE, ExportsJumpReLU)):
        return "jumprelu"
    if type(sae) is TopKSAE:
        return "topk"
    if type(sae) is ReluSAE:
        return "standard"
    raise ConfigError(
        f"{describe(sae)} has no SAELens equivalent (SAELens holds standard ReLU, TopK and JumpReLU SAEs, and "
        "BatchTopK ones as JumpReLU); keep it in saelab's own format (--to saelab)"
    )


def as_written(sae: SparseAutoencoder) -> SparseAutoencoder:
    """The SAE whose weights the folder holds: an `ExportsJumpReLU` SAE's JumpReLU form, else `sae` itself."""
    return sae.as_jumprelu() if isinstance(sae, ExportsJumpReLU) and not isinstance(sae, JumpReLUSAE) else sae


def _hook_name(hookpoint: str | None) -> str | None:
    """The TransformerLens name SAELens users load by, for saelab's own hookpoint names; others as they are."""
    match = _SAELAB_HOOK.match(hookpoint or "")
    return f"blocks.{match.group(2)}.hook_{match.group(1)}" if match else hookpoint


def _read_cfg(path: Path) -> dict[str, Any]:
    raw = read_json(path, "SAELens")
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
    raise CheckpointError(
        f"{where}: normalize_activations={mode!r} has no saelab equivalent (saelab's token_l2 divides by the L2 "
        "norm, SAELens's layer_norm by the standard deviation, and constant_norm_rescale does not centre)"
    )


def _take_threshold(tensors: dict[str, Tensor], n: int, where: Path) -> Tensor:
    if "log_threshold" in tensors and "threshold" not in tensors:  # older SAELens JumpReLU checkpoints
        return take(tensors, "log_threshold", (n,), where).double().exp().float()
    return take(tensors, "threshold", (n,), where)


def _fold_finetuning_scale(tensors: dict[str, Tensor], state: dict[str, Tensor], cfg: dict[str, Any],
                           where: Path) -> None:
    """Older SAELens decodes (z · scaling_factor) @ W_dec: the same as z @ (W_dec scaled per row)."""
    if "scaling_factor" not in tensors:
        return
    scale = take(tensors, "scaling_factor", (state["W_dec"].shape[0],), where)
    if torch.equal(scale, torch.ones_like(scale)):
        return
    if not cfg.get("finetuning_scaling_factor"):
        raise CheckpointError(
            f"{where}: scaling_factor is not all ones but finetuning_scaling_factor is off; the cfg and the "
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
