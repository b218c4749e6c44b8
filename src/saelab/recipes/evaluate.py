"""`saelab evaluate`: reconstruction metrics on stored activations and CE/KL with the SAE spliced into the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saelab.activations.store import ActivationStore
from saelab.config import Config
from saelab.data.tokenize import DataConfig, build_contexts
from saelab.errors import ConfigError
from saelab.evaluation import evaluate_downstream, evaluate_reconstruction
from saelab.io import atomic_write_json
from saelab.models.loading import load_model
from saelab.provenance import provenance
from saelab.saes import SparseAutoencoder, load_sae


@dataclasses.dataclass
class EvaluateConfig(Config):
    sae_dir: str = dataclasses.field(default="runs/train/sae", metadata={"help": "folder written by SAE.save"})
    store: str = dataclasses.field(default="runs/activations-eval", metadata={"help": "held-out activation store"})
    out_dir: str = dataclasses.field(default="runs/evaluate", metadata={"help": "where metrics.json goes"})
    max_tokens: int | None = dataclasses.field(default=None, metadata={"help": "cap on stored tokens evaluated"})
    batch_size: int = dataclasses.field(default=4096, metadata={"help": "activations per reconstruction batch"})
    downstream: bool = dataclasses.field(default=True, metadata={"help": "also measure CE/KL with the SAE spliced"})
    model: str | None = dataclasses.field(default=None, metadata={"help": "default: the model named by the store"})
    data: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(n_tokens=8192))
    skip_contexts: int = dataclasses.field(
        default=0, metadata={"help": "skip this many contexts of `data` first (keep downstream text held out)"}
    )
    context_batch_size: int = dataclasses.field(default=8, metadata={"help": "contexts per downstream forward"})
    mean_ablation: bool = dataclasses.field(default=True, metadata={"help": "also CE with the site mean-ablated"})
    device: str = "cpu"


CONFIG = EvaluateConfig


def check_compatible(sae: SparseAutoencoder, store: ActivationStore) -> str:
    """The hookpoint the SAE reads, after checking that the store holds it at the SAE's width."""
    hookpoint = sae.cfg.hookpoint or (store.hookpoints[0] if len(store.hookpoints) == 1 else None)
    if hookpoint is None or hookpoint not in store.hookpoints:
        raise ConfigError(
            f"the SAE was trained on hookpoint {sae.cfg.hookpoint!r} but the store holds {store.hookpoints}; "
            "harvest that hookpoint or pick the matching store"
        )
    if store.dims[hookpoint] != sae.d_in:
        raise ConfigError(
            f"dimension mismatch: the store's {hookpoint} has width {store.dims[hookpoint]} but the SAE expects "
            f"d_in={sae.d_in}; evaluate on activations of the model/hookpoint the SAE was trained on"
        )
    return hookpoint


def reconstruction_metrics(sae: SparseAutoencoder, store: ActivationStore, hookpoint: str, batch_size: int,
                           max_tokens: int | None = None) -> dict[str, Any]:
    n = store.n_tokens if max_tokens is None else min(max_tokens, store.n_tokens)

    def batches():
        for start in range(0, n, batch_size):
            yield store.load(hookpoint, start, min(start + batch_size, n))

    return evaluate_reconstruction(sae, batches())


def downstream_metrics(model: nn.Module, tokenizer, sae: SparseAutoencoder, hookpoint: str, contexts: Tensor,
                       data: DataConfig, context_batch_size: int, mean_ablation: bool = True,
                       zero_ablation: bool = True) -> dict[str, float]:
    excluded = tokenizer.all_special_ids if data.exclude_special_tokens else ()
    return evaluate_downstream(
        model, sae, hookpoint, contexts, batch_size=context_batch_size, drop_first=data.drop_first_positions,
        exclude_token_ids=excluded, zero_ablation=zero_ablation, mean_ablation=mean_ablation, progress=True,
    )


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    sae = load_sae(cfg.sae_dir, device=cfg.device)
    store = ActivationStore(cfg.store)
    hookpoint = check_compatible(sae, store)
    metrics = reconstruction_metrics(sae, store, hookpoint, cfg.batch_size, cfg.max_tokens)
    if cfg.downstream:
        model, tokenizer = load_model(cfg.model or store.model_name, cfg.device, torch.float32)
        wanted = dataclasses.replace(cfg.data, n_tokens=cfg.data.n_tokens + cfg.skip_contexts * cfg.data.context_length)
        contexts = build_contexts(wanted, tokenizer)[cfg.skip_contexts:]
        metrics.update(downstream_metrics(model, tokenizer, sae, hookpoint, contexts, cfg.data,
                                          cfg.context_batch_size, cfg.mean_ablation))
    out = Path(cfg.out_dir)
    cfg.save(out / "evaluate_config.json")
    atomic_write_json(out / "metrics.json", {**metrics, "config": cfg.to_dict(), "provenance": provenance()})
    return metrics
