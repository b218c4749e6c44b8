import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saelab.errors import ConfigError
from saelab.interp.llm import ChatRequest
from saelab.interp.local_client import LocalChatClient

TEMPLATE = (
    "{% for m in messages %}<bos> {{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}<bos>{% endif %}"
)


@pytest.fixture
def chat(word_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100,
                                         max_position_embeddings=128)).eval()
    word_tokenizer.chat_template = TEMPLATE
    return model, word_tokenizer


def _request(words: str, **kw) -> ChatRequest:
    return ChatRequest((("system", "w1 w2"), ("user", words)), **kw)


def test_batched_generation_matches_one_by_one(chat) -> None:
    model, tokenizer = chat
    client = LocalChatClient(model, tokenizer, "tiny", batch_size=3)
    requests = [_request("w5", max_tokens=1, top_logprobs=5), _request("w6 w7 w8 w9 w10 w11", max_tokens=4),
                _request("w9 w3", max_tokens=2, top_logprobs=3), _request("w4", max_tokens=3)]
    batched = client.complete_many(requests)
    single = [client.complete(request) for request in requests]
    for a, b, request in zip(batched, single, requests, strict=True):
        assert a.text == b.text
        assert a.completion_tokens == b.completion_tokens <= request.max_tokens
        assert a.prompt_tokens == b.prompt_tokens == len(tokenizer(
            tokenizer.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"])
        if request.top_logprobs:
            assert a.first_token_logprobs.keys() == b.first_token_logprobs.keys()
            assert len(a.first_token_logprobs) == request.top_logprobs
            for token, logprob in a.first_token_logprobs.items():
                assert logprob == pytest.approx(b.first_token_logprobs[token], abs=1e-4)
            assert sum(math.exp(v) for v in a.first_token_logprobs.values()) <= 1.0 + 1e-6
        else:
            assert a.first_token_logprobs is None
    assert client.model_id == "local:tiny"


def test_the_first_token_alternatives_are_the_model_distribution(chat) -> None:
    model, tokenizer = chat
    request = _request("w5", max_tokens=1, top_logprobs=3)
    reply = LocalChatClient(model, tokenizer, "tiny").complete(request)
    text = tokenizer.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    logprobs = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
    values, best = logprobs.topk(3)
    expected = {tokenizer.decode([i]): v for i, v in zip(best.tolist(), values.tolist(), strict=True)}
    assert reply.first_token_logprobs == pytest.approx(expected, abs=1e-5)
    assert reply.text == tokenizer.decode([best[0].item()], skip_special_tokens=True)  # greedy


def test_a_model_without_chat_template_is_refused(chat) -> None:
    model, tokenizer = chat
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        LocalChatClient(model, tokenizer, "tiny")
