"""A training store and a held-out store (and held-out contexts) from one corpus, the held-out contexts following
the training ones.

An experiment that trains an SAE on harvested activations and then measures it on text it never saw packs one
corpus by one set of rules (`DataConfig`), harvests the first `data.n_contexts()` contexts for training and takes
the contexts right after them as held-out text: a held-out store (reconstruction metrics) and the token ids
themselves (metrics that run the model, e.g. CE loss with the SAE spliced in). A training store harvested earlier
can be reused; its own data rules then apply, and it is checked to be exactly the first contexts of its corpus,
so the held-out text really is unseen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.store import ActivationStore
from saelab.data.corpora import iter_documents
from saelab.data.tokenize import DataConfig, pack_contexts
from saelab.errors import ConfigError, DataError, StoreError
from saelab.run_folder import RunFolder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TRAIN_STORE = "train"
EVAL_STORE = "eval"


@dataclasses.dataclass
class HeldOutSplit:
    """The stores and held-out contexts of one corpus, and the data rules (packing, positions kept) of all of it."""

    train_store: ActivationStore | None  # None when the training store was not asked for
    eval_store: ActivationStore  # activations of the first held-out contexts
    contexts: Tensor  # [n_heldout, context_length]: every held-out context, eval_store's first
    data: DataConfig


def reused_store_data(store: ActivationStore, model_name: str, hookpoints: Sequence[str]) -> DataConfig:
    """The data rules `store` was harvested with, once it is checked to hold `hookpoints` of `model_name`."""
    missing = [hp for hp in hookpoints if hp not in store.hookpoints]
    if missing or store.model_name != model_name:
        raise ConfigError(
            f"store {store.path} holds {store.hookpoints} of model {store.model_name!r}, not "
            f"{', '.join(missing or hookpoints)} of {model_name!r}; pass the store's model and hookpoints or harvest "
            "a new store"
        )
    harvested = store.manifest.get("config") or {}
    if "data" not in harvested:
        raise StoreError(f"store {store.path} records no harvest config; harvest it with `saelab harvest`")
    return DataConfig.from_dict(harvested["data"], where=f"{store.path} (harvest config)")


def harvest_with_heldout(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cfg: HarvestConfig,
    *,
    eval_tokens: int,
    heldout_contexts: int = 0,
    store: str | Path | None = None,
    harvest_train: bool = True,
) -> HeldOutSplit:
    """Harvest by `cfg` (resuming interrupted stores) `<cfg.out_dir>/train`, the first `cfg.data.n_contexts()`
    contexts of the corpus, and `<cfg.out_dir>/eval`, the contexts after them that hold `eval_tokens` usable
    positions; return both with at least `heldout_contexts` held-out contexts (more when the eval store needs more).

    With `store`, that store is the training store (nothing is harvested for training) and its harvest's data rules
    replace `cfg.data`; it must hold `cfg.hookpoints` of `cfg.model` and be the first contexts of its corpus. With
    `harvest_train=False` (e.g. an SAE trained elsewhere is only evaluated) no training store is harvested, but the
    held-out contexts still follow the ones it would hold.
    """
    if eval_tokens < 1:
        raise ConfigError(f"eval_tokens must be at least 1 (got {eval_tokens})")
    reused = ActivationStore(store) if store is not None else None
    data = cfg.data if reused is None else reused_store_data(reused, cfg.model, cfg.hookpoints)
    n_train = data.n_contexts() if reused is None else reused.contexts().shape[0]
    n_eval = data.replace(n_tokens=eval_tokens).n_contexts()
    documents = iter_documents(data.source, text_field=data.text_field)
    try:
        contexts = pack_contexts(documents, tokenizer, data.context_length, n_train + max(n_eval, heldout_contexts),
                                 data.prepend_bos, show_progress=True)
    except DataError as exc:
        raise DataError(f"corpus {data.source!r}, training and held-out contexts: {exc}") from None
    if reused is not None and not torch.equal(contexts[:n_train], reused.contexts()):
        raise ConfigError(
            f"store {reused.path}: its contexts are not the first {n_train} of its corpus {data.source!r}, so no "
            "held-out text can be chosen; harvest the training store with the experiment itself or `saelab harvest`"
        )

    def harvest_into(name: str, ids: Tensor) -> ActivationStore:
        folder = str(Path(cfg.out_dir) / name)
        return harvest(model, tokenizer, ids, cfg.replace(out_dir=folder, data=data, resume=True))

    train_store = reused
    if reused is None and harvest_train:
        train_store = harvest_into(TRAIN_STORE, contexts[:n_train])
    held = contexts[n_train:]
    return HeldOutSplit(train_store, harvest_into(EVAL_STORE, held[:n_eval]), held, data)


def load_model_with_heldout(
    folder: RunFolder,
    cfg: HarvestConfig,
    *,
    eval_tokens: int,
    heldout_contexts: int = 0,
    store: str | Path | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase, HeldOutSplit]:
    """The start every single-site experiment shares: load `cfg.model` (float32), then `harvest_with_heldout` into
    `<folder>/activations` (whatever `cfg.out_dir` says), timed as the run folder's `load_model` and `harvest`."""
    from saelab.models.loading import load_model

    model, tokenizer = load_model(cfg.model, cfg.device, torch.float32)
    folder.lap("load_model")
    split = harvest_with_heldout(model, tokenizer, cfg.replace(out_dir=str(folder.path / "activations")),
                                 eval_tokens=eval_tokens, heldout_contexts=heldout_contexts, store=store)
    folder.lap("harvest")
    return model, tokenizer, split
