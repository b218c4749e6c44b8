"""The trainer's settings: one typed config for every SAE, every recipe option a field (and so a CLI flag)."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from saelab.config import Config
from saelab.errors import ConfigError

DecoderNormAxis = Literal["per_unit", "per_row"]
LossKind = Literal["fvu", "mse"]
OptimizerKind = Literal["adam", "masked_adam"]
AutocastDtype = Literal["bfloat16", "float16"]
SelectionPrecision = Literal["auto", "fp32", "bf16-exact"]


def default_lr(n_latents: int) -> float:
    """The usual top-k SAE scaling rule, 2e-4 / sqrt(n / 2^14): wider dictionaries get smaller steps."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


@dataclasses.dataclass
class TrainerConfig(Config):
    """Units are in the names: `*_tokens` counts activation vectors, `*_steps` counts optimiser steps."""

    total_tokens: int = 10_000_000
    batch_size: int = 4096  # under torchrun: the global batch, split across the ranks
    lr: float | None = None  # None -> default_lr(n_latents)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 1000  # linear warm-up from 0
    decay_fraction: float = 0.2  # linear decay to 0 over this final fraction of the steps
    grad_clip_norm: float | None = 1.0
    # Decoder constraint on every matrix in sae.decoder_matrices(): renormalise after each step and remove the
    # gradient component parallel to the constrained vectors before it. "per_unit" normalises each unit's
    # direction (a row of the [units_in, d_out] matrix; the write-up's intent). "per_row" is the original deep-SAE
    # code's axis: each row of nn.Linear.weight, i.e. each output coordinate across units (compatibility only).
    unit_norm_decoder: bool = True
    decoder_norm_axis: DecoderNormAxis = "per_unit"
    loss: LossKind = "fvu"  # "fvu": pooled batch FVU; "mse": mean over elements (the deep-SAE recipe)
    l1_coefficient: float = 0.0  # × mean over tokens of Σ_i |z_i|·||d_i|| (ReLU SAEs)
    auxk_coefficient: float = 0.0  # AuxK on dead latents (OpenAI top-k recipe uses 1/32); 0 = off
    k_aux: int | None = None  # None -> d_in // 2
    activation_decay: float = 0.0  # × mean over batch × latents of z² (deep-SAE recipe: 1e-3)
    optimizer: OptimizerKind = "adam"  # "masked_adam" skips moments/updates of entries with exactly zero gradient
    dead_window_tokens: int = 10_000_000  # dead = no activation in this many tokens (deep-SAE recipe: 1.5M)
    resample_every_steps: int | None = None  # re-initialise dead latents every this many steps; None = never
    checkpoint_every_steps: int | None = 1000  # None = only when a run stops before total_tokens
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    seed: int = 0
    device: str = "cpu"
    # Forward and loss under torch.autocast in this dtype (parameters, gradients and Adam stay float32); the top-k
    # encoder GEMM, the step's main cost, then runs in it too. None = full precision.
    autocast_dtype: AutocastDtype | None = None
    # "bf16-exact": the top-k encoder GEMM in bf16 with the selection certified equal to fp32's (tokens that cannot
    # be certified are recomputed in fp32; `saelab.saes.certified`); runs fp32 where the device has no fast bf16.
    # "auto": bf16-exact on CPUs with bf16 GEMM hardware (AVX512-BF16, AMX), fp32 elsewhere. All three give the same
    # latents, values and weights, bit for bit; only the speed differs.
    precision: SelectionPrecision = "auto"
    progress: bool = True
    wandb_project: str | None = None  # log to Weights & Biases as well (needs `pip install saelab[wandb]`)
    wandb_run_name: str | None = None

    def validate(self) -> None:
        positive = {
            "total_tokens": self.total_tokens,
            "batch_size": self.batch_size,
            "dead_window_tokens": self.dead_window_tokens,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every_steps": self.log_every_steps,
        }
        optional_positive = {
            "lr": self.lr,
            "grad_clip_norm": self.grad_clip_norm,
            "k_aux": self.k_aux,
            "resample_every_steps": self.resample_every_steps,
            "checkpoint_every_steps": self.checkpoint_every_steps,
        }
        for name, value in {**positive, **{k: v for k, v in optional_positive.items() if v is not None}}.items():
            if value <= 0:
                raise ConfigError(f"TrainerConfig.{name} must be positive (got {value}); use None to disable")
        for name in ("l1_coefficient", "auxk_coefficient", "activation_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainerConfig.{name} must be >= 0 (got {getattr(self, name)})")
        for name, kind in (("decoder_norm_axis", DecoderNormAxis), ("loss", LossKind), ("optimizer", OptimizerKind),
                           ("autocast_dtype", AutocastDtype), ("precision", SelectionPrecision)):
            allowed = typing.get_args(kind)
            if getattr(self, name) not in allowed and not (name == "autocast_dtype" and self.autocast_dtype is None):
                raise ConfigError(
                    f"TrainerConfig.{name}={getattr(self, name)!r} is unknown; use one of {list(allowed)}"
                )
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"TrainerConfig.decay_fraction must be in [0, 1] (got {self.decay_fraction})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"TrainerConfig.betas must be in [0, 1) (got {self.betas})")
        if self.total_tokens < self.batch_size:
            raise ConfigError(
                f"TrainerConfig.total_tokens={self.total_tokens} is less than one batch ({self.batch_size}); "
                "raise total_tokens or lower batch_size"
            )

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_size)


# The training recipe of the deep-SAE write-up ("Deep SAEs") as TrainerConfig fields: loss = MSE + 1e-3 × mean(z²);
# Adam (0.9, 0.999) at a constant 2e-4 with the masked moment updates; gradients clipped at norm 1.0; every decoder
# matrix unit-norm per unit with gradient projection; dead = silent for 1.5M tokens, and dead latents resampled
# (checked every 100 steps). Presets (e.g. `saelab train --preset deep_sae`) apply it under any explicit field.
DEEP_SAE_RECIPE: dict[str, Any] = {
    "loss": "mse",
    "activation_decay": 1e-3,
    "optimizer": "masked_adam",
    "lr": 2e-4,
    "betas": (0.9, 0.999),
    "warmup_steps": 0,
    "decay_fraction": 0.0,
    "grad_clip_norm": 1.0,
    "unit_norm_decoder": True,
    "decoder_norm_axis": "per_unit",
    "dead_window_tokens": 1_500_000,
    "resample_every_steps": 100,
}
