import socket

import pytest

from saelab.interp.llm import ChatRequest, LLMError
from saelab.interp.openai_client import OpenAIChatClient

QUESTION = ChatRequest((("system", "Answer Yes or No."), ("user", "Explanation: x\nExcerpt: w7 w1")), max_tokens=1)


def _client(url: str, sleeps: list[float] | None = None, **kw) -> OpenAIChatClient:
    sleep = sleeps.append if sleeps is not None else (lambda _: None)
    return OpenAIChatClient(url, "test-model", api_key_env="SAELAB_TEST_KEY", backoff_s=0.5, sleep=sleep, **kw)


def test_a_chat_completion_round_trip(fake_server, monkeypatch) -> None:
    monkeypatch.setenv("SAELAB_TEST_KEY", "secret")
    reply = _client(fake_server.url).complete(ChatRequest(QUESTION.messages, max_tokens=1, top_logprobs=2))
    assert reply.text == "Yes"
    assert (reply.prompt_tokens, reply.completion_tokens) == (9, 1)
    assert reply.first_token_logprobs == pytest.approx({"Yes": -0.22314, "No": -1.60944}, abs=1e-4)
    body = fake_server.bodies[0]
    assert body["model"] == "test-model" and body["max_tokens"] == 1 and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "system", "content": "Answer Yes or No."},
                                {"role": "user", "content": "Explanation: x\nExcerpt: w7 w1"}]
    assert (body["logprobs"], body["top_logprobs"]) == (True, 2)
    assert fake_server.headers[0]["Authorization"] == "Bearer secret"


def test_no_key_no_header_and_no_logprobs_unless_asked(fake_server, monkeypatch) -> None:
    monkeypatch.delenv("SAELAB_TEST_KEY", raising=False)
    reply = _client(fake_server.url).complete(QUESTION)
    assert reply.first_token_logprobs is None
    assert "Authorization" not in fake_server.headers[0] and "logprobs" not in fake_server.bodies[0]


def test_transient_failures_are_retried_with_exponential_backoff(fake_server) -> None:
    statuses = iter([503, 429, 200])
    fake_server.reply = lambda body: (next(statuses), "Yes")
    sleeps: list[float] = []
    assert _client(fake_server.url, sleeps, max_retries=3).complete(QUESTION).text == "Yes"
    assert fake_server.count == 3 and sleeps == [0.5, 1.0]


def test_a_failing_server_gets_retries_then_a_clear_error(fake_server) -> None:
    fake_server.reply = lambda body: (500, "internal error")
    sleeps: list[float] = []
    with pytest.raises(LLMError, match=r"no usable reply after 4 attempts \(last: HTTP 500: internal error\)"):
        _client(fake_server.url, sleeps, max_retries=3).complete(QUESTION)
    assert fake_server.count == 4 and sleeps == [0.5, 1.0, 2.0]


def test_malformed_responses_are_retried(fake_server) -> None:
    answers = iter([(200, b"<html>not json"), (200, {"choices": []}), (200, "No")])
    fake_server.reply = lambda body: next(answers)
    assert _client(fake_server.url, max_retries=2).complete(QUESTION).text == "No"
    assert fake_server.count == 3


def test_an_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(LLMError, match=rf"127.0.0.1:{port}/v1/chat/completions gave no usable reply after 3 attempts"
                                       r".*server is running"):
        _client(f"http://127.0.0.1:{port}/v1", sleeps, max_retries=2).complete(QUESTION)
    assert sleeps == [0.5, 1.0]


def test_a_refused_request_is_not_retried(fake_server) -> None:
    fake_server.reply = lambda body: (401, "invalid api key")
    with pytest.raises(LLMError, match=r"HTTP 401 invalid api key; is \$SAELAB_TEST_KEY set"):
        _client(fake_server.url, max_retries=3).complete(QUESTION)
    assert fake_server.count == 1
