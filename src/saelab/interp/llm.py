"""What every chat model looks like to the explainer and scorers: a request, a reply, and a client.

Clients differ in transport (an OpenAI-compatible HTTP endpoint, a local transformers model) but share this
interface, so the response cache, the explainer and the scorers work with any of them. `complete_many` reports
each reply through `on_reply` as soon as it arrives, so a caller can persist it before a later request fails.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any

from saelab.errors import SaelabError

OnReply = Callable[[int, "ChatReply"], None]


class LLMError(SaelabError):
    """A chat model could not be reached or refused the request (after retries where retrying makes sense)."""


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """Messages are (role, content) pairs; `top_logprobs` > 0 asks for that many alternatives of the first
    generated token with their log-probabilities (scorers turn them into P(yes))."""

    messages: tuple[tuple[str, str], ...]
    max_tokens: int = 256
    temperature: float = 0.0
    top_logprobs: int = 0

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def cache_payload(self, model_id: str) -> dict[str, Any]:
        """Everything that determines the reply: the cache key is a hash of this."""
        return {"model": model_id, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class ChatReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    first_token_logprobs: dict[str, float] | None = None  # token text -> log-probability

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatReply:
        return cls(**data)


def merge_logprobs(pairs: Sequence[tuple[str, float]]) -> dict[str, float]:
    """token text -> log-probability, summing (in probability) alternatives that decode to the same text."""
    merged: dict[str, float] = {}
    for token, logprob in pairs:
        if token in merged:
            high, low = max(merged[token], logprob), min(merged[token], logprob)
            merged[token] = high + math.log1p(math.exp(low - high))
        else:
            merged[token] = logprob
    return merged


class ChatClient(ABC):
    """A chat model. `model_id` names it in cache keys (kind and model, e.g. "openai:gpt-4o-mini")."""

    model_id: str
    concurrency: int = 1

    @abstractmethod
    def complete(self, request: ChatRequest) -> ChatReply:
        """One reply; raises LLMError when the model cannot be reached."""

    def complete_many(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[ChatReply]:
        """Replies in request order, with at most `concurrency` requests in flight. On the first failure the
        requests not yet started are cancelled and the error is raised once the running ones have finished
        (their replies still reach `on_reply`)."""
        replies: list[ChatReply | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            pending: dict[Future[ChatReply], int] = {pool.submit(self.complete, r): i for i, r in enumerate(requests)}
            error: BaseException | None = None
            while pending:
                done, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    index = pending.pop(future)
                    if future.cancelled():
                        continue
                    if future.exception() is not None:
                        error = error or future.exception()
                        for other in pending:
                            other.cancel()
                        continue
                    replies[index] = future.result()
                    if on_reply is not None:
                        on_reply(index, replies[index])
            if error is not None:
                raise error
        return [reply for reply in replies if reply is not None]
