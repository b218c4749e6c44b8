"""The multi-layer SAE: one top-k dictionary over the concatenated residual outputs of several layers of one token.

Every latent reads from and writes to all chosen layers at once (the write-up "Multi-layer SAEs"). The input is the
concatenation, in layer order, of `resid_post.L` for the layers in `cfg.layers`; `cfg.slice_widths` says which
features belong to which layer, so every later step (per-layer FVU, banding, decoder cosines, information flow) can
split a vector back into its layers.

Normalisation is part of the SAE (applied by `normalize`, undone by `denormalize`, so `reconstruct` is raw -> raw)
and recorded in its config as one scale per layer:

- "per_layer" (default): each layer multiplied by its own scale (the store's E||x_l|| = sqrt(d_l) factor), as the
  write-up says; otherwise residual norms, which grow with depth, let the last layers dominate the loss;
- "global": one scale for the whole concatenation (E||x|| = sqrt(D)), keeping the layers' raw relative sizes like
  the original code did (it divided each token's concatenation by that token's norm; a fixed scale keeps the same
  relative layer weighting while staying linear, so reconstructions map back to raw activations exactly);
- "none": raw activations.

The single-hookpoint fields of `SAEConfig` (`preprocessing`, `input_scale`, `hookpoint`) stay unused.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from saelab.errors import ConfigError, DataError
from saelab.saes.base import SparseLatents, register
from saelab.saes.kernels import take_latents
from saelab.saes.topk import TopKSAE, TopKSAEConfig

NORMALIZATIONS = ("per_layer", "global", "none")
_LAYER_SUFFIX = re.compile(r"\.(\d+)$")


def check_layers(layers: Sequence[int], n_layers: int | None = None) -> None:
    """Raise ConfigError unless `layers` is a non-empty, strictly increasing list of layers in 0..n_layers-1."""
    if not layers:
        raise ConfigError("the layer list is empty; give at least one layer (e.g. 0,6,12) or a layer stride")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ConfigError(f"layers {list(layers)} must be sorted in increasing order without repeats, e.g. 0,6,12")
    if layers[0] < 0 or (n_layers is not None and layers[-1] >= n_layers):
        limit = "" if n_layers is None else f" (this model has layers 0..{n_layers - 1})"
        raise ConfigError(f"layers {list(layers)} are out of range{limit}; choose layers that exist")


def select_layers(n_layers: int, layers: Sequence[int] = (), stride: int | None = None) -> list[int]:
    """The layer set: `layers` as given (checked against the model's `n_layers`), or when it is empty every
    `stride`-th layer from 0 (stride 1 = all layers)."""
    if not layers:
        if stride is None or stride < 1:
            raise ConfigError(f"layer stride must be at least 1 (got {stride}); or list the layers explicitly")
        layers = range(0, n_layers, stride)
    chosen = list(layers)
    check_layers(chosen, n_layers)
    return chosen


def segment_norms(matrix: Tensor, slices: Sequence[slice]) -> Tensor:
    """`[n_latents, L]`: the norm of each row's segment in each slice (a latent's encoder or decoder per layer)."""
    return torch.stack([matrix[:, s].norm(dim=1) for s in slices], dim=1)


def layer_hookpoints(layers: Sequence[int], kind: str = "resid_post") -> list[str]:
    return [f"{kind}.{layer}" for layer in layers]


@dataclasses.dataclass
class MultiLayerSAEConfig(TopKSAEConfig):
    layers: list[int] = dataclasses.field(default_factory=list)  # model layers, increasing
    hookpoints: list[str] = dataclasses.field(default_factory=list)  # one per layer, e.g. resid_post.6
    slice_widths: list[int] = dataclasses.field(default_factory=list)  # features of each layer, in order
    normalization: str = "per_layer"  # per_layer | global | none
    layer_scales: list[float] = dataclasses.field(default_factory=list)  # multiplier of each layer's slice
    encoder_init_scale: float | None = 0.2  # c of the encoder-scaling init; None = no scaling
    post_act_bias: bool = False  # learned per-latent scalar added to the values of the latents that fire

    def validate(self) -> None:
        super().validate()
        check_layers(self.layers)
        n = len(self.layers)
        lengths = {"hookpoints": len(self.hookpoints), "slice_widths": len(self.slice_widths),
                   "layer_scales": len(self.layer_scales)}
        if any(length != n for length in lengths.values()):
            raise ConfigError(f"multilayer SAE: {n} layers but {lengths}; give one entry per layer")
        for layer, hookpoint in zip(self.layers, self.hookpoints, strict=True):
            match = _LAYER_SUFFIX.search(hookpoint)
            if match is None or int(match.group(1)) != layer:
                raise ConfigError(f"multilayer SAE: hookpoint {hookpoint!r} is not of layer {layer}")
        if any(w <= 0 for w in self.slice_widths) or sum(self.slice_widths) != self.d_in:
            raise ConfigError(
                f"multilayer SAE: slice widths {self.slice_widths} must be positive and sum to d_in={self.d_in}"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization={self.normalization!r} is unknown; use one of {list(NORMALIZATIONS)}")
        scales = self.layer_scales
        if not all(math.isfinite(s) and s > 0 for s in scales):
            raise ConfigError(f"layer scales {scales} must be positive and finite")
        if self.normalization == "none" and any(s != 1.0 for s in scales):
            raise ConfigError(f"normalization='none' needs every layer scale to be 1.0 (got {scales})")
        if self.normalization == "global" and len(set(scales)) != 1:
            raise ConfigError(f"normalization='global' needs one scale shared by all layers (got {scales})")
        if self.preprocessing != "none" or self.input_scale != 1.0 or self.hookpoint is not None:
            raise ConfigError(
                "multilayer SAE: leave preprocessing, input_scale and hookpoint unset; the layers and their "
                "normalisation are given by layers, hookpoints, normalization and layer_scales"
            )
        if self.encoder_init_scale is not None and not self.encoder_init_scale > 0:
            raise ConfigError(f"encoder_init_scale must be positive or None (got {self.encoder_init_scale})")


@register
class MultiLayerSAE(TopKSAE):
    """A top-k SAE (b_dec subtracted before encoding, W_dec a normalised copy of W_enc at init) over concatenated
    layers, with the per-layer normalisation built in and two options of the write-up: the encoder-scaling init
    (`initialize_from_batch`) and a per-latent post-activation bias."""

    architecture = "multilayer"
    config_class = MultiLayerSAEConfig
    cfg: MultiLayerSAEConfig

    def __init__(self, cfg: MultiLayerSAEConfig):
        super().__init__(cfg)
        self.post_act_bias = nn.Parameter(torch.zeros(cfg.n_latents)) if cfg.post_act_bias else None
        scale = torch.cat([torch.full((w,), s) for w, s in zip(cfg.slice_widths, cfg.layer_scales, strict=True)])
        self.register_buffer("feature_scale", scale, persistent=False)

    # ---- the layer layout ---------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    @property
    def hookpoints(self) -> list[str]:
        return list(self.cfg.hookpoints)

    @property
    def slices(self) -> list[slice]:
        """Where each layer's features sit in the concatenated input (for metrics.per_slice_fvu and analyses)."""
        starts = [0, *itertools.accumulate(self.cfg.slice_widths)]
        return [slice(a, b) for a, b in zip(starts, starts[1:], strict=False)]

    def check_input(
        self, hookpoints: Sequence[str], normalization: str | None = None, widths: Mapping[str, int] | None = None
    ) -> None:
        """Raise ConfigError unless activations of `hookpoints` (in this order, of these `widths`), normalised the
        `normalization` way, are what this SAE was trained on."""
        if list(hookpoints) != self.cfg.hookpoints:
            raise ConfigError(
                f"this multilayer SAE reads {self.cfg.hookpoints} but activations of {list(hookpoints)} were given; "
                "use the SAE's layer set or train an SAE for these layers"
            )
        if normalization is not None and normalization != self.cfg.normalization:
            raise ConfigError(
                f"this multilayer SAE was trained with normalization={self.cfg.normalization!r} but "
                f"{normalization!r} was asked for; use {self.cfg.normalization!r} or retrain"
            )
        if widths is not None:
            have = [widths.get(hp) for hp in self.cfg.hookpoints]
            if have != self.cfg.slice_widths:
                raise ConfigError(
                    f"the activations of {self.cfg.hookpoints} have widths {have} but the SAE expects "
                    f"{self.cfg.slice_widths}; use activations of the model the SAE was trained on"
                )

    # ---- preprocessing: one scale per layer ---------------------------------------------------------------
    def normalize(self, x: Tensor) -> tuple[Tensor, None]:
        return x * self.feature_scale, None

    def denormalize(self, x_hat: Tensor, stats: None) -> Tensor:
        return x_hat / self.feature_scale

    # ---- the dictionary ------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> SparseLatents:
        latents = super().encode(x)
        if self.post_act_bias is None:
            return latents
        fired = latents.values > 0
        return latents._replace(values=latents.values + take_latents(self.post_act_bias, latents.indices) * fired)

    def latent_parameters(self) -> dict[str, int]:
        per_latent = super().latent_parameters()
        return per_latent if self.post_act_bias is None else {**per_latent, "post_act_bias": 0}

    # ---- initialisation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize_from_batch(self, x_n: Tensor) -> None:
        """The trainer's first-batch hook: b_dec to the geometric median, then (unless disabled) the encoder
        scaling, measured with that b_dec in place."""
        self.init_b_dec_geometric_median(x_n)
        if self.cfg.encoder_init_scale is not None:
            self.scale_encoder(x_n, self.cfg.encoder_init_scale)

    @torch.no_grad()
    def scale_encoder(self, x_n: Tensor, c: float) -> float:
        """Multiply W_enc and b_enc by c·sqrt(Var_in / Var_out) and return that factor.

        Var_in is the input's variance and Var_out the output's, each per dimension over the batch and averaged
        over dimensions. A positive factor leaves the top-k selection unchanged and scales every selected value,
        so the output's variance becomes c²·Var_in: the first steps start near FVU 1 instead of FVU ≫ 1 (a
        random dictionary's output is larger than its input).
        """
        x_n = x_n.reshape(-1, self.d_in)
        var_in = x_n.var(dim=0, unbiased=False).mean()
        var_out = self(x_n).x_hat.var(dim=0, unbiased=False).mean()
        if not var_out > 0:
            raise DataError(
                "encoder scaling: the SAE's output does not vary over the first batch (every selected latent is "
                "zero); check the activations, or set encoder_init_scale to None"
            )
        factor = float(c * torch.sqrt(var_in / var_out))
        self.W_enc.mul_(factor)
        self.b_enc.mul_(factor)
        return factor
