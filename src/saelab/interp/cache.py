"""A disk cache of chat replies keyed by prompt, model and parameters, so rerunning autointerp costs nothing.

The cache is one sqlite3 file: each reply is committed in its own transaction as soon as it arrives (atomic, safe
against a crash mid-run, shareable between runs and processes). `CachedClient` wraps any client and counts what was
spent: requests sent, cache hits, prompt and completion tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from saelab.interp.llm import ChatClient, ChatReply, ChatRequest, OnReply


def cache_key(client: ChatClient, request: ChatRequest) -> str:
    payload = json.dumps(request.cache_payload(client.model_id), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL)")

    def get(self, key: str) -> ChatReply | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else ChatReply.from_dict(json.loads(row[0]))

    def put(self, key: str, reply: ChatReply) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, json.dumps(reply.to_dict())))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def totals(self) -> dict[str, int]:
        """Replies held and the tokens they cost when first requested: what every run with this cache spent."""
        with self._lock:
            rows = self._db.execute("SELECT reply FROM replies").fetchall()
        replies = [json.loads(row[0]) for row in rows]
        return {
            "replies": len(replies),
            "prompt_tokens": sum(r["prompt_tokens"] for r in replies),
            "completion_tokens": sum(r["completion_tokens"] for r in replies),
        }

    def close(self) -> None:
        self._db.close()


@dataclasses.dataclass
class Usage:
    """What a run spent (`requests`, tokens) and what the cache saved (`cache_hits`)."""

    requests: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, reply: ChatReply) -> None:
        self.requests += 1
        self.prompt_tokens += reply.prompt_tokens
        self.completion_tokens += reply.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class CachedClient(ChatClient):
    """`client` behind `cache`: hits are answered from disk, misses are sent and stored the moment they arrive."""

    def __init__(self, client: ChatClient, cache: ResponseCache) -> None:
        self.client = client
        self.cache = cache
        self.model_id = client.model_id
        self.concurrency = client.concurrency
        self.usage = Usage()

    def complete(self, request: ChatRequest) -> ChatReply:
        return self.complete_many([request])[0]

    def complete_many(self, requests: Sequence[ChatRequest], on_reply: OnReply | None = None) -> list[ChatReply]:
        """Replies in request order; identical requests in one call are sent once."""
        keys = [cache_key(self.client, request) for request in requests]
        replies: list[ChatReply | None] = [self.cache.get(key) for key in keys]
        waiting: dict[str, list[int]] = {}
        for i, reply in enumerate(replies):
            if reply is None:
                waiting.setdefault(keys[i], []).append(i)
            elif on_reply is not None:
                on_reply(i, reply)
        self.usage.cache_hits += len(requests) - sum(len(indices) for indices in waiting.values())
        sent = list(waiting)

        def arrived(position: int, reply: ChatReply) -> None:
            self.cache.put(sent[position], reply)
            self.usage.add(reply)
            for index in waiting[sent[position]]:
                replies[index] = reply
                if on_reply is not None:
                    on_reply(index, reply)

        self.client.complete_many([requests[waiting[key][0]] for key in sent], on_reply=arrived)
        return [reply for reply in replies if reply is not None]
