"""`saelab train`: build an SAE for a store's hookpoint and train it with the one Trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saelab.activations.store import ActivationStore
from saelab.config import Config, PresetConfig
from saelab.errors import ConfigError
from saelab.saes import SparseAutoencoder, architectures, create_sae
from saelab.saes.base import architecture_class
from saelab.training.config import DEEP_SAE_RECIPE, TrainerConfig
from saelab.training.trainer import Trainer, TrainResult


@dataclasses.dataclass
class SAESpec(Config):
    """Architecture-independent description of a fresh SAE; fields an architecture lacks must stay at default
    (None = the architecture's own default)."""

    architecture: str = dataclasses.field(default="topk", metadata={"help": "SAE architecture (see saelab.saes)"})
    n_latents: int = dataclasses.field(default=4096, metadata={"help": "dictionary size"})
    k: int = dataclasses.field(default=32, metadata={"help": "active latents per token (top-k SAEs)"})
    preprocessing: str = dataclasses.field(
        default="scale",
        metadata={"help": "none | scale (the store's E||x||=sqrt(d) factor, built into the SAE) | token_l2"},
    )
    encoder_multiples: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "deep SAEs: dense encoder widths as multiples of d_in, e.g. 2,4 (mirrored)"}
    )
    tied_init: bool | None = dataclasses.field(
        default=None, metadata={"help": "deep SAEs: start each decoder matrix as its mirror encoder's transpose"}
    )
    pre_encoder_bias: bool | None = dataclasses.field(
        default=None, metadata={"help": "deep SAEs: subtract the output bias before encoding (top-k convention)"}
    )

    def validate(self) -> None:
        if self.architecture not in architectures():
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; choose one of {architectures()}")
        if not architecture_class(self.architecture).trainable:
            trainable = [a for a in architectures() if architecture_class(a).trainable]
            raise ConfigError(
                f"architecture {self.architecture!r} can be loaded but not trained; train one of {trainable}"
            )


def build_sae(spec: SAESpec, store: ActivationStore, hookpoint: str) -> SparseAutoencoder:
    """A fresh SAE sized for `hookpoint` of `store`, with the store's normalisation built in when asked."""
    scale = store.norm_stats(hookpoint).scale if spec.preprocessing == "scale" else 1.0
    return sae_from_spec(spec, store.dims[hookpoint], scale, hookpoint, store.model_name)


def sae_from_spec(
    spec: SAESpec, d_in: int, input_scale: float, hookpoint: str | None = None, model_name: str | None = None
) -> SparseAutoencoder:
    """A fresh SAE of width `d_in`; `input_scale` (E||scale·x|| = sqrt(d_in)) is built in when the spec asks for
    preprocessing="scale". For activations that are not a store's hookpoint, e.g. tensors held in memory."""
    fields = {name: value for name, value in spec.to_dict().items() if value is not None}
    architecture = fields.pop("architecture")
    config_fields = {f.name for f in dataclasses.fields(architecture_class(architecture).config_class)}
    defaults = SAESpec().to_dict()
    for name in list(fields):
        if name not in config_fields:
            if fields[name] != defaults[name]:
                raise ConfigError(f"sae.{name} does not apply to architecture {architecture!r}; leave it unset")
            del fields[name]
    if spec.preprocessing == "scale":
        fields["input_scale"] = input_scale
    return create_sae(architecture, d_in=d_in, hookpoint=hookpoint, model_name=model_name, **fields)


def resolve_hookpoint(store: ActivationStore, hookpoint: str | None) -> str:
    if hookpoint is None:
        if len(store.hookpoints) != 1:
            raise ConfigError(f"the store holds several hookpoints {store.hookpoints}; choose one with --hookpoint")
        return store.hookpoints[0]
    if hookpoint not in store.hookpoints:
        raise ConfigError(f"hookpoint {hookpoint!r} is not in the store; it holds {store.hookpoints}")
    return hookpoint


@dataclasses.dataclass
class TrainConfig(PresetConfig):
    """`preset="deep_sae"` (`--preset deep_sae`): the deep-SAE write-up's recipe, a deep SAE with one dense layer
    each side on per-token centred, L2-normalised inputs, trained with `DEEP_SAE_RECIPE`."""

    PRESETS = {
        "deep_sae": {
            "sae": {"architecture": "deep", "encoder_multiples": [2.0], "preprocessing": "token_l2"},
            "trainer": DEEP_SAE_RECIPE,
        }
    }

    preset: str | None = dataclasses.field(
        default=None, metadata={"help": "deep_sae = the deep-SAE write-up's recipe, under any other flag given"}
    )
    store: str = dataclasses.field(default="runs/activations", metadata={"help": "activation store folder"})
    hookpoint: str | None = dataclasses.field(default=None, metadata={"help": "default: the store's only one"})
    out_dir: str = dataclasses.field(default="runs/train", metadata={"help": "run folder (checkpoints, metrics)"})
    sae: SAESpec = dataclasses.field(default_factory=SAESpec)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    shuffle_seed: int = dataclasses.field(default=0, metadata={"help": "seed of the store's batch order"})


CONFIG = TrainConfig


def train_sae(cfg: TrainConfig, store: ActivationStore | None = None) -> tuple[SparseAutoencoder, TrainResult]:
    store = store or ActivationStore(cfg.store)
    hookpoint = resolve_hookpoint(store, cfg.hookpoint)
    sae = build_sae(cfg.sae, store, hookpoint)
    out = Path(cfg.out_dir)
    trainer = Trainer(sae, cfg.trainer, out)
    if cfg.resume:
        trainer.restore()
    cfg.save(out / "train_config.json")
    batches = store.batches(hookpoint, cfg.trainer.batch_size, shuffle=True, seed=cfg.shuffle_seed, epochs=None)
    return trainer.sae, trainer.fit(batches)


def run(cfg: TrainConfig) -> TrainResult:
    return train_sae(cfg)[1]
