"""Feature contexts: for chosen latents, their top-activating and randomly sampled activating contexts, with the
activating tokens marked `<<like this>>` and their activation values, as text.

Built on the latent record (one pass of the SAE over a store; `record_latents`) and the example sampler (windows
rebuilt from the store's contexts and token positions), so the HTML feature pages and autointerp read the same
windows. Random contexts never overlap the top ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.errors import ConfigError
from saelab.evaluation import check_compatible, check_on_store
from saelab.interp.examples import Example, ExampleSampler, TokenText, marked_text
from saelab.interp.record import LatentRecord, record_latents
from saelab.io import atomic_write_json, atomic_write_text
from saelab.models.loading import load_tokenizer
from saelab.provenance import provenance
from saelab.run_folder import RunFolder
from saelab.saes.self_check import SELF_CHECK_HELP
from saelab.saes.sources import SOURCE_HELP, open_sae


@dataclasses.dataclass(frozen=True)
class FeatureContexts:
    latent: int
    count: int  # recorded tokens on which the latent fires
    n_tokens: int  # recorded tokens
    max_activation: float
    top: list[Example]
    random: list[Example]


def feature_contexts(
    record: LatentRecord, sampler: ExampleSampler, latents: Sequence[int], n_top: int, n_random: int, seed: int = 0
) -> list[FeatureContexts]:
    """The `n_top` strongest and `n_random` uniformly drawn activating windows of each latent (fewer when it
    fires on fewer separate windows)."""
    counts = record.counts
    out = []
    for latent in latents:
        if not 0 <= latent < record.n_latents:
            raise ConfigError(f"latent {latent} is out of range: the SAE has {record.n_latents} latents")
        _, values = record.activations(latent)
        top = sampler.top(latent, n_top)
        random = sampler.random_activating(latent, n_random, seed=seed, exclude=top)
        out.append(FeatureContexts(latent, int(counts[latent]), record.n_tokens, float(np.max(values, initial=0.0)),
                                   top, random))
    return out


def example_text(example: Example, text: TokenText) -> str:
    """One window: its text with the activating tokens marked, then each marked token's activation."""
    pieces = text.pieces(example.token_ids)
    marks = [value > 0 for value in example.activations]
    values = ", ".join(f"{piece.strip()!r} {value:.3g}"
                       for piece, value in zip(pieces, example.activations, strict=True) if value > 0)
    where = f"context {example.context}, positions {example.start}-{example.start + len(example.token_ids) - 1}"
    return f"[max {example.max_activation:.3g}] {where}: {marked_text(pieces, marks)!r}\n      activations: {values}"


def feature_text(contexts: FeatureContexts, text: TokenText) -> str:
    """A latent's block of the text output."""
    share = contexts.count / max(contexts.n_tokens, 1)
    lines = [f"latent {contexts.latent}: fires on {contexts.count:,} of {contexts.n_tokens:,} recorded tokens "
             f"({share:.3%}), max activation {contexts.max_activation:.4g}"]
    if contexts.count == 0:
        return lines[0] + " (never fires: no contexts)"
    for title, examples in (("top-activating contexts", contexts.top), ("random activating contexts", contexts.random)):
        lines.append(f"  {title}:")
        lines += [f"    {example_text(example, text)}" for example in examples]
    return "\n".join(lines)


# ---- `saelab contexts` ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ContextsConfig(Config):
    sae_dir: str = dataclasses.field(default="runs/train/sae", metadata={"help": f"the SAE: {SOURCE_HELP}"})
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
    self_check: bool = dataclasses.field(default=True, metadata={"help": SELF_CHECK_HELP})
    device: str = "cpu"

    def validate(self) -> None:
        if not self.latents:
            raise ConfigError("name the latents to show, e.g. --latents 1,2,3")
        if min(self.n_top, self.n_random, self.window_before, self.window_after) < 0:
            raise ConfigError("n_top, n_random, window_before and window_after must be >= 0")


def write_contexts(cfg: ContextsConfig) -> str:
    """`saelab contexts`: the chosen latents' contexts as marked text (returned, and written to `contexts.txt`, with
    the examples in `contexts.json`). One pass of the SAE over the store is recorded in `record_dir` and reused by
    later calls for the same SAE and store."""
    out = Path(cfg.out_dir)
    RunFolder.start(cfg)
    sae = open_sae(cfg.sae_dir, device=cfg.device)
    store = ActivationStore(cfg.store)
    hookpoint = check_compatible(sae, store)
    check_on_store(sae, store, hookpoint, cfg.sae_dir, cfg.self_check)
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
    return output
