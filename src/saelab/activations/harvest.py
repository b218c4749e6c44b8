"""Harvest a model's activations at several hookpoints, in one forward pass per batch, into an activation store.

Each batch of contexts runs only up to the deepest hookpoint (`capture` stops early); the kept positions (special
tokens and the first positions can be dropped, since their activations are outliers) are flattened to rows and
streamed to a `StoreWriter`, so memory is bounded by one shard plus one batch. The writer publishes each shard
atomically, and a harvest with `resume` continues after the last published context of an interrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.activations.store import ActivationStore
from saelab.activations.writer import StoreWriter
from saelab.config import Config
from saelab.data.tokenize import DataConfig, build_contexts, context_mask
from saelab.errors import ConfigError, DataError
from saelab.models.hookpoints import resolve_hookpoint
from saelab.models.hooks import capture
from saelab.models.loading import OFFLINE_DEFAULT_MODEL, load_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Settings that change how fast a harvest runs, not what it stores: they may differ when resuming.
_EXECUTION_FIELDS = ("out_dir", "batch_size", "shard_tokens", "device", "resume")


@dataclasses.dataclass
class HarvestConfig(Config):
    """What to harvest (model, hookpoints, data, storage dtype) and how (batching, device).

    Which positions are kept (first positions, special tokens) is part of `data`, so the store and every later
    use of the same contexts agree on it.
    """

    out_dir: str = dataclasses.field(default="runs/activations", metadata={"help": "store folder"})
    model: str = dataclasses.field(default=OFFLINE_DEFAULT_MODEL, metadata={"help": "HF name, path or offline default"})
    hookpoints: list[str] = dataclasses.field(
        default_factory=lambda: ["resid_post.15"], metadata={"help": "comma-separated canonical hookpoint names"}
    )
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    batch_size: int = dataclasses.field(default=8, metadata={"help": "contexts per forward pass"})
    dtype: Literal["float16", "float32"] = dataclasses.field(default="float16", metadata={"help": "storage dtype"})
    model_dtype: Literal["float32", "bfloat16", "float16"] = dataclasses.field(
        default="float32", metadata={"help": "dtype the model runs in"}
    )
    shard_tokens: int = dataclasses.field(default=65536, metadata={"help": "tokens per shard (whole batches)"})
    device: str = dataclasses.field(default="cpu", metadata={"help": "device the model runs on"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue an interrupted harvest"})

    def validate(self) -> None:
        if not self.hookpoints:
            raise ConfigError("HarvestConfig.hookpoints is empty; name at least one hookpoint, e.g. resid_post.6")
        if self.batch_size < 1 or self.shard_tokens < 1:
            raise ConfigError("HarvestConfig.batch_size and shard_tokens must be at least 1")


def harvest(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Tensor,
    cfg: HarvestConfig,
    show_progress: bool = True,
) -> ActivationStore:
    """Store the activations of `contexts[N, T]` at `cfg.hookpoints` in `cfg.out_dir` and open the store.

    Positions are kept by `cfg.data`'s rules (`context_mask`); everything else in `cfg.data` only documents where
    the contexts came from.
    """
    if contexts.ndim != 2 or contexts.shape[0] == 0 or contexts.is_floating_point():
        raise DataError(
            f"contexts must be a non-empty integer tensor [n_contexts, context_length], got {contexts.dtype} "
            f"{tuple(contexts.shape)}; build them with saelab.data.tokenize.build_contexts"
        )
    contexts = contexts.detach().to("cpu", torch.long)
    n_contexts, length = contexts.shape
    # a bad name fails here, before any store folder is written; aliases are stored by their canonical names
    cfg = dataclasses.replace(cfg, hookpoints=list(dict.fromkeys(resolve_hookpoint(model, hp).name
                                                                   for hp in cfg.hookpoints)))
    writer = store_writer(cfg, contexts)
    if writer.complete:
        return writer.finish()
    positions = torch.arange(length).expand(cfg.batch_size, length)
    start = writer.n_contexts
    with tqdm(
        total=(n_contexts - start) * length, unit="tok", unit_scale=True, desc="harvest", disable=not show_progress
    ) as bar:
        for first in range(start, n_contexts, cfg.batch_size):
            ids = contexts[first : first + cfg.batch_size]
            keep = context_mask(cfg.data, tokenizer, ids)
            acts = capture(model, ids, cfg.hookpoints, stop_early=True)
            context_index = torch.arange(first, first + len(ids))[:, None].expand_as(ids)
            writer.append(
                {hp: x[keep.to(x.device)] for hp, x in acts.items()},
                token_ids=ids[keep],
                positions=positions[: len(ids)][keep],
                context_index=context_index[keep],
                n_contexts=len(ids),
            )
            bar.update(ids.numel())
    return writer.finish()


def store_writer(cfg: HarvestConfig, contexts: Tensor) -> StoreWriter:
    """The writer of `cfg.out_dir` for a harvest of `contexts` (continuing a partial store when `cfg.resume`); also
    what `saelab train --model --cache-to` writes through, so its cache is the store this harvest would write."""
    return StoreWriter(
        cfg.out_dir,
        model=cfg.model,
        hookpoints=cfg.hookpoints,
        dtype=cfg.dtype,
        context_length=contexts.shape[1],
        shard_tokens=cfg.shard_tokens,
        config=cfg.to_dict(),
        source={"n_contexts": contexts.shape[0],
                "contexts_sha256": hashlib.sha256(contexts.numpy().tobytes()).hexdigest()},
        resume=cfg.resume,
        volatile=_EXECUTION_FIELDS,
        contexts=contexts,
    )


def harvest_from_config(cfg: HarvestConfig, show_progress: bool = True) -> ActivationStore:
    """Load `cfg.model`, build the contexts of `cfg.data` with its tokenizer, and harvest them."""
    model, tokenizer = load_model(cfg.model, cfg.device, getattr(torch, cfg.model_dtype))
    contexts = build_contexts(cfg.data, tokenizer)
    return harvest(model, tokenizer, contexts, cfg, show_progress=show_progress)


def open_or_harvest(
    store: str | None, model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: HarvestConfig
) -> ActivationStore:
    """The store at `store`, checked to hold `cfg.hookpoints` of `cfg.model`; or, with `store` None, a harvest of
    `cfg` into `cfg.out_dir` (resumed when `cfg.resume` and a partial store is there)."""
    if store is None:
        return harvest(model, tokenizer, build_contexts(cfg.data, tokenizer, show_progress=True), cfg)
    opened = ActivationStore(store)
    if any(hp not in opened.hookpoints for hp in cfg.hookpoints) or opened.model_name != cfg.model:
        raise ConfigError(
            f"store {store} holds {opened.hookpoints} of model {opened.model_name!r}; this run needs "
            f"{cfg.hookpoints} of {cfg.model!r}. Harvest them (omit --store) or pass the store's model with --model"
        )
    return opened
