"""Shared test settings: deterministic, one thread (tiny tensors run fastest single-threaded), offline fixtures."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


torch.set_num_threads(1)


@pytest.fixture
def word_tokenizer():
    """Offline fast tokenizer: one token per whitespace-separated word `w0`..`w95` (anything else is <unk>),
    with BOS, EOS, pad and unk specials (ids 0-3), so token counts in tests are exact."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(96)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
