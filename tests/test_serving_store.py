"""The conversation stores - SQLite (embedded default), memory, and Redis (several nodes) on the real
Redis at 127.0.0.1:6379 under a key prefix of this test run, removed afterwards - behave alike:
owners apart, optimistic appends, listing, least-recently-used eviction, expiry. And a store that fails
after generation does not cost the client its answer: a Redis ACL user that may read but not write
(a real NOPERM from the server) stands in for a store gone bad."""
from __future__ import annotations

import asyncio
import json
import threading
import uuid

import httpx
import pytest

from ctxmem.serving.store import StoreConflict, StoreUnavailable, open_store

REDIS = "redis://127.0.0.1:6379/0"
TURN = [{"role": "user", "content": "hello   there\nfriend"}, {"role": "assistant", "content": "hi"}]


def _redis_or_skip():
    import redis

    client = redis.Redis.from_url(REDIS, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as err:
        pytest.skip(f"no Redis at {REDIS}: {err}")
    return client


@pytest.fixture()
def redis_prefix():
    """A key prefix of this test alone; every key under it is deleted afterwards."""
    client = _redis_or_skip()
    prefix = f"ctxmem-test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    assert not list(client.scan_iter(match=prefix + "*"))


@pytest.fixture(params=["sqlite", "memory", "redis"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.sqlite"
    if request.param == "memory":
        return "memory://"
    return f"{REDIS}?prefix={request.getfixturevalue('redis_prefix')}"


def test_owners_appends_listing_and_deletes(url):
    store = open_store(url)
    assert store.get("alice", "c") is None and store.list("alice") == []
    assert store.create("alice", "c")["turns"] == 0
    with pytest.raises(StoreConflict):
        store.create("alice", "c")
    assert store.append("alice", "c", 0, TURN, {"usage": {"prompt_tokens": 7, "completion_tokens": 2}}) == 1
    with pytest.raises(StoreConflict):
        store.append("alice", "c", 0, TURN)  # a writer that read the conversation before the first wrote
    assert store.get("bob", "c") is None and store.list("bob") == []  # another owner's "c" is not this one
    store.put("bob", "c", TURN * 2)
    row = store.get("alice", "c")
    assert row["turns"] == 1 and row["messages"] == TURN and row["tokens"] == 9
    assert row["title"] == "hello there friend" and row["created"] <= row["updated"]
    assert store.get("bob", "c")["turns"] == 2
    store.create("alice", "d")
    listed = store.list("alice")
    assert [r["id"] for r in listed] == ["d", "c"] and "messages" not in listed[0]  # most recent first
    assert store.delete("alice", "c") and not store.delete("alice", "c")
    assert store.get("bob", "c")["turns"] == 2


def _stats(prompt: int, completion: int, cached: int, evicted: int) -> dict:
    """A turn's stats as the API records them: the response's usage (serving/protocol.py usage())."""
    from ctxmem.serving.events import Finished, Usage
    from ctxmem.serving.protocol import usage

    end = Finished("stop", Usage(prompt, completion, cached, evicted, prompt - cached), None, 1.0)
    return {"usage": usage(end), "finish_reason": end.finish_reason}


def test_each_turns_usage_is_kept_in_order(url):
    """One usage entry per assistant message, in order, through appends and client-held puts; only the
    get of one conversation carries them."""
    store = open_store(url)
    store.create("alice", "c")
    turns = [_stats(20, 8, 0, 0), _stats(40, 8, 27, 0), _stats(70, 8, 47, 14)]
    for n, stats in enumerate(turns):
        store.append("alice", "c", n, TURN, stats)
    row = store.get("alice", "c")
    assert row["usage"] == [t["usage"] for t in turns]
    assert row["usage"][2]["prompt_tokens_details"]["cached_tokens"] == 47 and row["usage"][2]["evicted_tokens"] == 14
    assert row["tokens"] == 78 and "usage" not in store.list("alice")[0]
    # a client-held history that extends the stored one keeps its turns' usage; a rewritten one does not
    held = row["messages"] + TURN
    store.put("alice", "c", held, _stats(90, 8, 78, 34))
    assert store.get("alice", "c")["usage"] == [t["usage"] for t in turns] + [_stats(90, 8, 78, 34)["usage"]]
    store.put("alice", "c", [{"role": "user", "content": "edited"}] + held[1:], _stats(91, 8, 0, 35))
    assert store.get("alice", "c")["usage"] == [None, None, None, _stats(91, 8, 0, 35)["usage"]]
    store.put("bob", "c", TURN * 2)  # no stats: no usage known
    assert store.get("bob", "c")["usage"] == [None, None]


def test_a_conversation_stored_before_usage_was_kept_reads_null_turns(url, tmp_path):
    """Its turns' usage is None, and a turn added now is kept after them. For SQLite the file is one
    of the schema before (no usage column), opened by the store; Redis' hash has no usage field."""
    old_turns = TURN * 2
    if url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(tmp_path / "s.sqlite")
        db.execute("CREATE TABLE owned_conversations (owner TEXT NOT NULL, sid TEXT NOT NULL, messages TEXT NOT NULL, "
                   "turns INTEGER NOT NULL, stats TEXT, created REAL NOT NULL, updated REAL NOT NULL, title TEXT NOT "
                   "NULL, tokens INTEGER NOT NULL, PRIMARY KEY (owner, sid))")
        db.execute("INSERT INTO owned_conversations VALUES ('alice', 'old', ?, 2, '{}', 1.0, 9e9, 'hello', 0)",
                   (json.dumps(old_turns),))
        db.commit()
        db.close()
        store = open_store(url)
    else:
        store = open_store(url)
        store.put("alice", "old", old_turns)
        if url.startswith("redis"):
            store.r.hdel(f"{store.prefix}c:alice:old", "usage")
        else:
            del store._data[("alice", "old")]["usage"]
    assert store.get("alice", "old")["usage"] == [None, None]
    assert store.append("alice", "old", 2, TURN, _stats(30, 4, 22, 0)) == 3
    assert store.get("alice", "old")["usage"] == [None, None, _stats(30, 4, 22, 0)["usage"]]


def test_conversations_stored_before_owners_are_kept_and_named_at_start(tmp_path, caplog):
    """The table from before owners is left as it was (no key may read it) and the store says so."""
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE conversations (sid TEXT PRIMARY KEY, messages TEXT NOT NULL)")
    db.execute("INSERT INTO conversations VALUES ('s1', '[]')")
    db.commit()
    db.close()
    with caplog.at_level("WARNING", logger="ctxmem.serving.store"):
        store = open_store(f"sqlite:///{path}")
    assert "1 conversation(s) stored before conversations had owners" in caplog.text
    assert store.get("anonymous", "s1") is None
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 1


def test_a_new_conversation_evicts_the_owners_least_recently_used(url):
    store = open_store(url)
    for sid in ("a", "b"):
        store.create("alice", sid, max_conversations=2)
    store.create("bob", "x", max_conversations=2)
    store.append("alice", "a", 0, TURN, max_conversations=2)  # "a" is now the most recently used
    store.create("alice", "c", max_conversations=2)
    assert sorted(r["id"] for r in store.list("alice")) == ["a", "c"]
    assert store.get("alice", "b") is None and store.get("bob", "x") is not None


def test_an_idle_conversation_expires(url, tmp_path):
    """The clock is not waited for: the row's last use is moved into the past (SQLite, memory), or
    Redis is asked for the TTL it holds on the key."""
    store = open_store(url, ttl_s=3600)
    store.create("alice", "old")
    store.create("alice", "new")
    if url.startswith("redis"):
        key = f"{store.prefix}c:alice:old"
        assert 0 < store.r.ttl(key) <= 3601 and 0 < store.r.ttl(f"{store.prefix}o:alice") <= 3601
        store.r.delete(key)  # what Redis does when the TTL runs out
    elif url.startswith("sqlite"):
        store._db().execute("UPDATE owned_conversations SET updated = updated - 7200 WHERE sid = 'old'")
    else:
        store._data[("alice", "old")]["updated"] -= 7200
    assert store.get("alice", "old") is None
    assert [r["id"] for r in store.list("alice")] == ["new"]


def test_two_writers_of_one_turn_on_redis_one_wins(redis_prefix):
    """Two replicas (two clients) append turn 1 at once: exactly one gets it, the other a conflict."""
    url = f"{REDIS}?prefix={redis_prefix}"
    stores = [open_store(url), open_store(url)]
    stores[0].create("alice", "race")
    results: list[str] = []
    barrier = threading.Barrier(2)

    def write(store):
        barrier.wait()
        try:
            store.append("alice", "race", 0, TURN)
            results.append("ok")
        except StoreConflict:
            results.append("conflict")

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["conflict", "ok"]
    assert stores[1].get("alice", "race")["turns"] == 1


def test_an_unreachable_store_says_so():
    with pytest.raises(StoreUnavailable, match="127.0.0.1:1"):
        open_store("redis://127.0.0.1:1/0")
    with pytest.raises(ValueError, match="redis://HOST:PORT/DB"):
        open_store("actor://ctxmem-sessions")  # the Ray actor store is gone


# ---- a store that fails after generation ---------------------------------------------------------
@pytest.fixture()
def read_only_redis(redis_prefix):
    """Redis URLs of two ACL users - one may read the prefix's keys but write nothing, one may do
    nothing but connect - plus a store that writes."""
    client = _redis_or_skip()
    users = {kind: (f"ctxmem-{kind}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex) for kind in ("ro", "none")}
    rights = {"ro": ["+@read", "+@connection", "+@transaction", "+client"], "none": ["+@connection", "+client"]}
    for kind, (user, password) in users.items():
        client.execute_command("ACL", "SETUSER", user, "on", f">{password}", f"~{redis_prefix}*", "resetchannels",
                               "-@all", *rights[kind])
    try:
        yield ({kind: f"redis://{u}:{pw}@127.0.0.1:6379/0?prefix={redis_prefix}" for kind, (u, pw) in users.items()},
               open_store(f"{REDIS}?prefix={redis_prefix}"))
    finally:
        for user, _ in users.values():
            client.execute_command("ACL", "DELUSER", user)


def test_a_store_that_cannot_write_still_returns_the_answer(read_only_redis, tiny_export):
    from ctxmem.serving.api import LocalEngineClient, build_api
    from ctxmem.serving.auth import ANONYMOUS
    from ctxmem.serving.config import ServeArgs
    from ctxmem.serving.engine import Engine

    urls, writer = read_only_redis
    store = open_store(urls["ro"])
    with pytest.raises(StoreUnavailable, match="NoPermission"):
        store.create(ANONYMOUS, "nope")
    writer.create(ANONYMOUS, "s")  # the conversation exists; recording its next turn will fail
    args = ServeArgs(model=str(tiny_export), model_name="tiny").resolve()
    engine = Engine(args.engine)
    app = build_api(LocalEngineClient(engine), args, store)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            plain = await c.post("/v1/sessions/s/messages", json={"content": "hi", "max_tokens": 5, "temperature": 0})
            streamed = await c.post("/v1/sessions/s/messages", json={"content": "hi", "max_tokens": 5, "temperature": 0,
                                                                       "stream": True})
            chat = await c.post("/v1/chat/completions", headers={"X-Session-Id": "client-held"},
                                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
            return plain, streamed, chat

    async def unreadable():
        """A store that cannot even be read: the stateless chat still answers (the client holds the
        history), what needs the store is a 503."""
        blind = build_api(LocalEngineClient(engine), args, open_store(urls["none"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=blind), base_url="http://t") as c:
            chat = await c.post("/v1/chat/completions", headers={"X-Session-Id": "s"},
                                json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3})
            turn = await c.post("/v1/sessions/s/messages", json={"content": "hi", "max_tokens": 3})
            listing = await c.get("/v1/sessions")
            return chat, turn, listing

    try:
        plain, streamed, chat = asyncio.run(go())
        blind_chat, blind_turn, blind_list = asyncio.run(unreadable())
    finally:
        engine.close()
    assert blind_chat.status_code == 200 and "x-ctxmem-store-warning" in blind_chat.headers
    for r in (blind_turn, blind_list):
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
    assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 5
    assert "not recorded" in plain.headers["x-ctxmem-store-warning"]
    assert chat.status_code == 200 and "x-ctxmem-store-warning" in chat.headers
    blocks = [b for b in streamed.text.split("\n\n") if b]
    assert streamed.status_code == 200 and blocks[-1] == "data: [DONE]"
    last, error = (json.loads(b[len("data: "):]) for b in blocks[-3:-1])
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 5
    assert error["error"]["code"] == "store_unavailable" and "not recorded" in error["error"]["message"]
    assert "".join(json.loads(b[6:])["choices"][0]["delta"].get("content", "") for b in blocks[1:-2]) == \
        plain.json()["choices"][0]["message"]["content"]  # the whole answer reached the client
    assert writer.get(ANONYMOUS, "s")["turns"] == 0 and writer.get(ANONYMOUS, "client-held") is None


def test_rates_on_redis_are_one_count_for_every_replica(redis_prefix):
    """Two ingress replicas (two limiters on one Redis) share a key's requests and tokens per minute."""
    from ctxmem.serving.auth import Principal
    from ctxmem.serving.config import KeyLimits
    from ctxmem.serving.errors import APIError
    from ctxmem.serving.limits_redis import RedisRateLimiter

    url = f"{REDIS}?prefix={redis_prefix}"
    a, b = open_store(url).rate_limiter(), open_store(url).rate_limiter()
    who = Principal("k", "user", KeyLimits(requests_per_minute=3))
    a.admit(who)
    b.admit(who)
    a.admit(who)
    with pytest.raises(APIError) as err:
        b.admit(who)
    assert err.value.status == 429 and 1 <= int(err.value.headers["Retry-After"]) <= 60
    assert "3 requests per minute" in err.value.message
    a.admit(Principal("other", "user", KeyLimits(requests_per_minute=3)))  # another key has its own count

    spender = Principal("t", "user", KeyLimits(tokens_per_minute=40))
    a.admit(spender)
    a.charge(spender, 25)
    b.admit(spender)
    b.charge(spender, 25)
    with pytest.raises(APIError) as err:
        a.admit(spender)
    assert "used 50 tokens" in err.value.message and "40 tokens per minute" in err.value.message

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    down = RedisRateLimiter(redis.Redis(port=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)), redis_prefix)
    down.admit(who)  # Redis unreachable: the request goes through (logged), the API stays up
