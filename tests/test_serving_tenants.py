"""Tenants and limits over HTTP (FastAPI in-process over the tiny export's engine): conversations
owned by the key that created them, admin routes, what /health tells whom, the keys file, the
per-key rates and quotas, the prompt cap and the allowed memory knobs."""
from __future__ import annotations

import asyncio
import re
import httpx
import pytest
import yaml

from ctxmem.serving.api import LocalEngineClient, build_api
from ctxmem.serving.auth import Principal, new_key
from ctxmem.serving.config import EngineConfig, KeyLimits, ServeArgs, hash_key, load_keys_file
from ctxmem.serving.engine import Engine
from ctxmem.serving.errors import APIError
from ctxmem.serving.limits import RateLimiter
from ctxmem.serving.store import MemoryStore
from helpers_serving import REPO, check_error_shape

NAME = "tiny"
MAX_PROMPT = 200
KEYS = {name: new_key() for name in ("alice", "bob", "ops", "rpm", "tpm", "few", "short")}
LIMITS = {"rpm": {"requests_per_minute": 2}, "tpm": {"tokens_per_minute": 30}, "few": {"max_conversations": 2},
          "short": {"max_conversation_tokens": 40}}


def h(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture(scope="module")
def engine(tiny_export):
    eng = Engine(EngineConfig(model=str(tiny_export), max_prompt_tokens=MAX_PROMPT))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    entries = [{"name": n, "role": "admin" if n == "ops" else "user", "sha256": hash_key(k),
                **({"limits": LIMITS[n]} if n in LIMITS else {})} for n, k in KEYS.items()]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


@pytest.fixture(scope="module")
def app(engine, keys_file):
    args = ServeArgs(model="unused", model_name=NAME, api_keys_file=str(keys_file),
                     request_memory={"policies": ["sink", "recompute"], "windows": [32, 60], "sinks": [4]}).resolve()
    assert "sha256" in args.model_dump_json() and not any(k in args.model_dump_json() for k in KEYS.values())
    return build_api(LocalEngineClient(engine), args, MemoryStore())


def call(app, method: str, path: str, **kw) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go())


def chat(content: str = "hi", **fields) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0,
            **fields}


def test_a_conversation_belongs_to_the_key_that_created_it(app):
    created = call(app, "POST", "/v1/sessions", headers=h("alice"))
    assert created.status_code == 201
    sid = created.json()["id"]
    assert re.fullmatch(r"sess-[0-9a-f]{32}", sid) and created.json()["turns"] == 0
    r = call(app, "POST", f"/v1/sessions/{sid}/messages", headers=h("alice"),
              json={"content": "my secret plan", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["session"] == {"id": sid, "turns": 1}

    never = "sess-" + "0" * 32
    for method, path, body in (("GET", "/v1/sessions/{}", None), ("DELETE", "/v1/sessions/{}", None),
                               ("POST", "/v1/sessions/{}/messages", {"content": "hi", "max_tokens": 2})):
        theirs = call(app, method, path.format(sid), headers=h("bob"), json=body)
        missing = call(app, method, path.format(never), headers=h("bob"), json=body)
        check_error_shape(theirs.status_code, theirs.json(), 404, f"{method} another key's conversation")
        # the same answer as for an id that never existed: nothing tells bob that alice has it
        assert theirs.json()["error"]["message"].replace(sid, never) == missing.json()["error"]["message"]
    assert call(app, "GET", "/v1/sessions", headers=h("bob")).json() == {"object": "list", "data": []}

    # bob naming alice's id on the stateless endpoint writes bob's own conversation, never hers
    r = call(app, "POST", "/v1/chat/completions", headers={**h("bob"), "X-Session-Id": sid}, json=chat("bob here"))
    assert r.status_code == 200
    assert call(app, "GET", f"/v1/sessions/{sid}", headers=h("bob")).json()["title"] == "bob here"
    mine = call(app, "GET", f"/v1/sessions/{sid}", headers=h("alice")).json()
    assert mine["turns"] == 1 and mine["messages"][0]["content"] == "my secret plan"
    listed = call(app, "GET", "/v1/sessions", headers=h("alice")).json()["data"]
    assert [(s["id"], s["turns"], s["title"]) for s in listed] == [(sid, 1, "my secret plan")]
    assert set(listed[0]) == {"id", "object", "created", "last_used", "turns", "title", "tokens"}
    assert call(app, "DELETE", f"/v1/sessions/{sid}", headers=h("alice")).json()["deleted"] is True


def test_a_client_chosen_id_is_created_once_and_checked_whole(app):
    assert call(app, "POST", "/v1/sessions", headers=h("alice"), json={"id": "mine-1"}).status_code == 201
    again = call(app, "POST", "/v1/sessions", headers=h("alice"), json={"id": "mine-1"})
    check_error_shape(again.status_code, again.json(), 409, "the same id twice")
    assert call(app, "POST", "/v1/sessions", headers=h("bob"), json={"id": "mine-1"}).status_code == 201  # bob's own
    for bad in ("a\n", "x" * 129, "a/b", "", "é"):
        r = call(app, "POST", "/v1/sessions", headers=h("alice"), json={"id": bad})
        check_error_shape(r.status_code, r.json(), 400, repr(bad))
        assert "1-128 characters" in r.json()["error"]["message"]
    assert call(app, "POST", "/v1/sessions", headers=h("alice"), json={"id": "x" * 128}).status_code == 201
    for bad in ("a\n", "x" * 129):  # the header of the stateless endpoint, matched whole too
        r = call(app, "POST", "/v1/chat/completions", headers={**h("alice"), "X-Session-Id": bad}, json=chat())
        check_error_shape(r.status_code, r.json(), 400, repr(bad))
    r = call(app, "POST", "/v1/sessions", headers=h("alice"), json={"id": "ok", "title": "x"})
    check_error_shape(r.status_code, r.json(), 400, "unknown field")


def test_the_openai_user_field_never_creates_a_conversation(app):
    before = call(app, "GET", "/v1/sessions", headers=h("ops")).json()["data"]
    r = call(app, "POST", "/v1/chat/completions", headers=h("ops"), json=chat(user="end-user-7"))
    assert r.status_code == 200
    assert call(app, "GET", "/v1/sessions", headers=h("ops")).json()["data"] == before
    assert call(app, "GET", "/v1/sessions/end-user-7", headers=h("ops")).status_code == 404


def test_admin_routes_need_an_admin_key_and_health_tells_only_an_admin_the_details(app):
    r = call(app, "POST", "/admin/reload", headers=h("alice"))
    check_error_shape(r.status_code, r.json(), 403, "reload with a user key")
    assert "admin" in r.json()["error"]["message"]
    assert call(app, "POST", "/admin/reload", headers=h("ops")).status_code == 200
    for headers in ({}, h("alice"), {"Authorization": "Bearer wrong"}):
        r = call(app, "GET", "/health", headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    detail = call(app, "GET", "/health", headers=h("ops")).json()
    assert detail["status"] == "ok" and detail["engine"]["path"] and detail["model"] == NAME


def test_a_key_over_its_request_rate_gets_429_with_retry_after(app):
    codes = [call(app, "POST", "/v1/chat/completions", headers=h("rpm"), json=chat()) for _ in range(3)]
    assert [c.status_code for c in codes[:2]] == [200, 200]
    check_error_shape(codes[2].status_code, codes[2].json(), 429, "third request in a minute")
    assert int(codes[2].headers["retry-after"]) >= 1 and "2 requests per minute" in codes[2].json()["error"]["message"]
    assert call(app, "POST", "/v1/chat/completions", headers=h("alice"), json=chat()).status_code == 200  # others go on


def test_a_key_over_its_token_rate_gets_429_once_its_tokens_are_spent(app):
    first = call(app, "POST", "/v1/chat/completions", headers=h("tpm"), json=chat("x" * 30))
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 30
    r = call(app, "POST", "/v1/chat/completions", headers=h("tpm"), json=chat())
    check_error_shape(r.status_code, r.json(), 429, "tokens spent")
    assert int(r.headers["retry-after"]) >= 1 and "30 tokens per minute" in r.json()["error"]["message"]


def test_rates_slide_over_sixty_seconds():
    """A clock the test moves: the window frees a request 60 s after it came, not before."""
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    who = Principal("k", "user", KeyLimits(requests_per_minute=2))
    limiter.admit(who)
    now[0] += 30
    limiter.admit(who)
    with pytest.raises(APIError) as err:
        limiter.admit(who)
    assert err.value.status == 429 and err.value.headers["Retry-After"] == "30"
    now[0] += 30.5  # the first request left the window
    limiter.admit(who)

    spender = Principal("t", "user", KeyLimits(tokens_per_minute=100))
    limiter.admit(spender)
    limiter.charge(spender, 60)
    now[0] += 20
    limiter.admit(spender)
    limiter.charge(spender, 60)  # 120 tokens in the window: refused until the first 60 leave it
    with pytest.raises(APIError) as err:
        limiter.admit(spender)
    assert err.value.headers["Retry-After"] == "40"
    now[0] += 40.5
    limiter.admit(spender)


def test_a_new_conversation_beyond_the_cap_evicts_the_least_recently_used(app):
    ids = [call(app, "POST", "/v1/sessions", headers=h("few")).json()["id"] for _ in range(2)]
    r = call(app, "POST", f"/v1/sessions/{ids[0]}/messages", headers=h("few"), json={"content": "hi", "max_tokens": 2})
    assert r.status_code == 200  # ids[0] is now the most recently used
    third = call(app, "POST", "/v1/sessions", headers=h("few")).json()["id"]
    kept = {s["id"] for s in call(app, "GET", "/v1/sessions", headers=h("few")).json()["data"]}
    assert kept == {ids[0], third}


def test_a_conversation_at_its_token_limit_takes_no_new_turn(app):
    sid = call(app, "POST", "/v1/sessions", headers=h("short")).json()["id"]
    r = call(app, "POST", f"/v1/sessions/{sid}/messages", headers=h("short"), json={"content": "y" * 40, "max_tokens": 2})
    assert r.status_code == 200
    r = call(app, "POST", f"/v1/sessions/{sid}/messages", headers=h("short"), json={"content": "more", "max_tokens": 2})
    check_error_shape(r.status_code, r.json(), 400, "conversation full")
    assert r.json()["error"]["code"] == "conversation_too_long" and "POST /v1/sessions" in r.json()["error"]["message"]


def test_a_prompt_over_the_cap_and_memory_knobs_outside_the_allowed_set_are_400(app):
    r = call(app, "POST", "/v1/completions", headers=h("alice"), json={"model": NAME, "prompt": "p" * (MAX_PROMPT + 1)})
    check_error_shape(r.status_code, r.json(), 400, "prompt too long")
    assert r.json()["error"]["param"] == "prompt" and f"max_prompt_tokens of {MAX_PROMPT}" in r.json()["error"]["message"]
    ok = call(app, "POST", "/v1/completions", headers=h("alice"),
              json={"model": NAME, "prompt": "p", "max_tokens": 2, "window": 32, "sinks": 4, "policy": "recompute"})
    assert ok.status_code == 200, ok.text
    for field, value, allowed in (("window", 1, "[32, 60]"), ("sinks", 0, "[4]"), ("policy", "full", "['recompute', 'sink']")):
        r = call(app, "POST", "/v1/completions", headers=h("alice"),
                 json={"model": NAME, "prompt": "p", "max_tokens": 2, field: value})
        check_error_shape(r.status_code, r.json(), 400, field)
        assert r.json()["error"]["param"] == field and allowed in r.json()["error"]["message"]


def test_by_default_a_request_may_restate_the_servers_window_but_not_pick_another(engine):
    app = build_api(LocalEngineClient(engine), ServeArgs(model="unused", model_name=NAME).resolve(), MemoryStore())
    own = engine.info()["memory"]  # the tiny export's sink(4) + window 60
    body = {"model": NAME, "prompt": "p", "max_tokens": 2}
    assert call(app, "POST", "/v1/completions", json={**body, "window": own["window"], "sinks": own["sinks"]}).status_code == 200
    r = call(app, "POST", "/v1/completions", json={**body, "window": 32})
    check_error_shape(r.status_code, r.json(), 400, "another window")
    assert "leave it out" in r.json()["error"]["message"]


def test_the_keys_file_refuses_plain_keys_duplicates_and_unknown_fields(tmp_path):
    path = tmp_path / "k.yaml"
    for data, words in (({"keys": [{"name": "a", "sha256": "sk-plain-key"}]}, "never the key itself"),
                        ({"keys": [{"name": "a", "sha256": "a" * 64}, {"name": "a", "sha256": "b" * 64}]}, "name"),
                        ({"keys": [{"name": "a b", "sha256": "a" * 64}]}, "letters, digits"),
                        ({"keys": [{"name": "a", "sha256": "a" * 64, "role": "root"}]}, "role"),
                        ({"keys": [{"name": "a", "sha256": "a" * 64, "limits": {"rpm": 1}}]}, "rpm")):
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ValueError, match=words):
            load_keys_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_keys_file(tmp_path / "missing.yaml")


def test_the_readme_keys_file_is_valid(tmp_path):
    readme = (REPO / "serving" / "README.md").read_text()
    block = readme.split("## Tenants", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "keys.yaml").write_text(block)
    tenants = load_keys_file(tmp_path / "keys.yaml")
    assert [(t.name, t.role) for t in tenants] == [("alice", "user"), ("ops", "admin")]


def test_ctxmem_serve_refuses_an_open_non_loopback_host(keys_file):
    import argparse

    from ctxmem.serving.cli import check_exposure, register, serve_args

    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(host, has_keys=False, allow_unauthenticated=False)
    with pytest.raises(SystemExit, match="--allow-unauthenticated"):
        check_exposure("0.0.0.0", has_keys=False, allow_unauthenticated=False)
    check_exposure("0.0.0.0", has_keys=False, allow_unauthenticated=True)
    check_exposure("0.0.0.0", has_keys=True, allow_unauthenticated=False)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--api-keys-file", str(keys_file)])
    config = serve_args(args).resolve()
    assert {t.name for t in config.tenants} == set(KEYS) and config.api_keys_file is None
    # the flag reaches the builder, which applies the same rule under `serve run` too
    open_args = parser.parse_args(["serve", "--model", "m", "--host", "0.0.0.0", "--allow-unauthenticated"])
    assert serve_args(open_args).allow_unauthenticated and not serve_args(args).allow_unauthenticated
    assert not serve_args(args).colocate_engine  # one replica type only when asked for
    assert serve_args(parser.parse_args(["serve", "--model", "m", "--colocate-engine"])).colocate_engine


def test_serve_run_yaml_refuses_an_open_non_loopback_host(monkeypatch):
    """`serve run infra/serve.yaml` builds through build_app, which refuses Serve's HTTP host when it is
    not loopback and no key is configured (unless args.allow_unauthenticated), as `ctxmem serve` does.
    The host lookup is replaced here: binding all interfaces in the suite is what the rule is against."""
    from ctxmem.serving import app as serving_app
    from ctxmem.serving.config import exposure_refusal

    monkeypatch.delenv("CTXMEM_API_KEYS", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        assert exposure_refusal(host, has_keys=False, allow_unauthenticated=False) is None
    assert "allow_unauthenticated" in exposure_refusal("0.0.0.0", has_keys=False, allow_unauthenticated=False)
    assert exposure_refusal("10.1.2.3", has_keys=True, allow_unauthenticated=False) is None
    assert isinstance(serving_app.serve_http_host(), str)  # the real lookup answers with or without Ray

    monkeypatch.setattr(serving_app, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(ValueError, match="refusing to serve 0.0.0.0 without API keys"):
        serving_app.build_app({"model": "some/export"})
    for allowed in ({"allow_unauthenticated": True}, {"api_keys": ["a-key"]}):
        app = serving_app.build_app({"model": "some/export", **allowed})
        assert app is not None
