"""The one interface every dictionary implements, so metrics, trainers, analyses and reports take any of them.

Spaces. An SAE owns its input preprocessing (e.g. the deep-SAE recipe's per-token centre + L2 normalise), because
it must be applied identically in training and in every later evaluation. So:

- `normalize(x) -> (x_n, stats)` and `denormalize(x_hat_n, stats) -> x_hat` map raw activations to the SAE's own
  space and back;
- `encode(x_n)`, `decode(latents)` and `forward(x_n)` work in that normalised space (training, FVU/NMSE);
- `reconstruct(x)` is raw -> raw (normalise, forward, denormalise): what splicing into a model uses.

Latents are either a dense `[..., n_latents]` tensor or a `SparseLatents` (values and indices of the k active
latents per token), which the fast top-k path returns to avoid materialising `[B, n]`.

Training. An SAE owns its training behaviour, so the trainer stays generic and a new architecture touches only
`saelab.saes`:

- `training_loss(x_n, output, ctx, dead_mask) -> {name: LossTerm}`: the named, weighted terms whose sum is the
  loss (`recon` always; the shared terms below when `ctx` asks for them; an architecture adds its own);
- `check_training(ctx)`: refuse, before training starts, options the architecture cannot honour;
- `initialize_from_batch(x_n)`: data-dependent init on the first (normalised) batch of a fresh run;
- `normalize_target(y)`, `initialize_from_pair(x_n, y_n)`: for SAEs that predict another activation from their
  input (transcoders). Batches may then be (input, target) pairs: the target is normalised by the SAE's own target
  scale, `ctx.target` carries it to `training_loss`, and the recon (and AuxK) terms compare the output with it.
  The default `normalize_target` refuses: an autoencoder reconstructs its own input;
- `decoder_matrices()`: the matrices kept at unit norm per unit;
- `self.training`: the trainer puts the SAE in training mode while it trains and in eval mode after (`load_sae`
  returns eval mode), for architectures whose encoding differs in training (BatchTopK selects over the batch);
- optional protocols: `SupportsL1` (`decoder_norms`), `SupportsAuxK` (`auxk_latents`), `SupportsResampling`
  (`latent_parameters`).

Data-parallel training. Each process may see only its slice of the batch; then `ctx.share` (a `BatchShare`) holds
what the loss needs of the whole batch (its token count, the pooled FVU's denominator) and every loss term returns
this process's share of the whole batch's value, so the shares sum over processes to the one-process loss and the
trainer sums their gradients. `ctx.share` is None for a one-process run: the loss is the batch's own, unchanged.
An SAE needs no code for this as long as its terms come from `saelab.saes.losses` with `ctx.share` passed on.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.config import Config
from saelab.errors import CheckpointError, ConfigError
from saelab.io import atomic_write_json, atomic_write_with
from saelab.saes.latents import ForwardOutput, Latents, SparseLatents, to_dense

__all__ = ["ForwardOutput", "Latents", "SparseLatents", "to_dense"]

PREPROCESSING_KINDS = ("none", "scale", "token_l2")


class LossTerm(NamedTuple):
    """One named part of the training loss: the trainer adds `weight * value` and logs `value`."""

    value: Tensor
    weight: float = 1.0

    def weighted(self) -> Tensor:
        return self.value if self.weight == 1.0 else self.weight * self.value


@dataclasses.dataclass(frozen=True)
class BatchShare:
    """This process's part of a batch split across processes (data-parallel training), per step.

    A pooled ratio over the batch (FVU) is not the mean of per-slice ratios, and a mean over tokens must divide by
    the whole batch's tokens; so loss terms divide this process's sums by these whole-batch quantities, which makes
    each term this process's share of the whole batch's value (the shares sum to it).
    """

    n_tokens: int  # tokens in the whole batch (every process)
    x_sq_dev: Tensor  # Σ_t ||x_t − mean(x)||² of the whole normalised batch: the pooled FVU's denominator
    # The same sum over the whole batch for another per-token tensor of this slice (AuxK's residual); a collective,
    # so every process must call it at the same point of the step.
    sq_dev: Callable[[Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class TrainingContext:
    """The trainer's settings that loss terms and checks read (from `TrainerConfig`), plus, in data-parallel
    training, this step's `BatchShare` (None: the batch is all there is)."""

    loss: str = "fvu"  # "fvu": pooled batch FVU; "mse": mean over elements
    l1_coefficient: float = 0.0
    activation_decay: float = 0.0
    auxk_coefficient: float = 0.0
    k_aux: int = 1
    resample: bool = False  # dead latents are resampled
    share: BatchShare | None = None
    # This step's normalised target when the batch is an (input, target) pair (`normalize_target`); None: the
    # output should match the input itself.
    target: Tensor | None = None


@runtime_checkable
class SupportsL1(Protocol):
    def decoder_norms(self) -> Tensor:
        """Differentiable norm of each latent's decoder direction, [n_latents] (norm-weighted L1)."""


@runtime_checkable
class SupportsAuxK(Protocol):
    def auxk_latents(self, x: Tensor, dead_mask: Tensor, k_aux: int) -> SparseLatents:
        """The top `k_aux` latents among the dead ones by pre-activation, differentiable w.r.t. the encoder."""


@runtime_checkable
class SupportsResampling(Protocol):
    def latent_parameters(self) -> dict[str, int]:
        """Parameter name -> the dimension indexed by latent (what resampling re-initialises)."""


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
    def d_out(self) -> int:
        """Width of the output: the input's, except for SAEs that predict another activation (transcoders)."""
        return self.cfg.d_in

    @property
    def target_hookpoint(self) -> str | None:
        """The hookpoint the output predicts when it is not the one read (a transcoder's target); None for an
        autoencoder. Splicing replaces this site, computed from the one read."""
        return None

    @property
    def output_scale(self) -> float:
        """The factor `denormalize` divides the output by under preprocessing="scale" (the target's own scale for a
        transcoder)."""
        return self.cfg.input_scale

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
            return x_hat / self.output_scale
        return x_hat

    def normalize_target(self, y: Tensor) -> Tensor:
        """A raw target activation -> the space the output is compared in (SAEs that predict another activation
        override this; see the module docstring)."""
        raise ConfigError(
            f"{type(self).__name__} reconstructs its own input, so it takes no separate target; train a transcoder "
            "(--target-hookpoint) to predict another activation"
        )

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
        return x_hat.reshape(*shape[:-1], x_hat.shape[-1]).to(x.dtype)

    # ---- decoder geometry (the trainer's unit-norm constraint uses these) ------------------------------
    def decoder_matrices(self) -> list[Tensor]:
        """Decoder weights kept at unit norm per input unit, stored [units_in, d_out] (row = one unit's
        direction). The shallow SAE returns [W_dec]; the deep SAE returns every decoder matrix."""
        return []

    # ---- training hooks (see the module docstring) --------------------------------------------------------
    def training_loss(
        self, x_n: Tensor, output: ForwardOutput, ctx: TrainingContext, dead_mask: Callable[[], Tensor]
    ) -> dict[str, LossTerm]:
        """Named loss terms of one batch. `dead_mask()` gives the latents currently counted dead (boolean
        [n_latents]). Subclasses extend the dict (call super) or replace it."""
        from saelab.saes import losses  # imports saelab.metrics, which imports this package

        x_hat, latents = output
        share = ctx.share
        target = x_n if ctx.target is None else ctx.target
        terms = {"recon": LossTerm(losses.reconstruction_loss(target, x_hat, ctx.loss, share))}
        if ctx.l1_coefficient > 0:
            assert isinstance(self, SupportsL1)
            terms["l1"] = LossTerm(losses.l1_penalty(latents, self.decoder_norms(), share), ctx.l1_coefficient)
        if ctx.activation_decay > 0:
            terms["activation_decay"] = LossTerm(losses.activation_decay_penalty(latents, self.n_latents, share),
                                                 ctx.activation_decay)
        if ctx.auxk_coefficient > 0:
            assert isinstance(self, SupportsAuxK)
            terms["auxk"] = LossTerm(losses.auxk_loss(self, x_n, x_hat, dead_mask(), ctx.k_aux, share, target),
                                     ctx.auxk_coefficient)
        return terms

    def check_training(self, ctx: TrainingContext) -> None:
        """Raise ConfigError for a training option this SAE cannot honour (before any step runs)."""
        if not self.trainable:
            raise ConfigError(f"{type(self).__name__} ({self.architecture!r}) can be loaded but not trained here")
        for option, enabled, protocol, method in (
            ("l1_coefficient", ctx.l1_coefficient > 0, SupportsL1, "decoder_norms"),
            ("auxk_coefficient", ctx.auxk_coefficient > 0, SupportsAuxK, "auxk_latents"),
            ("resample_every_steps", ctx.resample, SupportsResampling, "latent_parameters"),
        ):
            if enabled and not isinstance(self, protocol):
                raise ConfigError(
                    f"{option} needs the SAE method {method}(), which {type(self).__name__} lacks; "
                    f"unset {option} or use an SAE that implements it"
                )

    def initialize_from_batch(self, x_n: Tensor) -> None:  # noqa: B027 (a hook: most SAEs need no data init)
        """Data-dependent init from the first normalised batch of a fresh run (after the decoder constraint is
        applied, so an init that measures the output sees the decoder it will train). Default: nothing."""

    def initialize_from_pair(self, x_n: Tensor, y_n: Tensor) -> None:
        """`initialize_from_batch` for a first batch of (input, normalised target) pairs; default: from the input."""
        self.initialize_from_batch(x_n)

    # ---- what the trainer asks of an SAE split across processes (`saelab.saes.sharded`) -----------------
    # True where the parameters are shards of one SAE spread over a process group: every process trains on the
    # same batches, and only the primary one writes the run's files.
    sharded: ClassVar[bool] = False

    @property
    def primary(self) -> bool:
        """Whether this process writes the run's files (metrics, checkpoints, the final SAE)."""
        return True

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm before."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

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
    return sae.to(device).eval()  # inference mode: the trainer switches to training mode itself


def create_sae(architecture: str, **fields: Any) -> SparseAutoencoder:
    """Build a fresh SAE by architecture name; fields the architecture does not have are an error."""
    sae_cls = architecture_class(architecture)
    return sae_cls(sae_cls.config_class.from_dict(fields, where=f"{architecture} SAE config"))
