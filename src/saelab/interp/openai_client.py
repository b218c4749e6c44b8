"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, OpenRouter, vLLM, Ollama, llama.cpp).

Standard library only (urllib). The API key is read from an environment variable named in the config, never
stored; without it no Authorization header is sent (local servers need none). Connection failures, timeouts,
HTTP 408/409/429/5xx and unreadable responses are retried with exponential backoff; other HTTP errors (a wrong
model name, a bad key) are raised at once, since retrying cannot fix them.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from saelab.interp.llm import ChatClient, ChatReply, ChatRequest, LLMError, merge_logprobs

RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A failure worth another attempt."""


class OpenAIChatClient(ChatClient):
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 120.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        concurrency: int = 4,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.model_id = f"openai:{model}"
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self._sleep = sleep

    def complete(self, request: ChatRequest) -> ChatReply:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.chat_messages(),
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.top_logprobs:
            body.update(logprobs=True, top_logprobs=request.top_logprobs)
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return _parse(self._post(data))
            except _Retryable as exc:
                last = str(exc)
        raise LLMError(
            f"{self.url} gave no usable reply after {self.max_retries + 1} attempts (last: {last}). Check that the "
            "server is running and reachable at that base URL, then rerun: scored latents are kept and cached "
            "replies are not requested again"
        )

    def _post(self, data: bytes) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        http_request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode("utf-8", "replace")
            if exc.code in RETRYABLE_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {detail}") from None
            hint = f"; is ${self.api_key_env} set to a valid key?" if exc.code in (401, 403) else ""
            raise LLMError(
                f"{self.url} refused the request for model {self.model!r}: HTTP {exc.code} {detail}{hint}"
            ) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"the response is not JSON: {raw[:120]!r}") from None


def _parse(response: dict[str, Any]) -> ChatReply:
    """The first choice's text, the token usage and, if present, the first token's top alternatives."""
    try:
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise _Retryable(f"the response has no choices[0].message: {json.dumps(response)[:160]}") from None
    usage = response.get("usage") or {}
    return ChatReply(
        text=str(text),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        first_token_logprobs=_first_token_logprobs(choice),
    )


def _first_token_logprobs(choice: dict[str, Any]) -> dict[str, float] | None:
    """`top_logprobs` of the first generated token (or just the token chosen); None when absent or malformed."""
    try:
        first = choice["logprobs"]["content"][0]
        alternatives = [(str(alt["token"]), float(alt["logprob"])) for alt in first.get("top_logprobs") or []]
        return merge_logprobs(alternatives or [(str(first["token"]), float(first["logprob"]))])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
