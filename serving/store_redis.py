"""The conversation store on Redis (redis-py), for deployments over several nodes.

    redis://HOST:PORT/DB[?prefix=ctxmem:]     (also rediss:// for TLS, user:password@ in the URL)

Layout, under the key prefix (default `ctxmem:`):

    {prefix}c:{owner}:{id}   a hash: messages (JSON), usage (JSON, one entry per turn; absent in a
                             conversation stored before it was kept), turns, stats (JSON), created,
                             updated, title, tokens
    {prefix}o:{owner}        a sorted set: conversation id -> last update (listing, least-recently-used eviction)

Owner names have no ':' (config.TENANT_NAME), so the two parts of a key never run together. Idle
conversations expire through Redis' own key TTL (refreshed at every write); an owner's index drops
them when it is next read. A turn is appended in a WATCH/MULTI transaction: a concurrent turn makes
it re-read, see the new turn count and fail with StoreConflict, as the SQLite store does.
"""
from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from .store import (StoreConflict, StoreUnavailable, appended_usage, padded, put_usage, stored_tokens, title,
                    turns_of)

DEFAULT_PREFIX = "ctxmem:"
_SUMMARY = ("turns", "stats", "created", "updated", "title", "tokens")


def split_prefix(url: str) -> tuple[str, str]:
    """('redis://h:p/db?prefix=x:' ) -> ('redis://h:p/db', 'x:'); redis-py refuses unknown URL options."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    prefix = next((v for k, v in query if k == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


class RedisStore:
    def __init__(self, url: str, ttl_s: float | None = None):
        url, self.prefix = split_prefix(url)
        self.ttl_s = ttl_s
        parts = urlsplit(url)
        self.url = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # for messages: no password
        self.r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=10,
                                      health_check_interval=30)
        self._call(self.r.ping)

    def rate_limiter(self):
        """Per-key rates counted in this Redis, shared by every ingress replica (limits_redis.py)."""
        from .limits_redis import RedisRateLimiter

        return RedisRateLimiter(self.r, self.prefix)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except redis.RedisError as err:
            raise StoreUnavailable(f"conversation store {self.url}: {type(err).__name__}: {err}") from None

    def _key(self, owner: str, sid: str) -> str:
        return f"{self.prefix}c:{owner}:{sid}"

    def _index(self, owner: str) -> str:
        return f"{self.prefix}o:{owner}"

    @staticmethod
    def _row(sid: str, h: dict[str, str], messages: bool = True) -> dict[str, Any]:
        row = {"id": sid, "turns": int(h["turns"]), "stats": json.loads(h.get("stats") or "{}"),
               "created": float(h["created"]), "updated": float(h["updated"]), "title": h.get("title", ""),
               "tokens": int(h.get("tokens") or 0)}
        if messages:
            row["messages"] = json.loads(h["messages"])
            row["usage"] = padded(json.loads(h.get("usage") or "null"), row["turns"])
        return row

    def get(self, owner: str, sid: str) -> dict[str, Any] | None:
        h = self._call(self.r.hgetall, self._key(owner, sid))
        return self._row(sid, h) if h else None

    def list(self, owner: str) -> list[dict[str, Any]]:
        index = self._index(owner)
        if self.ttl_s:
            self._call(self.r.zremrangebyscore, index, "-inf", time.time() - self.ttl_s)
        sids = self._call(self.r.zrevrange, index, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for sid in sids:
            pipe.hmget(self._key(owner, sid), *_SUMMARY)
        rows, gone = [], []
        for sid, values in zip(sids, self._call(pipe.execute)):
            if values[0] is None:  # expired by Redis
                gone.append(sid)
            else:
                rows.append(self._row(sid, dict(zip(_SUMMARY, values)), messages=False))
        if gone:
            self._call(self.r.zrem, index, *gone)
        return rows

    def _write(self, owner: str, sid: str, expected_turns: int | None, new_messages, replace: bool,
               stats: dict | None, max_conversations: int | None, must_be_new: bool = False) -> int:
        key, index = self._key(owner, sid), self._index(owner)
        created: list[bool] = []

        def txn(pipe: redis.client.Pipeline) -> int:
            created.clear()
            old = pipe.hmget(key, "messages", "turns", "created", "usage")
            turns = int(old[1]) if old[1] is not None else 0
            if must_be_new and old[1] is not None:
                raise StoreConflict(f"conversation {sid!r} exists")
            if expected_turns is not None and turns != expected_turns:
                raise StoreConflict(f"conversation {sid!r} has {turns} turns, expected {expected_turns}")
            stored, usage = (json.loads(old[0]) if old[0] else None), json.loads(old[3] or "null")
            if replace:
                messages, new_turns = list(new_messages), turns_of(new_messages)
                usage = put_usage(stored, usage, messages, stats)
            else:
                messages = (stored or []) + list(new_messages)
                new_turns = turns + 1
                usage = appended_usage(usage, turns, stats)
            now = time.time()
            pipe.multi()
            pipe.hset(key, mapping={"messages": json.dumps(messages, ensure_ascii=False), "usage": json.dumps(usage),
                                    "turns": new_turns, "stats": json.dumps(stats or {}), "created": old[2] or now,
                                    "updated": now, "title": title(messages), "tokens": stored_tokens(stats)})
            pipe.zadd(index, {sid: now})
            if self.ttl_s:
                pipe.expire(key, int(self.ttl_s) + 1)
                pipe.expire(index, int(self.ttl_s) + 1)
            if old[1] is None:
                created.append(True)
            return new_turns

        turns = self._call(self.r.transaction, txn, key, value_from_callable=True)
        if created and max_conversations:
            self._evict(owner, max_conversations)
        return turns

    def _evict(self, owner: str, max_conversations: int) -> None:
        """Drop the owner's least recently used conversations beyond `max_conversations`."""
        index = self._index(owner)
        if self.ttl_s:
            self._call(self.r.zremrangebyscore, index, "-inf", time.time() - self.ttl_s)
        extra = self._call(self.r.zcard, index) - max_conversations
        if extra > 0:
            old = self._call(self.r.zrange, index, 0, extra - 1)
            pipe = self.r.pipeline()
            pipe.delete(*[self._key(owner, s) for s in old])
            pipe.zrem(index, *old)
            self._call(pipe.execute)

    def create(self, owner: str, sid: str, max_conversations: int | None = None) -> dict[str, Any]:
        self._write(owner, sid, None, [], True, {}, max_conversations, must_be_new=True)
        return self.get(owner, sid)

    def append(self, owner: str, sid: str, expected_turns: int, messages: list[dict], stats: dict | None = None,
               max_conversations: int | None = None) -> int:
        return self._write(owner, sid, expected_turns, messages, False, stats, max_conversations)

    def put(self, owner: str, sid: str, messages: list[dict], stats: dict | None = None,
            max_conversations: int | None = None) -> None:
        self._write(owner, sid, None, messages, True, stats, max_conversations)

    def delete(self, owner: str, sid: str) -> bool:
        pipe = self.r.pipeline()
        pipe.delete(self._key(owner, sid))
        pipe.zrem(self._index(owner), sid)
        return bool(self._call(pipe.execute)[0])
