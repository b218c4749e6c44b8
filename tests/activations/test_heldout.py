"""Training and held-out stores from one corpus: the held-out contexts follow the training ones, counted by the
positions each context really contributes; a reused training store must continue its own corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.activations.harvest import HarvestConfig, harvest
from saelab.activations.heldout import harvest_with_heldout, reused_store_data
from saelab.activations.writer import StoreWriter
from saelab.data.corpora import iter_documents
from saelab.data.tokenize import DataConfig, pack_contexts
from saelab.errors import ConfigError, StoreError

HOOKPOINT = "resid_post.1"


@pytest.fixture
def setup(tmp_path: Path, word_tokenizer):
    """A tiny random Llama, the word tokenizer and a corpus file of random-word documents."""
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(word_tokenizer), max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
    )).eval()
    generator = torch.Generator().manual_seed(0)
    documents = [" ".join(f"w{int(i)}" for i in torch.randint(0, 96, (30,), generator=generator)) for _ in range(40)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(documents))
    data = DataConfig(source=str(corpus), context_length=16, n_tokens=300, drop_first_positions=2)
    cfg = HarvestConfig(out_dir=str(tmp_path / "run" / "activations"), model="tiny", hookpoints=[HOOKPOINT],
                        data=data, batch_size=4, shard_tokens=128)
    return model, word_tokenizer, cfg


def test_heldout_contexts_follow_the_training_ones(setup, tmp_path: Path) -> None:
    model, tokenizer, cfg = setup
    split = harvest_with_heldout(model, tokenizer, cfg, eval_tokens=100, heldout_contexts=12)
    n_train = cfg.data.n_contexts()  # 300 usable tokens at 14 per context (positions 0-1 dropped): 22 contexts
    n_eval = 8  # 100 held-out tokens at 14 per context, not at context_length - 1 = 15
    assert n_train == 22 and cfg.data.replace(n_tokens=100).n_contexts() == n_eval
    everything = pack_contexts(iter_documents(cfg.data.source), tokenizer, 16, n_train + 12)
    assert torch.equal(split.train_store.contexts(), everything[:n_train])
    assert torch.equal(split.contexts, everything[n_train:])
    assert torch.equal(split.eval_store.contexts(), everything[n_train : n_train + n_eval])
    assert 0 < split.eval_store.n_tokens <= n_eval * 14 and split.data == cfg.data
    assert split.train_store.path == Path(cfg.out_dir) / "train" and split.eval_store.path == Path(cfg.out_dir) / "eval"

    # Reusing the training store: its own data rules apply, the held-out text is the same, nothing is harvested
    # for training.
    other = cfg.replace(out_dir=str(tmp_path / "reuse"), data=cfg.data.replace(n_tokens=999))
    reused = harvest_with_heldout(model, tokenizer, other, eval_tokens=100, store=split.train_store.path)
    assert reused.train_store.path == split.train_store.path and reused.data == cfg.data
    assert torch.equal(reused.contexts, everything[n_train : n_train + n_eval])
    assert not (tmp_path / "reuse" / "train").exists()

    # Only the held-out store (an SAE trained elsewhere): the held-out contexts still follow the training ones.
    only_eval = harvest_with_heldout(model, tokenizer, cfg.replace(out_dir=str(tmp_path / "only")), eval_tokens=100,
                                     harvest_train=False)
    assert only_eval.train_store is None and not (tmp_path / "only" / "train").exists()
    assert torch.equal(only_eval.eval_store.contexts(), split.eval_store.contexts())


def test_a_reused_store_must_be_the_first_contexts_of_its_corpus(setup, tmp_path: Path) -> None:
    model, tokenizer, cfg = setup
    contexts = pack_contexts(iter_documents(cfg.data.source), tokenizer, 16, 6)
    shifted = harvest(model, tokenizer, contexts[1:], cfg.replace(out_dir=str(tmp_path / "shifted")))
    with pytest.raises(ConfigError, match="are not the first 5 of its corpus"):
        harvest_with_heldout(model, tokenizer, cfg, eval_tokens=50, store=shifted.path)
    with pytest.raises(ConfigError, match="eval_tokens must be at least 1"):
        harvest_with_heldout(model, tokenizer, cfg, eval_tokens=0)


def _synthetic_store(path: Path, config: dict | None):
    writer = StoreWriter(path, model="synthetic", hookpoints=["resid_post.0", "resid_post.2"], dtype="float32",
                         context_length=4, shard_tokens=64, config=config)
    n = 32
    writer.append({"resid_post.0": torch.randn(n, 3), "resid_post.2": torch.randn(n, 3) * 10 + 5},
                  torch.arange(n) % 50, torch.arange(n) % 4, torch.arange(n) // 4, n_contexts=8)
    return writer.finish()


def test_a_reused_store_must_hold_the_layers_of_the_model_and_record_its_data(tmp_path: Path) -> None:
    data = DataConfig(n_tokens=5, drop_first_positions=1)
    store = _synthetic_store(tmp_path / "store", {"data": data.to_dict()})
    assert reused_store_data(store, "synthetic", ["resid_post.0", "resid_post.2"]) == data
    with pytest.raises(ConfigError, match=r"holds \['resid_post.0', 'resid_post.2'\] of model 'synthetic', not "
                                          r"resid_post.1 of 'synthetic'"):
        reused_store_data(store, "synthetic", ["resid_post.0", "resid_post.1"])
    with pytest.raises(ConfigError, match="of model 'synthetic', not resid_post.0 of 'smollm2-135m'"):
        reused_store_data(store, "smollm2-135m", ["resid_post.0"])
    bare = _synthetic_store(tmp_path / "bare", None)
    with pytest.raises(StoreError, match="records no harvest config"):
        reused_store_data(bare, "synthetic", ["resid_post.0"])
