"""The one interface every dictionary implements, so metrics, trainers, analyses and reports take any of them.

Spaces. An SAE owns its input preprocessing (e.g. the deep-SAE recipe's per-token centre + L2 normalise), because
it must be applied identically in training and in every later evaluation. So:

- `normalize(x) -> (x_n, stats)` and `denormalize(x_hat_n, stats) -> x_hat` map raw activations to the SAE's own
  space and back;
- `encode(x_n)`, `decode(latents)` and `forward(x_n)` work in that normalised space (training, FVU/NMSE);
- `reconstruct(x)` is raw -> raw (normalise, forward, denormalise): what splicing into a model uses.

Latents are either a dense `[..., n_latents]` tensor or a `SparseLatents` (values and indices of the k active
latents per token), which the fast top-k path returns to avoid materialising `[B, n]`.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.config import Config
from saelab.errors import CheckpointError, ConfigError
from saelab.io import atomic_write_json, atomic_write_with

PREPROCESSING_KINDS = ("none", "scale", "token_l2")


class SparseLatents(NamedTuple):
    """k active latents per token: `values[..., k]` (>= 0 for top-k) at `indices[..., k]` (int64)."""

    values: Tensor
    indices: Tensor
    n_latents: int

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(*self.values.shape[:-1], self.n_latents)
        return dense.scatter_(-1, self.indices, self.values)


Latents = Tensor | SparseLatents


def to_dense(latents: Latents) -> Tensor:
    return latents.to_dense() if isinstance(latents, SparseLatents) else latents


class ForwardOutput(NamedTuple):
    x_hat: Tensor  # reconstruction in the normalised space
    latents: Latents


@dataclasses.dataclass
class SAEConfig(Config):
    """Fields shared by every SAE. Subclasses add their own (k, hidden widths, layer slices, ...)."""

    d_in: int = 0
    n_latents: int = 0
    # "none"; "scale": multiply by the fixed `input_scale` (the store's E||x|| = sqrt(d) statistic, so
    # hyperparameters transfer across models and layers); "token_l2": per-token centre, then divide by the L2 norm.
    preprocessing: str = "none"
    input_scale: float = 1.0
    # What the SAE was trained on; recorded so a mismatched store/hookpoint is caught at load/evaluation time.
    hookpoint: str | None = None
    model_name: str | None = None

    def validate(self) -> None:
        if self.d_in <= 0 or self.n_latents <= 0:
            raise ConfigError(f"d_in and n_latents must be positive (got {self.d_in}, {self.n_latents})")
        if self.preprocessing not in PREPROCESSING_KINDS:
            raise ConfigError(
                f"preprocessing={self.preprocessing!r} is unknown; use one of {list(PREPROCESSING_KINDS)}"
            )
        if not self.input_scale > 0:
            raise ConfigError(f"input_scale must be positive (got {self.input_scale})")


_REGISTRY: dict[str, type[SparseAutoencoder]] = {}


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Class decorator: make an architecture loadable by the `architecture` name stored in cfg.json."""
    _REGISTRY[cls.architecture] = cls
    return cls


def architectures() -> list[str]:
    return sorted(_REGISTRY)


def architecture_class(architecture: str) -> type[SparseAutoencoder]:
    if architecture not in _REGISTRY:
        raise ConfigError(f"unknown SAE architecture {architecture!r}; choose one of {architectures()}")
    return _REGISTRY[architecture]


class SparseAutoencoder(nn.Module, ABC):
    """Base class. Subclasses set `architecture`, `config_class` and implement encode/decode."""

    architecture: ClassVar[str]
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    weights_file: ClassVar[str] = "sae_weights.safetensors"
    # False for architectures only loaded, never trained here (e.g. JumpReLU from SAELens: no straight-through loss).
    trainable: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg

    # ---- sizes ------------------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- preprocessing ---------------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> tuple[Tensor, Any]:
        if self.cfg.preprocessing == "token_l2":
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            norm = centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            return centred / norm, (mean, norm)
        if self.cfg.preprocessing == "scale":
            return x * self.cfg.input_scale, None
        return x, None

    def denormalize(self, x_hat: Tensor, stats: Any) -> Tensor:
        if self.cfg.preprocessing == "token_l2":
            mean, norm = stats
            return x_hat * norm + mean
        if self.cfg.preprocessing == "scale":
            return x_hat / self.cfg.input_scale
        return x_hat

    # ---- the dictionary --------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: Tensor) -> Latents:
        """Normalised input -> latents."""

    @abstractmethod
    def decode(self, latents: Latents) -> Tensor:
        """Latents -> reconstruction in the normalised space."""

    def forward(self, x: Tensor) -> ForwardOutput:
        latents = self.encode(x)
        return ForwardOutput(self.decode(latents), latents)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Raw activations -> raw reconstruction (for splicing into a model)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(self.device, next(self.parameters()).dtype)
        x_n, stats = self.normalize(flat)
        x_hat = self.denormalize(self(x_n).x_hat, stats)
        return x_hat.reshape(shape).to(x.dtype)

    # ---- decoder geometry (the trainer's unit-norm constraint uses these) ------------------------------
    def decoder_matrices(self) -> list[Tensor]:
        """Decoder weights kept at unit norm per input unit, stored [units_in, d_out] (row = one unit's
        direction). The shallow SAE returns [W_dec]; the deep SAE returns every decoder matrix."""
        return []

    # ---- sizes for reports -----------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @abstractmethod
    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one forward pass for one token (the sparse parts counted as sparse)."""

    # ---- persistence: cfg.json + safetensors, never pickle ---------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        atomic_write_with(folder / self.weights_file, lambda tmp: save_file(tensors, str(tmp)))
        atomic_write_json(folder / "cfg.json", {"architecture": self.architecture, **self.cfg.to_dict()})

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu", **expect: Any) -> SparseAutoencoder:
        """Load any registered architecture. `expect` fields (e.g. preprocessing="token_l2") must match."""
        return load_sae(folder, device=device, **expect)


def load_sae(folder: str | Path, device: str | torch.device = "cpu", **expect: Any) -> SparseAutoencoder:
    folder = Path(folder)
    cfg_path = folder / "cfg.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder} holds no cfg.json; point at a folder written by SparseAutoencoder.save")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc}); the save was interrupted or edited") from None
    arch = raw.pop("architecture", None)
    if arch not in _REGISTRY:
        raise CheckpointError(f"{cfg_path}: unknown architecture {arch!r}; known: {architectures()}")
    sae_cls = _REGISTRY[arch]
    cfg = sae_cls.config_class.from_dict(raw, where=str(cfg_path))
    for key, want in expect.items():
        have = getattr(cfg, key, None)
        if have != want:
            raise ConfigError(
                f"{folder}: the SAE was trained with {key}={have!r} but {want!r} was requested; "
                f"evaluate it with {key}={have!r} or retrain"
            )
    sae = sae_cls(cfg)
    weights = folder / sae_cls.weights_file
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing; the SAE folder is incomplete")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise CheckpointError(f"{weights} cannot be read ({exc}); it is truncated or corrupted") from None
    expected = sae.state_dict()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{weights} does not match architecture {arch!r} with its cfg.json: missing {missing}, unexpected {extra}"
        )
    wrong = [
        f"{name}: {tuple(state[name].shape)} != {tuple(want.shape)}"
        for name, want in expected.items()
        if state[name].shape != want.shape
    ]
    if wrong:
        raise CheckpointError(f"{weights} has tensors of the wrong shape for its cfg.json ({'; '.join(wrong)})")
    sae.load_state_dict(state)
    return sae.to(device)


def create_sae(architecture: str, **fields: Any) -> SparseAutoencoder:
    """Build a fresh SAE by architecture name; fields the architecture does not have are an error."""
    sae_cls = architecture_class(architecture)
    return sae_cls(sae_cls.config_class.from_dict(fields, where=f"{architecture} SAE config"))
