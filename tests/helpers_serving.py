"""Shared pieces of the serving tests: the malformed-request battery, waiting, the YAML patcher, an
application on a local Ray Serve."""
from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@contextmanager
def app_on_local_ray(export: Path, prefix: str, **args: Any) -> Iterator[str]:
    """`build_app` of ServeArgs(`args`) over `export` (model name "tiny", a SQLite store in a temporary
    folder) on a local Ray of 4 logical CPUs with Serve on 127.0.0.1; yields the app's URL, then
    shuts Serve and Ray down."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from ctxmem.net import free_port
    from ctxmem.serving.app import build_app
    from ctxmem.serving.config import ServeArgs

    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # Ray's socket paths must stay short
    ray.init(num_cpus=4, object_store_memory=200 * 2**20, include_dashboard=False, _temp_dir=f"{tmp}/ray",
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeArgs.model_validate({"model": str(export), "model_name": "tiny",
                                       "session_store": f"sqlite:///{tmp}/sessions.sqlite", **args})
    try:
        serve.run(build_app(config), name="ctxmem", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def sse_text(body: str) -> tuple[str, dict]:
    """The text and the usage of a streamed completion."""
    text, usage = [], None
    for line in body.splitlines():
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                text.append(chunk["choices"][0]["text"])
            usage = chunk.get("usage") or usage
    assert body.rstrip().endswith("data: [DONE]"), body[-200:]
    return "".join(text), usage


def wait_healthy(url: str, timeout: float = 120.0, proc=None, headers: dict[str, str] | None = None) -> dict:
    """/health once it answers 200 (with an admin key in `headers` it carries the engine's details)."""
    import httpx

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before becoming healthy")
        try:
            r = httpx.get(url + "/health", timeout=5, headers=headers)
            if r.status_code == 200:
                return r.json()
            last = r.text
        except httpx.HTTPError as err:
            last = err
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s: {last}")


def patched_serve_yaml(src: Path, out: Path, port: int, args: dict[str, Any], cpus: float = 0.25) -> Path:
    """The shipped config with only the test's model, port, store and fractional CPUs changed."""
    cfg = yaml.safe_load(src.read_text())
    cfg["http_options"]["port"] = port
    cfg["http_options"]["host"] = "127.0.0.1"
    app = cfg["applications"][0]
    app["args"] = {**app["args"], **args, "engine": {**app["args"].get("engine", {}), **args.get("engine", {})}}
    for d in app.get("deployments", []):
        d.setdefault("ray_actor_options", {})["num_cpus"] = cpus
        d.get("ray_actor_options", {}).pop("num_gpus", None)
    out.write_text(yaml.safe_dump(cfg))
    return out


# ---- the malformed-request battery -----------------------------------------------------------------
def malformed_requests(model: str) -> Iterator[tuple[str, str, str, bytes, dict[str, str], int]]:
    """(name, method, path, body, headers, expected status). Every one must get an OpenAI-shaped 4xx."""
    json_h = {**AUTH, "Content-Type": "application/json"}

    def body(d: Any) -> bytes:
        return json.dumps(d).encode()

    comp = {"model": model, "prompt": "hello", "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    # not JSON, not an object, not UTF-8
    raw_bodies = [b"", b"{", b"}", b"[1, 2]", b'"text"', b"null", b"42", b"{'model': 'x'}", b'{"model": "x",}',
                  b'{"model": "x"} trailing', b'{"model": "x", "prompt": "a", "temperature": NaN}',
                  b'{"model": "x", "prompt": "a", "temperature": Infinity}',
                  b'{"model": "x", "prompt": "a", "top_p": -Infinity}', b"[" * 100000,
                  b"\xff\xfe\xfd", b'{"model": "\xc3\x28"}', b'{"prompt": "\xed\xa0\x80"}', b"\x80abc",
                  b'{"model": "x", "prompt": "caf\xe9"}']
    for i, raw in enumerate(raw_bodies):
        for path in ("/v1/completions", "/v1/chat/completions"):
            yield f"raw{i}{path}", "POST", path, raw, json_h, 400

    # wrong types and out-of-range values, one field at a time
    bad_fields = {
        "model": [None, 5, ["m"], {"a": 1}],
        "max_tokens": ["5", 5.5, -1, 0, True, 10**9, [4]],
        "temperature": ["hot", -0.5, 3, True, 1e400, [0]],
        "top_p": [0, 1.5, "x", -1],
        "n": [2, "1", 0],
        "stream": ["yes", 1, None],
        "stop": [3, [1], ["a", "b", "c", "d", "e"], [""], {"s": 1}],
        "seed": ["x", 1.5, True],
        "user": [5, "has spaces in it", "x" * 300],
        "presence_penalty": [1.0, "x"],
        "frequency_penalty": [0.5],
        "logit_bias": [{"1": 5}],
        "policy": ["bogus", 3],
        "window": [0, -4, "x", 10**6],
        "sinks": [-1, "x", 10**6],
        "top_k": [-1, "x"],
        "repetition_penalty": [0, -1, "x"],
        "stream_options": [{"include_usage": True}],  # without stream: true
        "not_a_parameter": [1],
    }
    for field, values in bad_fields.items():
        for j, value in enumerate(values):
            yield f"completion-{field}-{j}", "POST", "/v1/completions", body({**comp, field: value}), json_h, 400
    for field in ("echo", "best_of", "logprobs", "suffix"):
        value = {"echo": True, "best_of": 3, "logprobs": 5, "suffix": "x"}[field]
        yield f"completion-{field}", "POST", "/v1/completions", body({**comp, field: value}), json_h, 400
    for j, prompt in enumerate([5, None, [], ["a", "b"], {"p": 1}, [1.5], [-1], [10**9], [[1], [2]], True]):
        yield f"completion-prompt-{j}", "POST", "/v1/completions", body({**comp, "prompt": prompt}), json_h, 400
    yield "completion-missing-prompt", "POST", "/v1/completions", body({"model": model}), json_h, 400

    bad_messages = [None, [], "hi", [1], [None], [{"role": "user"}], [{"content": "x"}], [{"role": "robot", "content": "x"}],
                    [{"role": "tool", "content": "x"}], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}],
                    [{"role": "user", "content": ["a"]}], [{"role": "user", "content": [{"type": "image_url"}]}],
                    [{"role": "user", "content": "x", "extra": 1}], [{"role": "user", "content": None}],
                    [{"role": "user", "content": "x", "name": 5}]]
    for j, messages in enumerate(bad_messages):
        yield f"chat-messages-{j}", "POST", "/v1/chat/completions", body({**chat, "messages": messages}), json_h, 400
    for j, (field, value) in enumerate([("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}),
                                        ("logprobs", True), ("max_completion_tokens", -3), ("tool_choice", "required"),
                                        ("temperature", "NaN"), ("max_tokens", 10**7)]):
        yield f"chat-{field}-{j}", "POST", "/v1/chat/completions", body({**chat, field: value}), json_h, 400

    # model, auth, size, routes, methods
    yield "unknown-model", "POST", "/v1/completions", body({**comp, "model": "gpt-nope"}), json_h, 404
    yield "unknown-model-chat", "POST", "/v1/chat/completions", body({**chat, "model": "gpt-nope"}), json_h, 404
    for j, headers in enumerate([{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + API_KEY},
                                 {"Authorization": "Bearer"}, {"Authorization": API_KEY}]):
        for path, b in (("/v1/completions", comp), ("/v1/chat/completions", chat)):
            yield f"auth-{j}{path}", "POST", path, body(b), {"Content-Type": "application/json", **headers}, 401
    yield "auth-models", "GET", "/v1/models", b"", {"Authorization": "Bearer wrong"}, 401
    big = body({**comp, "prompt": "x" * (2 << 20)})
    yield "oversize", "POST", "/v1/completions", big, json_h, 413
    yield "oversize-chat", "POST", "/v1/chat/completions", big, json_h, 413
    yield "unknown-route", "POST", "/v1/embeddings", body(comp), json_h, 404
    yield "wrong-method", "GET", "/v1/completions", b"", AUTH, 405
    yield "wrong-method-chat", "PUT", "/v1/chat/completions", body(chat), json_h, 405

    # the stateful endpoint
    yield "session-no-content", "POST", "/v1/sessions/s-bad/messages", body({"max_tokens": 2}), json_h, 400
    yield "session-content-int", "POST", "/v1/sessions/s-bad/messages", body({"content": 5}), json_h, 400
    yield "session-messages", "POST", "/v1/sessions/s-bad/messages", body({"messages": []}), json_h, 400
    yield "session-role", "POST", "/v1/sessions/s-bad/messages", body({"content": "x", "role": "robot"}), json_h, 400
    yield "session-bad-id", "POST", "/v1/sessions/bad%20id/messages", body({"content": "x"}), json_h, 400
    yield "session-unknown", "GET", "/v1/sessions/never-seen", b"", AUTH, 404


def check_error_shape(status: int, data: Any, expected: int, name: str) -> None:
    assert status == expected, f"{name}: status {status}, expected {expected}: {data}"
    assert isinstance(data, dict) and set(data) == {"error"}, f"{name}: not an OpenAI error: {data}"
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"}, f"{name}: error keys {sorted(err)}"
    assert isinstance(err["message"], str) and err["message"], name


def poison_rows_after(monkeypatch, seed: int, tokens: int) -> None:
    """Fault injection: the scheduler's decode steps turn the logits of every row whose request seed is
    ``seed`` to NaN once it has ``tokens`` tokens (the step's own (B, V) array, before the batch's pick),
    so the real sampler has nothing to pick from for that row alone."""
    import numpy as np

    from ctxmem.serving import scheduler

    pick = scheduler.pick

    def faulty_pick(decoders, logits):
        for row, d in enumerate(decoders):
            if d.config.seed == seed and len(d.token_ids) >= tokens:
                logits[row] = np.nan
        return pick(decoders, logits)

    monkeypatch.setattr(scheduler, "pick", faulty_pick)
