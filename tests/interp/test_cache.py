import pytest

from saelab.interp.cache import CachedClient, ResponseCache
from saelab.interp.llm import ChatRequest, LLMError
from saelab.interp.openai_client import OpenAIChatClient


def _question(excerpt: str, **kw) -> ChatRequest:
    return ChatRequest((("system", "Answer Yes or No."), ("user", f"Explanation: x\nExcerpt: {excerpt}")), **kw)


def _cached(url: str, path, concurrency: int = 2) -> CachedClient:
    client = OpenAIChatClient(url, "test-model", max_retries=1, backoff_s=0.0, concurrency=concurrency)
    return CachedClient(client, ResponseCache(path))


def test_the_cache_prevents_repeated_calls_across_runs(fake_server, tmp_path) -> None:
    requests = [_question("w7 w1"), _question("w2 w3"), _question("w7 w1")]  # the third repeats the first
    first = _cached(fake_server.url, tmp_path / "cache.sqlite")
    replies = first.complete_many(requests)
    assert [r.text for r in replies] == ["Yes", "No", "Yes"]
    assert fake_server.count == 2  # identical requests are sent once
    assert first.usage.to_dict() == {"requests": 2, "cache_hits": 0, "prompt_tokens": 18, "completion_tokens": 2}

    again = _cached(fake_server.url, tmp_path / "cache.sqlite")  # a rerun: a new process reading the same file
    assert again.complete_many(requests) == replies
    assert fake_server.count == 2
    assert again.usage.to_dict() == {"requests": 0, "cache_hits": 3, "prompt_tokens": 0, "completion_tokens": 0}
    assert again.cache.totals() == {"replies": 2, "prompt_tokens": 18, "completion_tokens": 2}


def test_the_key_covers_model_and_parameters(fake_server, tmp_path) -> None:
    cached = _cached(fake_server.url, tmp_path / "cache.sqlite")
    cached.complete(_question("w7"))
    cached.complete(_question("w7", temperature=0.5))
    cached.complete(_question("w7", top_logprobs=5))
    cached.complete(_question("w7", max_tokens=3))
    assert fake_server.count == 4
    other_model = CachedClient(OpenAIChatClient(fake_server.url, "other-model"), cached.cache)
    other_model.complete(_question("w7"))
    assert fake_server.count == 5 and len(cached.cache) == 5


def test_replies_that_arrived_are_kept_when_another_request_fails(fake_server, tmp_path) -> None:
    fake_server.reply = lambda body: (500, "down") if "FAIL" in body["messages"][-1]["content"] else (200, "No")
    requests = [_question("w1"), _question("FAIL"), _question("w2")]
    with pytest.raises(LLMError, match="no usable reply"):
        _cached(fake_server.url, tmp_path / "cache.sqlite", concurrency=3).complete_many(requests)
    sent = fake_server.count  # w1, w2 once each and FAIL twice (one retry)
    assert sent == 4

    fake_server.reply = lambda body: (200, "Yes")
    rerun = _cached(fake_server.url, tmp_path / "cache.sqlite")
    assert [r.text for r in rerun.complete_many(requests)] == ["No", "Yes", "No"]
    assert fake_server.count == sent + 1  # only the failed request is sent again
    assert rerun.usage.cache_hits == 2
