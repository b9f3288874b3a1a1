"""The OpenAI HTTP layer in-process (FastAPI over an in-process engine, no Ray): request validation,
the error shape, SSE framing, the stateful sessions endpoint, metrics. The same app runs behind
Ray Serve in test_serving_ray.py."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from ctxmem.serving.api import LocalEngineClient, build_api
from ctxmem.serving.config import ServeArgs
from ctxmem.serving.engine import Engine
from ctxmem.serving.metrics import ENGINE_REPLICAS, SPECS, ClientTimer, Registry, render
from ctxmem.serving.store import MemoryStore, StoreConflict
from helpers_serving import API_KEY, AUTH, check_error_shape, malformed_requests

NAME = "tiny"


@pytest.fixture(scope="module")
def stack(tiny_export):  # noqa: F811
    # the memory knobs the tests below send are allowed (by default a request may not pick a window)
    args = ServeArgs(model=str(tiny_export), model_name=NAME, api_keys=[API_KEY], max_tokens_limit=512,
                     request_memory={"windows": [60, 200], "sinks": [4, 100, 10**6]}).resolve()
    engine = Engine(args.engine)
    store = MemoryStore()
    app = build_api(LocalEngineClient(engine), args, store)
    yield app, engine, store
    engine.close()


def stack_owner_hash() -> str:
    from ctxmem.serving.config import hash_key

    return hash_key(API_KEY)[:12]


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def sse_events(text: str) -> list:
    blocks = [b for b in text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), text[:300]
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def test_every_malformed_request_gets_an_openai_error_with_a_4xx(stack):
    app, _, _ = stack
    cases = list(malformed_requests(NAME))
    assert len(cases) >= 100
    for name, method, path, body, headers, expected in cases:
        r = call(app, method, path, content=body, headers=headers)
        check_error_shape(r.status_code, r.json(), expected, name)
    assert call(app, "GET", "/health").status_code == 200


def test_the_openai_client_gets_completions_and_chat_streamed_and_not(stack):
    import openai

    app, _, _ = stack

    async def go():
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=API_KEY, http_client=http)
        c = await client.completions.create(model=NAME, prompt="Hello", max_tokens=12, temperature=0)
        parts = [ch.choices[0].text async for ch in await client.completions.create(
            model=NAME, prompt="Hello", max_tokens=12, temperature=0, stream=True) if ch.choices]
        chat = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=12, temperature=0)
        chunks = [ch async for ch in await client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True})]
        models = await client.models.list()
        await http.aclose()
        return c, "".join(parts), chat, chunks, models

    c, streamed, chat, chunks, models = asyncio.run(go())
    assert c.choices[0].text == streamed
    assert c.usage.completion_tokens == 12 and c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.usage.model_extra["evicted_tokens"] == 0  # the ctxmem extension of usage
    assert chat.choices[0].message.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == chat.usage.total_tokens
    assert [m.id for m in models.data] == [NAME]


def test_a_stream_is_server_sent_events_ending_in_done_with_usage_on_the_last_chunk(stack):
    app, _, _ = stack
    r = call(app, "POST", "/v1/chat/completions", headers=AUTH,
             json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 5


def test_an_engine_error_before_streaming_is_an_http_status_not_a_stream(stack):
    app, _, _ = stack
    r = call(app, "POST", "/v1/completions", headers=AUTH,
             json={"model": NAME, "prompt": "x" * 300, "max_tokens": 8, "stream": True, "policy": "full"})
    check_error_shape(r.status_code, r.json(), 400, "overflow")
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_the_session_endpoint_keeps_the_history_on_the_server(stack):
    app, _, store = stack
    created = call(app, "POST", "/v1/sessions", headers=AUTH, json={"id": "sess-1"})
    assert created.status_code == 201 and created.json()["turns"] == 0
    usages = []
    for turn in range(3):
        r = call(app, "POST", "/v1/sessions/sess-1/messages", headers=AUTH,
                 json={"content": f"message {turn}", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        usages.append(body["usage"])
        assert body["session"] == {"id": "sess-1", "turns": turn + 1}
        if turn:
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    history = call(app, "GET", "/v1/sessions/sess-1", headers=AUTH).json()
    assert history["turns"] == 3 and [m["role"] for m in history["messages"]] == ["user", "assistant"] * 3
    assert history["title"] == "message 0" and history["tokens"] > 0
    # each assistant turn's usage, in order, as its response carried it (the chat page redraws from it)
    assert history["usage"] == usages
    assert call(app, "DELETE", "/v1/sessions/sess-1", headers=AUTH).json()["deleted"] is True
    assert call(app, "GET", "/v1/sessions/sess-1", headers=AUTH).status_code == 404


def test_a_concurrent_turn_on_the_same_session_is_a_409(stack, monkeypatch):
    app, _, store = stack

    def conflict(*_a, **_k):
        raise StoreConflict("conversation 'sess-2' has 1 turns, expected 0")

    assert call(app, "POST", "/v1/sessions", headers=AUTH, json={"id": "sess-2"}).status_code == 201
    monkeypatch.setattr(store, "append", conflict)
    r = call(app, "POST", "/v1/sessions/sess-2/messages", headers=AUTH, json={"content": "hi", "max_tokens": 2})
    check_error_shape(r.status_code, r.json(), 409, "conflict")


def test_a_chat_with_a_session_id_is_recorded_in_the_store(stack):
    app, _, store = stack
    r = call(app, "POST", "/v1/chat/completions", headers={**AUTH, "X-Session-Id": "sess-3"},
             json={"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200
    owner = "key-" + stack_owner_hash()
    assert [m["role"] for m in store.get(owner, "sess-3")["messages"]] == ["user", "assistant"]


def test_metrics_expose_every_declared_series_in_prometheus_text(stack):
    app, _, _ = stack
    call(app, "POST", "/v1/completions", headers=AUTH, json={"model": NAME, "prompt": "m", "max_tokens": 3})
    text = call(app, "GET", "/metrics").text
    for name, spec in SPECS.items():
        assert f"# TYPE {name} {spec.kind}" in text
    assert f"# TYPE {ENGINE_REPLICAS} gauge" in text and f"{ENGINE_REPLICAS} 1.0" in text
    assert 'ctxmem_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "ctxmem_time_to_first_token_seconds_count" in text
    assert "ctxmem_batch_size_bucket" in text


def test_a_request_that_sets_only_sinks_is_served_with_the_window_re_derived(stack):
    """sinks=100 with the model's window of 60 would overflow the 128-token context; the window is
    re-derived to fit (one override path) instead of answering 400."""
    app, _, _ = stack
    r = call(app, "POST", "/v1/completions", headers=AUTH,
             json={"model": NAME, "prompt": "w" * 150, "max_tokens": 3, "sinks": 100})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["evicted_tokens"] > 0
    r = call(app, "POST", "/v1/completions", headers=AUTH,
             json={"model": NAME, "prompt": "w", "max_tokens": 3, "window": 200})
    check_error_shape(r.status_code, r.json(), 400, "window too large")
    assert r.json()["error"]["param"] == "window"
    r = call(app, "POST", "/v1/completions", headers=AUTH,
             json={"model": NAME, "prompt": "w", "max_tokens": 3, "sinks": 10**6})
    check_error_shape(r.status_code, r.json(), 400, "sinks too many")
    assert r.json()["error"]["param"] == "sinks"


def _sample(text: bytes, series: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in the metrics text")


def test_every_token_of_a_stream_reaches_the_inter_token_histogram():
    """A request whose first chunk carries 3 tokens and second 2: one time to first token and
    4 inter-token gaps (the 2 that came with the first token with no gap)."""
    metrics = Registry()
    timer = ClientTimer(metrics, arrived=0.0)
    timer.tokens(3)
    timer.tokens(2)
    timer.done(prompt_tokens=7, completion_tokens=5)
    text = render([metrics.snapshot()])
    assert _sample(text, "ctxmem_time_to_first_token_seconds_count") == 1
    assert _sample(text, "ctxmem_inter_token_latency_seconds_count") == 4
    assert _sample(text, 'ctxmem_inter_token_latency_seconds_bucket{le="0.001"}') >= 2  # the two with no gap
    assert _sample(text, "ctxmem_completion_tokens_total") == 5


def test_many_observations_at_once_record_what_one_by_one_calls_record():
    """A coalesced chunk's tokens are observed in one update (Registry.observe(count=n)); the text a
    scrape gets is the same as after n single observations, bucket for bucket (the sum to rounding:
    value * n is one rounding, n additions are n)."""
    at_once, one_by_one = Registry(), Registry()
    for value, n in ((0.0, 3), (0.004, 7), (0.3, 1), (45.0, 2), (0.01, 5)):  # 0.01 sits on a bucket bound
        at_once.observe("ctxmem_inter_token_latency_seconds", value, count=n)
        for _ in range(n):
            one_by_one.observe("ctxmem_inter_token_latency_seconds", value)
    at_once.observe("ctxmem_inter_token_latency_seconds", 1.0, count=0)  # nothing
    lines = [[line for line in render([r.snapshot()]).decode().splitlines()
              if line.startswith("ctxmem_inter_token_latency_seconds") and "_sum " not in line]
             for r in (at_once, one_by_one)]
    assert lines[0] == lines[1] and any('le="0.01"} 15.0' in line for line in lines[0]), lines[0]
    sums = [_sample(render([r.snapshot()]), "ctxmem_inter_token_latency_seconds_sum") for r in (at_once, one_by_one)]
    assert sums[0] == pytest.approx(sums[1], rel=1e-12) and sums[0] == pytest.approx(90.378)


def test_metrics_of_replicas_add_up_and_registries_share_nothing():
    a, b = Registry(), Registry()
    a.inc("ctxmem_requests_total", labels={"endpoint": "/v1/completions", "status": "200"})
    b.inc("ctxmem_requests_total", 2, labels={"endpoint": "/v1/completions", "status": "200"})
    a.observe("ctxmem_batch_size", 3)
    b.observe("ctxmem_batch_size", 12, count=2)
    b.set("ctxmem_running_sequences", 4)
    assert _sample(render([a.snapshot()]), "ctxmem_running_sequences") == 0  # b's gauge is b's alone
    merged = render([a.snapshot(), b.snapshot()], engine_replicas=2)
    assert _sample(merged, 'ctxmem_requests_total{endpoint="/v1/completions",status="200"}') == 3
    assert _sample(merged, "ctxmem_batch_size_count") == 3 and _sample(merged, "ctxmem_batch_size_sum") == 27
    assert _sample(merged, 'ctxmem_batch_size_bucket{le="4.0"}') == 1
    assert _sample(merged, "ctxmem_running_sequences") == 4 and _sample(merged, ENGINE_REPLICAS) == 2
    assert b"_created" not in merged


def test_health_is_503_when_the_engine_is_down(tiny_export):  # noqa: F811
    args = ServeArgs(model=str(tiny_export)).resolve()
    engine = Engine(args.engine)
    engine.close()
    app = build_api(LocalEngineClient(engine), args, MemoryStore())
    assert call(app, "GET", "/health").status_code == 503


def test_without_api_keys_no_auth_is_needed(tiny_export, monkeypatch):  # noqa: F811
    monkeypatch.delenv("CTXMEM_API_KEYS", raising=False)
    args = ServeArgs(model=str(tiny_export)).resolve()
    engine = Engine(args.engine)
    try:
        app = build_api(LocalEngineClient(engine), args, MemoryStore())
        r = call(app, "POST", "/v1/completions", json={"model": args.model_name, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        engine.close()


def test_api_keys_from_the_environment_are_hashed_and_never_shipped(monkeypatch, tmp_path):
    monkeypatch.setenv("CTXMEM_API_KEYS", "k1, k2")
    args = ServeArgs(model=str(tmp_path), api_keys=["k3"]).resolve()
    assert args.api_keys == [] and len(args.api_key_hashes) == 3
    assert "k1" not in args.model_dump_json()
    assert {t.role for t in args.tenants} == {"admin"} and len(args.tenants) == 3  # plain keys are the operator's


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_the_conversation_store_appends_turns_optimistically(kind, tmp_path):
    from ctxmem.serving.store import open_store

    url = f"sqlite:///{tmp_path}/s.sqlite" if kind == "sqlite" else "memory://"
    store, other = open_store(url), (open_store(url) if kind == "sqlite" else None)
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert store.get("a", "c") is None
    assert store.append("a", "c", 0, turn) == 1
    with pytest.raises(StoreConflict):
        store.append("a", "c", 0, turn)  # a second writer that read the conversation before the first wrote
    if other is not None:  # another replica process on the same machine sees the turn
        assert other.get("a", "c")["turns"] == 1 and other.append("a", "c", 1, turn) == 2
    assert store.get("b", "c") is None  # another owner's "c" is another conversation
    store.put("a", "d", turn * 2)
    assert store.get("a", "d")["turns"] == 2
    assert store.delete("a", "d") and not store.delete("a", "d")
