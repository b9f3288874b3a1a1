"""The server as a hostile client meets it: hundreds of requests across malformed JSON, wrong types,
values just outside and at the very ends of their ranges, unicode and control characters, long stop
lists, bad API keys, another tenant's conversations and session ids at the edges of their charset.
None may get a 5xx and the replica must answer a normal request the same way
afterwards. Also: one row failing mid-stream over HTTP, and the scheduler loop killed and restarted.

All in-process (FastAPI over an in-process engine through httpx's ASGI transport), on the tiny export.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Iterator, NamedTuple

import httpx
import numpy as np
import pytest

from ctxmem.serving.api import LocalEngineClient, build_api
from ctxmem.serving.config import ServeArgs, Tenant, hash_key
from ctxmem.serving.engine import Engine
from ctxmem.serving.metrics import render
from ctxmem.serving.protocol import MAX_STOP, MAX_STOP_CHARS, SEED_MAX, TOP_K_MAX
from ctxmem.serving.store import MemoryStore
from helpers_serving import API_KEY, AUTH, check_error_shape, malformed_requests, poison_rows_after

NAME = "tiny"
LIMIT = 256  # max_tokens_limit of this server
JSON_H = {**AUTH, "Content-Type": "application/json"}
COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = 200
CREATED = 201
OTHER_KEY = "another-tenant-key-456"  # a user key of another tenant
OTHER = {"Authorization": f"Bearer {OTHER_KEY}", "Content-Type": "application/json"}
VICTIM = "victim-conversation"  # API_KEY's conversation, created before the battery


class Case(NamedTuple):
    name: str
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    expected: int
    param: str | None = None  # the parameter a 400 must name


def build(engine: Engine):
    args = ServeArgs(model="unused", model_name=NAME, api_keys=[API_KEY], max_tokens_limit=LIMIT,
                     tenants=[Tenant(name="other", role="user", sha256=hash_key(OTHER_KEY))]).resolve()
    return build_api(LocalEngineClient(engine), args, MemoryStore())


@pytest.fixture(scope="module")
def engine(tiny_export):
    from ctxmem.serving.config import EngineConfig

    eng = Engine(EngineConfig(model=str(tiny_export)))
    yield eng
    eng.close()


def encode(d: Any) -> bytes:
    return json.dumps(d).encode()


def comp(**fields) -> dict:
    return {"model": NAME, "prompt": "hello", "max_tokens": 3, **fields}


def chat(content: str = "hi", **fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


# ---- the battery -----------------------------------------------------------------------------------
OUT_OF_RANGE = {
    "temperature": [-1e-300, 2.0000001, 1e308, -5e-324],
    "top_p": [0, 0.0, 1e-400, -1e-12, 1.0000001],
    "seed": [-1, -(2**63), SEED_MAX + 1, 2**64, 10**30],
    "top_k": [-1, TOP_K_MAX + 1, 10**20],
    "repetition_penalty": [0, -0.0, -1, 100.001, 1e300],
    "max_tokens": [0, LIMIT + 1, 2**63, -(2**63)],
    "stop": [["s"] * (MAX_STOP + 1), ["x" * (MAX_STOP_CHARS + 1)], ["a", "b", "c", ""], [""] * 40,
             [str(i) for i in range(1000)]],
}

EXTREME_BUT_VALID: list[dict] = [
    {"temperature": 5e-324}, {"temperature": 1e-300}, {"temperature": 1e-300, "seed": 0}, {"temperature": 2},
    {"temperature": -0.0}, {"temperature": 0}, {"top_p": 1e-12, "temperature": 1}, {"top_p": 1e-300, "temperature": 2},
    {"top_p": 1}, {"seed": 0, "temperature": 1}, {"seed": SEED_MAX, "temperature": 1},
    {"top_k": 1, "temperature": 2}, {"top_k": TOP_K_MAX, "temperature": 2}, {"top_k": 0},
    {"repetition_penalty": 1e-300, "temperature": 1}, {"repetition_penalty": 1e-300}, {"repetition_penalty": 1e-12},
    {"repetition_penalty": 100}, {"repetition_penalty": 100, "temperature": 5e-324},
    {"stop": ["x" * MAX_STOP_CHARS] * MAX_STOP}, {"stop": ["\x00", "\n", "\u2028", "🦀"]}, {"stop": []},
    {"temperature": 5e-324, "top_p": 1e-12, "top_k": TOP_K_MAX, "repetition_penalty": 1e-300, "seed": SEED_MAX},
    {"max_tokens": 1}, {"ignore_eos": True, "max_tokens": 8, "temperature": 2, "top_k": 2},
]

HOSTILE_TEXT = [
    "\x00", "\x00" * 64, "\ud800", "\udfff\ud800x", "é" * 500, "🦀" * 40, "\u202eevil\u202c", "\ufeffbom",
    "\r\n\t\x1b[31mred\x1b[0m\x07\x08", "\u200b\u200c\u200d", "漢字かなカナ한국어", "e\u0301" * 100, "\U0010ffff\U000e0001",
    "\x7f\x80\x9f", "a\u0000b\u0001c", "", " ", "<|endoftext|>", "<s></s>[INST]", "{{ system }}", "%s%n%x",
    "\\u0000", "null", "\n" * 300,
]


def battery() -> Iterator[Case]:
    # the malformed-request battery of the API tests (not JSON, bad types, unknown fields, auth, size, routes)
    for name, method, path, body, headers, expected in malformed_requests(NAME):
        yield Case(name, method, path, body, headers, expected)

    # one parameter just outside its range, on both endpoints: a 400 that names it
    for param, values in OUT_OF_RANGE.items():
        for j, value in enumerate(values):
            yield Case(f"range-{param}-{j}", "POST", COMP, encode(comp(**{param: value})), JSON_H, 400, param)
            body = chat(**{param: value})
            if param == "max_tokens":  # the chat endpoint's newer name for it
                body["max_completion_tokens"] = body.pop("max_tokens")
            key = "max_completion_tokens" if param == "max_tokens" else param
            yield Case(f"range-chat-{param}-{j}", "POST", CHAT, encode(body), JSON_H, 400, key)

    # at the very ends of the ranges (all together in flight, so hostile rows share decode steps)
    for j, fields in enumerate(EXTREME_BUT_VALID):
        for stream in (False, True):
            yield Case(f"extreme-{j}-{stream}", "POST", COMP, encode(comp(stream=stream, **fields)), JSON_H, OK)
            yield Case(f"extreme-chat-{j}-{stream}", "POST", CHAT, encode(chat(stream=stream, **fields)), JSON_H, OK)
    yield Case("max-tokens-at-the-limit", "POST", COMP, encode(comp(max_tokens=LIMIT, ignore_eos=True)), JSON_H, OK)
    yield Case("max-tokens-at-the-limit-stream", "POST", CHAT,
               encode(chat(max_tokens=LIMIT, ignore_eos=True, stream=True, temperature=2)), JSON_H, OK)

    # unicode and control characters everywhere text goes
    for j, text in enumerate(HOSTILE_TEXT):
        yield Case(f"text-prompt-{j}", "POST", COMP, encode(comp(prompt=text)), JSON_H, OK)
        yield Case(f"text-chat-{j}", "POST", CHAT, encode(chat(text, stream=j % 2 == 0)), JSON_H, OK)
        system = {"model": NAME, "max_tokens": 2,
                  "messages": [{"role": "system", "content": text}, {"role": "user", "content": [
                      {"type": "text", "text": text}, {"type": "text", "text": text}]}]}
        yield Case(f"text-system-{j}", "POST", CHAT, encode(system), JSON_H, OK)
        if text and len(text) <= MAX_STOP_CHARS:
            yield Case(f"text-stop-{j}", "POST", COMP, encode(comp(stop=[text])), JSON_H, OK)
        yield Case(f"text-model-{j}", "POST", COMP, encode(comp(model=text)), JSON_H, 404)
        if text != "null":  # the one valid session id of the list
            yield Case(f"text-user-{j}", "POST", CHAT, encode(chat(user=text)), JSON_H, 400, "user")
    for j, raw in enumerate([b"\xef\xbb\xbf" + encode(comp()), encode(comp()).replace(b"hello", b"he\\u0000llo"),
                             encode(comp()).replace(b'"hello"', b'"\\ud83e\\udd80\\ud800"'),
                             b'{"model": "tiny", "prompt": "a\x01\x02\x1f"}', b'{"model": "tiny", "prompt": "a\nb"}']):
        yield Case(f"raw-text-{j}", "POST", COMP, raw, JSON_H, 400 if j in (0, 3, 4) else OK)

    # JSON that parses into something awkward
    nested = b'{"model": "tiny", "prompt": "x", "metadata": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"
    for j, raw in enumerate([nested, b'{"model": "tiny", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
                             b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
                             b'{"model": "tiny", "prompt": "x", "temperature": 1e-999}',  # parses to 0.0: greedy
                             b'{"model": "tiny", "prompt": "x", "prompt": "y", "max_tokens": 2}',  # last one wins
                             b'{"model": "tiny", "prompt": [' + b"1," * 20000 + b"1], \"max_tokens\": 2}",
                             b'{"model": "tiny", "prompt": [[' + b"2," * 300 + b"2]], \"max_tokens\": 2}",
                             b'{"model": "tiny", "prompt": "x", "metadata": {"k": [' + b"[]," * 3000 + b"[]]}}"]):
        yield Case(f"json-{j}", "POST", COMP, raw, JSON_H, OK if j in (3, 4, 5, 6, 7) else 400)

    # API keys: missing, wrong, malformed, enormous
    for j, auth in enumerate(["", "Bearer", "Bearer ", "Bearer wrong", f"Bearer {API_KEY}x", f"bearer{API_KEY}",
                              f"Token {API_KEY}", f"Bearer {API_KEY[:-1]}", "Bearer " + "k" * 100_000,
                              f"Bearer {API_KEY} {API_KEY}", "Bearer \x00", "Basic dGVzdDp0ZXN0"]):
        headers = {"Content-Type": "application/json", "Authorization": auth}
        for path, body in ((COMP, comp()), (CHAT, chat())):
            yield Case(f"key-{j}{path}", "POST", path, encode(body), headers, 401)
        yield Case(f"key-{j}-session", "GET", "/v1/sessions/some-session", b"", headers, 401)
    for j, path in enumerate(["/v1/models", "/v1/sessions/x/messages", "/admin/reload"]):
        yield Case(f"no-key-{j}", "POST" if "messages" in path or "admin" in path else "GET", path,
                   encode({"content": "x"}), {"Content-Type": "application/json"}, 401)

    # session ids and paths
    for j, sid in enumerate(["%00", "x" * 300, "%C3%A9", "a%20b", "%0A", "a%0Ab", "..%2F..%2Fetc%2Fpasswd"]):
        expected = 404 if "%2F" in sid else 400  # an escaped slash is a path no route matches
        yield Case(f"session-id-{j}", "POST", f"/v1/sessions/{sid}/messages", encode({"content": "x"}), JSON_H,
                   expected)
        yield Case(f"session-get-{j}", "GET", f"/v1/sessions/{sid}", b"", AUTH, expected)
    for j, header in enumerate(["a b", "é", "x" * 300, "a\x00b", "a\tb", "", "x" * 129, VICTIM + " ", "a/b"]):
        yield Case(f"session-header-{j}", "POST", CHAT, encode(chat()), {**JSON_H, "X-Session-Id": header}, 400)

    # another tenant's conversation: every way in is the 404 of an id that never existed
    message = encode({"content": "overwrite", "max_tokens": 2})
    for j, sid in enumerate([VICTIM, VICTIM.upper(), VICTIM + "x", "sess-" + "0" * 32, "x" * 128]):
        yield Case(f"cross-get-{j}", "GET", f"/v1/sessions/{sid}", b"", OTHER, 404, "session_id")
        yield Case(f"cross-delete-{j}", "DELETE", f"/v1/sessions/{sid}", b"", OTHER, 404, "session_id")
        yield Case(f"cross-message-{j}", "POST", f"/v1/sessions/{sid}/messages", message, OTHER, 404, "session_id")
        yield Case(f"cross-stream-{j}", "POST", f"/v1/sessions/{sid}/messages",
                   encode({"content": "x", "stream": True}), OTHER, 404, "session_id")
    yield Case("cross-admin", "POST", "/admin/reload", b"", OTHER, 403)
    # the owner's id at the edges of the charset: matched whole, so a trailing newline is not the id
    for j, sid in enumerate([VICTIM + "%0A", VICTIM + "%0D%0A", VICTIM + "%20", "%20" + VICTIM, VICTIM + "%00",
                             "victim-conversati%D0%BEn", VICTIM + "%09", "x" * 129, VICTIM + "%3F", "%2E%2E"]):
        expected = 404 if sid == "%2E%2E" else 400  # '..' is a valid id (ids never become paths): just not one
        yield Case(f"owner-id-{j}", "GET", f"/v1/sessions/{sid}", b"", AUTH, expected, "session_id")
        yield Case(f"owner-id-message-{j}", "POST", f"/v1/sessions/{sid}/messages", message, JSON_H, expected,
                   "session_id")
    for j, raw in enumerate([b"", b"{}", encode({"id": "fresh-id"}), encode({"id": "x" * 128})]):
        yield Case(f"create-{j}", "POST", "/v1/sessions", raw, JSON_H, CREATED)
    for j, value in enumerate(["a\n", "x" * 129, "", "é", 5, ["x"], {"a": 1}, True, "a b", "a/b"]):
        yield Case(f"create-bad-{j}", "POST", "/v1/sessions", encode({"id": value}), JSON_H, 400, "id")
    for j, raw in enumerate([b"[1]", b"null", b"{", encode({"name": "x"})]):
        yield Case(f"create-body-{j}", "POST", "/v1/sessions", raw, JSON_H, 400)


async def send(client: httpx.AsyncClient, case: Case) -> tuple[Case, int, bytes]:
    headers = [(k.encode("latin-1"), v.encode("latin-1", "backslashreplace")) for k, v in case.headers.items()]
    r = await client.request(case.method, case.path, content=case.body, headers=headers)
    return case, r.status_code, r.content


def check(case: Case, status: int, body: bytes) -> None:
    assert status < 500, f"{case.name}: {status} {body[:300]!r}"
    if case.expected == CREATED:
        assert status == CREATED and json.loads(body)["object"] == "session", f"{case.name}: {status} {body[:300]!r}"
        return
    if case.expected == OK and json.loads(case.body).get("stream") is True:
        blocks = [b for b in body.decode().split("\n\n") if b]
        assert status == 200 and blocks[-1] == "data: [DONE]", f"{case.name}: {body[-300:]!r}"
        events = [json.loads(b[len("data: "):]) for b in blocks[:-1]]
        assert not any("error" in e for e in events), f"{case.name}: {events[-2:]}"
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), case.name
        return
    data = json.loads(body)
    if case.expected == OK:
        assert status == 200, f"{case.name}: {status} {data}"
        assert data["choices"][0]["finish_reason"] in ("stop", "length"), case.name
        return
    check_error_shape(status, data, case.expected, case.name)
    if case.param is not None:
        assert data["error"]["param"] == case.param, f"{case.name}: {data}"
        if case.name.startswith("range-"):
            assert "send " in data["error"]["message"], f"{case.name}: the message says what to change: {data}"


async def run_battery(app, cases: list[Case], concurrency: int = 16) -> list[tuple[Case, int, bytes]]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=None) as client:
        out = []
        for i in range(0, len(cases), concurrency):
            out += await asyncio.gather(*[send(client, c) for c in cases[i:i + concurrency]])
        return out


def normal_request(app) -> dict:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.post(COMP, headers=AUTH, json=comp(prompt="a normal request", max_tokens=16,
                                                                  temperature=0))
            assert r.status_code == 200, r.text
            return r.json()

    return asyncio.run(go())


def counter(engine: Engine, name: str) -> float:
    return sum(s.value for f in engine.metrics.snapshot() for s in f.samples if s.name == name)


def test_hundreds_of_hostile_requests_get_no_5xx_and_the_replica_answers_the_same_after(engine):
    app = build(engine)
    before = normal_request(app)
    victim = asyncio.run(_victim(app))
    cases = list(battery())
    assert len(cases) >= 300
    results = asyncio.run(run_battery(app, cases))
    statuses = [status for _, status, _ in results]
    assert sum(s >= 500 for s in statuses) == 0, [(c.name, s) for c, s, _ in results if s >= 500]
    for case, status, body in results:
        check(case, status, body)
    assert statuses.count(200) >= 150 and sum(400 <= s < 500 for s in statuses) >= 300
    after = normal_request(app)
    assert after["choices"] == before["choices"]
    # the other tenant neither changed nor removed the conversation, and has none of its own
    assert asyncio.run(_get(app, f"/v1/sessions/{VICTIM}", AUTH)) == victim
    assert json.loads(asyncio.run(_get(app, "/v1/sessions", OTHER)))["data"] == []
    assert counter(engine, "ctxmem_failed_sequences_total") == 0
    assert engine.scheduler.restarts == 0 and engine.healthy()


def _sse_blocks(body: bytes) -> list[str]:
    return [b for b in body.decode().split("\n\n") if b]


def test_a_row_failing_mid_stream_gets_an_error_event_then_done_and_the_others_finish(engine, monkeypatch):
    """A fault injected into one request's rows (its logits turn NaN after 2 tokens) while others
    stream: its stream ends with an OpenAI error event and [DONE], its non-streamed twin gets a 500
    in OpenAI's shape, every other request of the batch gets its full answer."""
    poison_seed = 9999
    poison_rows_after(monkeypatch, poison_seed, 2)
    app = build(engine)
    poison = dict(seed=poison_seed, max_tokens=40, ignore_eos=True)
    cases = [Case("poison-stream", "POST", COMP, encode(comp(stream=True, **poison)), JSON_H, 500),
             Case("poison", "POST", CHAT, encode(chat(**poison)), JSON_H, 500)]
    cases += [Case(f"healthy-{i}", "POST", COMP, encode(comp(prompt=f"healthy {i}", max_tokens=30, ignore_eos=True,
                                                             stream=i % 2 == 0)), JSON_H, OK) for i in range(6)]
    results = {c.name: (status, body) for c, status, body in asyncio.run(run_battery(app, cases))}

    status, body = results["poison-stream"]
    blocks = _sse_blocks(body)
    assert status == 200 and blocks[-1] == "data: [DONE]"
    error = json.loads(blocks[-2][len("data: "):])
    check_error_shape(500, error, 500, "poison-stream")
    assert error["error"]["code"] == "engine_failure" and "NonFiniteLogitsError" in error["error"]["message"]
    assert len(blocks) >= 3  # it had streamed text before the error
    status, body = results["poison"]
    check_error_shape(status, json.loads(body), 500, "poison")
    for i in range(6):
        status, body = results[f"healthy-{i}"]
        assert status == 200
        if i % 2 == 0:
            last = json.loads(_sse_blocks(body)[-2][len("data: "):])
            assert last["usage"]["completion_tokens"] == 30
        else:
            assert json.loads(body)["usage"]["completion_tokens"] == 30
    assert counter(engine, "ctxmem_failed_sequences_total") == 2
    assert engine.healthy()


def test_a_killed_scheduler_loop_degrades_health_is_counted_and_comes_back(tiny_export):
    """An exception outside any row kills the loop while a request streams: the request gets an
    error event and [DONE], /health answers 503 degraded until the supervisor restarts the loop,
    /metrics counts the restart, and the replica then answers normally."""
    from ctxmem.serving.config import EngineConfig

    eng = Engine(EngineConfig(model=str(tiny_export)))
    app = build(eng)
    sched = eng.scheduler
    gauges, fail_in_flight = sched._gauges, sched._fail_in_flight
    fault = {"fired": False}
    health_while_down: list[tuple[int, dict]] = []

    def dying_gauges():
        mid_stream = any(len(s.decoder.token_ids) >= 3 for g in sched._groups.values() for s in g.seqs)
        if mid_stream and not fault["fired"]:
            fault["fired"] = True
            raise RuntimeError("injected loop fault")
        gauges()

    def observed_fail_in_flight(err):  # runs on the supervisor, before the client hears of the failure
        async def health():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                r = await c.get("/health", headers=AUTH)  # an admin key sees the details
                return r.status_code, r.json()

        health_while_down.append(asyncio.run(health()))
        fail_in_flight(err)

    sched._gauges, sched._fail_in_flight = dying_gauges, observed_fail_in_flight
    try:
        async def stream():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                r = await c.post(COMP, headers=AUTH, json=comp(max_tokens=200, ignore_eos=True, stream=True))
                return r.status_code, r.content

        status, body = asyncio.run(stream())
        assert fault["fired"]
        blocks = _sse_blocks(body)
        assert status == 200 and blocks[-1] == "data: [DONE]"
        error = json.loads(blocks[-2][len("data: "):])
        assert "injected loop fault" in error["error"]["message"] and error["error"]["type"] == "server_error"
        assert len(health_while_down) == 1
        code, data = health_while_down[0]
        assert code == 503 and data["status"] == "degraded" and data["engine"]["scheduler"] == "restarting"

        async def until_healthy():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                for _ in range(500):
                    r = await c.get("/health", headers=AUTH)
                    if r.status_code == 200:
                        return r.json()
                    await asyncio.sleep(0.02)
                return r.json()

        health = asyncio.run(until_healthy())
        assert health["status"] == "ok" and health["engine"]["scheduler_restarts"] == 1
        assert normal_request(app)["usage"]["completion_tokens"] == 16
        metrics = asyncio.run(_get(app, "/metrics"))
        assert b"ctxmem_scheduler_restarts_total 1.0" in metrics
        assert b"ctxmem_scheduler_restarts_total 1.0" in render([eng.metrics.snapshot()])
    finally:
        eng.close()


async def _get(app, path: str, headers: dict[str, str] | None = None) -> bytes:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        return (await c.get(path, headers=headers)).content


async def _victim(app) -> bytes:
    """API_KEY's conversation with one turn, as GET shows it."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        assert (await c.post("/v1/sessions", headers=AUTH, json={"id": VICTIM})).status_code == CREATED
        r = await c.post(f"/v1/sessions/{VICTIM}/messages", headers=AUTH, json={"content": "mine", "max_tokens": 3})
        assert r.status_code == 200, r.text
        return (await c.get(f"/v1/sessions/{VICTIM}", headers=AUTH)).content
