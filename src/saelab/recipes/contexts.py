"""`saelab contexts`: the top-activating and random activating contexts of chosen latents of an SAE, as text.

One pass of the SAE over the store (a latent record in `record_dir`, reused by later calls for the same SAE and
store), then windows rebuilt from the store's contexts and positions, decoded with the model's tokenizer. Prints the
text and writes `contexts.txt` and `contexts.json` into `out_dir`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.errors import ConfigError
from saelab.interp.contexts import FeatureContexts, example_text, feature_contexts, feature_text
from saelab.interp.examples import ExampleSampler, TokenText
from saelab.interp.record import record_latents
from saelab.io import atomic_write_json, atomic_write_text
from saelab.models.loading import load_tokenizer
from saelab.provenance import provenance
from saelab.recipes.evaluate import check_compatible
from saelab.saes import load_sae


@dataclasses.dataclass
class ContextsConfig(Config):
    sae_dir: str = dataclasses.field(default="runs/train/sae", metadata={"help": "folder written by SAE.save"})
    store: str = dataclasses.field(default="runs/activations", metadata={"help": "activation store to search"})
    latents: list[int] = dataclasses.field(default_factory=list, metadata={"help": "latent indices, e.g. 1,2,3"})
    out_dir: str = dataclasses.field(default="runs/contexts", metadata={"help": "where the text and JSON go"})
    record_dir: str | None = dataclasses.field(
        default=None, metadata={"help": "latent record of this SAE over the store (default: <out_dir>/record)"}
    )
    tokenizer: str | None = dataclasses.field(default=None, metadata={"help": "default: the store's model"})
    n_top: int = dataclasses.field(default=10, metadata={"help": "top-activating contexts per latent"})
    n_random: int = dataclasses.field(default=10, metadata={"help": "random activating contexts per latent"})
    window_before: int = dataclasses.field(default=24, metadata={"help": "tokens shown before the activating one"})
    window_after: int = dataclasses.field(default=7, metadata={"help": "tokens shown after it"})
    max_tokens: int | None = dataclasses.field(default=None, metadata={"help": "search only the first tokens"})
    batch_size: int = dataclasses.field(default=4096, metadata={"help": "tokens per SAE batch"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seed of the random contexts"})
    device: str = "cpu"

    def validate(self) -> None:
        if not self.latents:
            raise ConfigError("name the latents to show, e.g. --latents 1,2,3")
        if min(self.n_top, self.n_random, self.window_before, self.window_after) < 0:
            raise ConfigError("n_top, n_random, window_before and window_after must be >= 0")


CONFIG = ContextsConfig


def run(cfg: ContextsConfig) -> list[FeatureContexts]:
    out = Path(cfg.out_dir)
    cfg.save(out / "contexts_config.json")
    sae = load_sae(cfg.sae_dir, device=cfg.device)
    store = ActivationStore(cfg.store)
    hookpoint = check_compatible(sae, store)
    record = record_latents(sae, store, cfg.record_dir or out / "record", hookpoint, cfg.max_tokens,
                            batch_size=cfg.batch_size)
    sampler = ExampleSampler(record, store, cfg.window_before, cfg.window_after)
    text = TokenText(load_tokenizer(cfg.tokenizer or store.model_name))
    found = feature_contexts(record, sampler, cfg.latents, cfg.n_top, cfg.n_random, cfg.seed)
    output = "\n\n".join(feature_text(contexts, text) for contexts in found)
    atomic_write_text(out / "contexts.txt", output + "\n")
    atomic_write_json(out / "contexts.json", {
        "latents": [
            {**{k: v for k, v in dataclasses.asdict(contexts).items() if k not in ("top", "random")},
             **{kind: [{**example.to_dict(), "text": example_text(example, text)}
                       for example in getattr(contexts, kind)] for kind in ("top", "random")}}
            for contexts in found
        ],
        "sae_dir": cfg.sae_dir, "hookpoint": hookpoint, "config": cfg.to_dict(), "provenance": provenance(),
    })
    print(output)
    return found
