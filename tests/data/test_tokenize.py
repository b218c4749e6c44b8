import pytest
import torch

from saelab.data.tokenize import DataConfig, build_contexts, context_mask, pack_contexts, position_mask
from saelab.errors import ConfigError, DataError

BOS, EOS, PAD, UNK = 0, 1, 2, 3


def _ids(*words: int) -> list[int]:
    """Token ids of the words w<i> in the `word_tokenizer` fixture."""
    return [4 + w for w in words]


def _docs(*lengths: int, start: int = 0) -> list[str]:
    """Documents of consecutive words w<start>, w<start+1>, ... with the given word counts."""
    docs, word = [], start
    for length in lengths:
        docs.append(" ".join(f"w{w}" for w in range(word, word + length)))
        word += length
    return docs


def test_packing_puts_bos_first_and_eos_between_documents(word_tokenizer):
    contexts = pack_contexts(_docs(3, 4, 5), word_tokenizer, context_length=5)
    stream = _ids(0, 1, 2) + [EOS] + _ids(3, 4, 5, 6) + [EOS] + _ids(7, 8, 9, 10, 11) + [EOS]  # 15 tokens
    assert contexts.dtype == torch.long and contexts.shape == (3, 5)  # 15 // 4 full bodies of 4 tokens
    assert (contexts[:, 0] == BOS).all()
    assert contexts[:, 1:].flatten().tolist() == stream[:12]


def test_packing_without_bos_uses_the_whole_context_for_text(word_tokenizer):
    contexts = pack_contexts(_docs(3, 4), word_tokenizer, context_length=3, prepend_bos=False)
    assert contexts.flatten().tolist() == _ids(0, 1, 2) + [EOS] + _ids(3, 4, 5, 6) + [EOS]


def test_packing_reads_only_the_documents_it_needs(word_tokenizer):
    read = []

    def documents():
        for doc in _docs(*[10] * 1000):
            read.append(doc)
            yield doc

    contexts = pack_contexts(documents(), word_tokenizer, context_length=8, n_contexts=3)
    assert contexts.shape == (3, 8)
    assert len(read) <= 64  # one tokeniser batch, not the whole corpus


def test_too_small_corpus_says_how_much_there_is(word_tokenizer):
    with pytest.raises(DataError, match=r"only 16 tokens = 2 contexts of 8 .* but 5 contexts"):
        pack_contexts(_docs(7, 7), word_tokenizer, context_length=8, n_contexts=5)
    with pytest.raises(DataError, match="not enough for one context"):
        pack_contexts([], word_tokenizer, context_length=8)


def test_a_tokenizer_without_bos_is_refused_only_when_bos_is_wanted(word_tokenizer):
    word_tokenizer.bos_token = None
    with pytest.raises(DataError, match="no BOS token; set prepend_bos=False"):
        pack_contexts(_docs(9), word_tokenizer, context_length=4)
    assert pack_contexts(_docs(9), word_tokenizer, context_length=4, prepend_bos=False).shape == (2, 4)


def test_position_mask_drops_first_positions_and_listed_tokens():
    ids = torch.tensor([[BOS, 10, 11, EOS, 12], [BOS, 13, PAD, 14, 15]])
    assert position_mask(ids).all()
    mask = position_mask(ids, drop_first=2, exclude_token_ids=[BOS, EOS, PAD])
    assert mask.tolist() == [[False, False, True, False, True], [False, False, False, True, True]]
    with pytest.raises(DataError, match="drop_first=5"):
        position_mask(ids, drop_first=5)


def test_build_contexts_follows_the_config(tmp_path, word_tokenizer):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(_docs(*[6] * 10)))  # 10 documents of 6 words + EOS = 70 tokens
    cfg = DataConfig(source=str(corpus), context_length=8, n_tokens=20, drop_first_positions=1)
    contexts = build_contexts(cfg, word_tokenizer)
    assert contexts.shape == (3, 8) == (cfg.n_contexts(), cfg.context_length)  # 20 tokens / 7 usable positions
    mask = context_mask(cfg, word_tokenizer, contexts)
    assert not mask[:, 0].any()
    assert mask.sum() == (contexts[:, 1:] != EOS).sum() == 18  # 21 text positions, 3 of them EOS
    assert context_mask(cfg.replace(exclude_special_tokens=False), word_tokenizer, contexts)[:, 1:].all()
    with pytest.raises(DataError, match=rf"corpus '{corpus}': the corpus yields only 70 tokens"):
        build_contexts(cfg.replace(n_tokens=1000), word_tokenizer)


def test_data_config_rejects_inconsistent_settings():
    assert DataConfig().n_contexts() == -(-200_000 // 127)  # the BOS position is excluded, so 127 usable
    assert DataConfig(exclude_special_tokens=False).n_contexts() == -(-200_000 // 128)
    with pytest.raises(ConfigError, match="drop_first_positions"):
        DataConfig(context_length=8, drop_first_positions=8).validate()
    with pytest.raises(ConfigError, match="n_tokens"):
        DataConfig.from_dict({"n_tokens": 0})
