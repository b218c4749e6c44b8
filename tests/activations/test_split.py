"""Splitting a store into training, analysis and held-out contexts; opening a reused store for a recipe."""

from pathlib import Path

import pytest
import torch

from saelab.activations.harvest import HarvestConfig, harvest, open_or_harvest
from saelab.activations.split import load_half, split_store
from saelab.data.tokenize import DataConfig, build_contexts
from saelab.errors import ConfigError
from saelab.models.loading import load_model


@pytest.fixture
def tiny_store(saved_tiny_llama, tmp_path: Path):
    model, corpus = saved_tiny_llama(hidden_size=32, num_hidden_layers=2, n_documents=60)
    llama, tokenizer = load_model(str(model))
    data = DataConfig(source=str(corpus), context_length=16, drop_first_positions=2, n_tokens=1_500)
    contexts = build_contexts(data, tokenizer)
    cfg = HarvestConfig(out_dir=str(tmp_path / "acts"), model=str(model), hookpoints=["resid_post.0"], data=data,
                        batch_size=64)
    return harvest(llama, tokenizer, contexts, cfg, show_progress=False), contexts, (llama, tokenizer, cfg)


def test_store_split_keeps_contexts_whole_and_parts_disjoint(tiny_store) -> None:
    store, contexts, _ = tiny_store
    split = split_store(store, analysis_tokens=100, downstream_contexts=3)
    context_of = store.context_index()
    assert split.train[0] == 0 and split.train[1] == split.analysis[0]
    assert split.analysis[1] - split.analysis[0] >= 100
    assert context_of[split.analysis[0] - 1] < context_of[split.analysis[0]]  # a context boundary
    assert context_of[split.analysis[1] - 1] == contexts.shape[0] - 4  # the last context before the held-out ones
    assert split.analysis[1] == int((context_of < contexts.shape[0] - 3).sum())
    torch.testing.assert_close(split.downstream, contexts[-3:])
    half = load_half(store, "resid_post.0", split.analysis, chunk=37)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), store.load("resid_post.0", *split.analysis).half().float())
    with pytest.raises(ConfigError, match="analysis_tokens"):
        split_store(store, analysis_tokens=store.n_tokens, downstream_contexts=3)
    with pytest.raises(ConfigError, match="downstream_contexts"):
        split_store(store, analysis_tokens=10, downstream_contexts=contexts.shape[0])


def test_open_or_harvest_reuses_a_matching_store_and_refuses_another(tiny_store) -> None:
    store, _, (llama, tokenizer, cfg) = tiny_store
    reused = open_or_harvest(str(store.path), llama, tokenizer, cfg)
    assert reused.n_tokens == store.n_tokens
    with pytest.raises(ConfigError, match=r"needs \['resid_post.1'\]"):
        open_or_harvest(str(store.path), llama, tokenizer, cfg.replace(hookpoints=["resid_post.1"]))
    with pytest.raises(ConfigError, match="pass the store's model"):
        open_or_harvest(str(store.path), llama, tokenizer, cfg.replace(model="another/model"))
