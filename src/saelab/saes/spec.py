"""Fresh SAEs from an architecture-independent spec: what `saelab train --sae.*` and every experiment build."""

from __future__ import annotations

import dataclasses

from saelab.config import Config
from saelab.errors import ConfigError
from saelab.saes.base import SparseAutoencoder, architecture_class, architectures, create_sae
from saelab.saes.initialization import seeded


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

    l0_coefficient: float | None = dataclasses.field(
        default=None, metadata={"help": "jumprelu: weight of the L0 penalty (of its target form with target_l0)"}
    )
    target_l0: float | None = dataclasses.field(
        default=None, metadata={"help": "jumprelu: steer the mean L0 to this (penalty (L0/target - 1)^2)"}
    )
    bandwidth: float | None = dataclasses.field(
        default=None, metadata={"help": "jumprelu: straight-through estimator bandwidth (normalised input units)"}
    )

    prefixes: list[int] | None = dataclasses.field(
        default=None, metadata={"help": "matryoshka: nested latent prefix sizes, e.g. 128,512,2048"}
    )
    batch_topk: bool | None = dataclasses.field(
        default=None, metadata={"help": "matryoshka: select BatchTopK (default) or plain top-k per token (false)"}
    )
    skip_connection: bool | None = dataclasses.field(
        default=None, metadata={"help": "transcoders (--target-hookpoint): add a linear skip x @ W_skip.T"}
    )

    def validate(self) -> None:
        if self.architecture not in architectures():
            raise ConfigError(f"unknown SAE architecture {self.architecture!r}; choose one of {architectures()}")
        if not architecture_class(self.architecture).trainable:
            trainable = [a for a in architectures() if architecture_class(a).trainable]
            raise ConfigError(
                f"architecture {self.architecture!r} can be loaded but not trained; train one of {trainable}"
            )


@dataclasses.dataclass(frozen=True)
class Target:
    """The activation a transcoder predicts: its hookpoint, width and (preprocessing="scale") its own scale."""

    hookpoint: str
    d_out: int
    scale: float = 1.0


TRANSCODERS = {"topk": "topk_transcoder", "topk_transcoder": "topk_transcoder"}


def sae_from_spec(
    spec: SAESpec,
    d_in: int,
    input_scale: float,
    hookpoint: str | None = None,
    model_name: str | None = None,
    seed: int = 0,
    target: Target | None = None,
) -> SparseAutoencoder:
    """A fresh SAE of width `d_in`, its initial weights drawn from `seed` alone; `input_scale` (E||scale·x|| =
    sqrt(d_in)) is built in when the spec asks for preprocessing="scale". With `target`, the transcoder of the
    spec's architecture that reads `hookpoint` and predicts the target."""
    fields = {name: value for name, value in spec.to_dict().items() if value is not None}
    architecture = fields.pop("architecture")
    if target is not None:
        if architecture not in TRANSCODERS:
            raise ConfigError(
                f"--target-hookpoint trains a transcoder, which is top-k here; architecture {architecture!r} has "
                "none (use --sae.architecture topk)"
            )
        architecture = TRANSCODERS[architecture]
        fields.update(d_out=target.d_out, target_hookpoint=target.hookpoint)
        if spec.preprocessing == "scale":
            fields["target_scale"] = target.scale
    config_fields = {f.name for f in dataclasses.fields(architecture_class(architecture).config_class)}
    defaults = SAESpec().to_dict()
    for name in list(fields):
        if name not in config_fields:
            if fields[name] != defaults[name]:
                raise ConfigError(f"sae.{name} does not apply to architecture {architecture!r}; leave it unset")
            del fields[name]
    if spec.preprocessing == "scale":
        fields["input_scale"] = input_scale
    with seeded(seed):
        return create_sae(architecture, d_in=d_in, hookpoint=hookpoint, model_name=model_name, **fields)
