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


def _request(words: str, system: str = "w1 w2", **kw) -> ChatRequest:
    return ChatRequest((("system", system), ("user", words)), **kw)


def test_batched_generation_matches_one_by_one(chat) -> None:
    model, tokenizer = chat
    client = LocalChatClient(model, tokenizer, "tiny", batch_size=3)
    requests = [_request("w5", max_tokens=1, top_logprobs=5), _request("w6 w7 w8 w9 w10 w11", max_tokens=4),
                _request("w9 w3", max_tokens=2, top_logprobs=3), _request("w4", max_tokens=3),
                _request("w4", max_tokens=1, temperature=0.7), _request("w7", max_tokens=1)]
    batched = client.complete_many(requests)
    single = [client.complete(request) for request in requests]
    assert batched[4].completion_tokens == 1  # sampled: any one token
    del batched[4], single[4], requests[4]
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


def _full_forward(model, tokenizer, request: ChatRequest, k: int) -> tuple[dict[str, float], str, int]:
    """(top-k first-token log-probabilities, greedy reply, prompt length) from one plain forward of the prompt."""
    text = tokenizer.apply_chat_template(request.chat_messages(), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    values, best = torch.log_softmax(model(ids).logits[0, -1], dim=-1).topk(k)
    expected = {tokenizer.decode([i]): v for i, v in zip(best.tolist(), values.tolist(), strict=True)}
    return expected, tokenizer.decode([best[0].item()], skip_special_tokens=True), ids.shape[1]


def test_one_token_answers_share_the_prefix_and_match_a_full_forward(chat) -> None:
    model, tokenizer = chat
    system = " ".join(f"w{i}" for i in range(30))  # long, like the scorers' instructions
    requests = [_request(words, system, max_tokens=1, top_logprobs=3)
                for words in ("w5", "w5 w6", "w9 w8 w7 w6 w5", "w2 w3", "w40 w41 w42")]
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    replies = LocalChatClient(model, tokenizer, "tiny", batch_size=4).complete_many(requests)
    hook.remove()
    prompt_tokens = 0
    for request, reply in zip(requests, replies, strict=True):
        expected, text, length = _full_forward(model, tokenizer, request, k=3)
        assert reply.first_token_logprobs == pytest.approx(expected, abs=1e-5)
        assert reply.text == text and reply.prompt_tokens == length  # greedy
        prompt_tokens += length
    assert sum(seen) < 0.6 * prompt_tokens  # the shared system prompt ran once per batch, not once per request


def test_a_model_without_chat_template_is_refused(chat) -> None:
    model, tokenizer = chat
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        LocalChatClient(model, tokenizer, "tiny")
