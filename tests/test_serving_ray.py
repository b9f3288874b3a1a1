"""Against a real Ray Serve on 127.0.0.1, started once for the module with `serve run` on the shipped
infra/serve.yaml - whose model, models:/ctxmem@champion, is resolved through a real MLflow registry
(SQLite store) holding the tiny export. Only the store, port, conversation store, API key and CPU
fractions are patched. Covered: the official openai client, a 40-turn conversation past the window,
a killed engine replica, a malformed-request battery, 32 concurrent streams, metrics, and promoting
a new champion under load. The serving README's commands run here as written (`serve run`, both
`ctxmem serve` lines, the reload `curl`, the Python example), with only the flags that point them at
this test's cluster, port, registry and stores added.

Nothing asserts on wall-clock time: KV reuse shows as prefill token counts and cache hits.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers_export import new_sqlite_store
from helpers_serving import (API_KEY, AUTH, REPO, check_error_shape, malformed_requests, patched_serve_yaml,
                             wait_healthy)

from ctxmem.net import free_port
from ctxmem.proc import default_sigint

pytestmark = pytest.mark.slow  # every test here runs against the module's Ray cluster
NAME = "ctxmem"  # derived from models:/ctxmem@champion
README = REPO / "serving" / "README.md"


def readme_commands(program: str) -> list[str]:
    """The command lines of the serving README's bash blocks that start with `program` (after any
    VAR=value assignments), comments removed."""
    text = README.read_text()
    lines = []
    for block in text.split("```bash\n")[1:]:
        for line in block.split("```", 1)[0].splitlines():
            words = [w for w in shlex.split(line, comments=True) if "=" not in w or w.startswith("-")]
            if words and words[0] == program:
                lines.append(line.split("  #", 1)[0].strip())
    assert lines, f"no `{program}` command in {README}"
    return lines


@pytest.fixture(scope="module")
def registry(tiny_export, mlflow_store_template, tmp_path_factory):  # noqa: F811
    from ctxmem.export.registry import CHAMPION, promote, register_export

    root = tmp_path_factory.mktemp("registry")
    uri = new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    version = register_export(tiny_export, NAME, tracking_uri=uri)["version"]
    promote(NAME, CHAMPION, version=version, tracking_uri=uri, memory_gate=False)  # the memory gate is tested elsewhere
    return {"uri": uri, "cache": root / "downloads"}


@pytest.fixture(scope="module")
def server(tiny_export, registry, tmp_path_factory):  # noqa: F811
    import ray

    tmp = tmp_path_factory.mktemp("serve")
    ray_tmp = tempfile.mkdtemp(prefix="ctxray-", dir="/tmp")  # Ray's socket paths must stay short
    env = pytest.MonkeyPatch()
    env.setenv("CTXMEM_MODEL_CACHE", str(registry["cache"]))  # replicas inherit it: downloads stay in tmp
    # 4 logical CPUs on any machine: the YAML application (1) and a README `ctxmem serve` application
    # (2 x 0.5) must fit while the previous README application is still being torn down, which under
    # load can outlast the test that started it (a fresh-clone run waited 180 s for CPUs to free up)
    ctx = ray.init(num_cpus=4, object_store_memory=400 * 2**20, include_dashboard=False, _temp_dir=ray_tmp,
                   log_to_driver=False)
    port = free_port()
    config = patched_serve_yaml(REPO / "infra" / "serve.yaml", tmp / "serve.yaml", port, {
        "api_keys": [API_KEY], "max_tokens_limit": 512, "session_store": f"sqlite:///{tmp}/sessions.sqlite",
        "engine": {"tracking_uri": registry["uri"]}})
    log = open(tmp / "serve-run.log", "wb")
    # the README's `RAY_AUTH_MODE=token serve run infra/serve.yaml`, on the patched copy of the YAML and
    # joining this test's cluster (-a)
    (command,) = readme_commands("serve")
    words = shlex.split(command)
    assignments = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    argv = [w for w in words if w not in [f"{k}={v}" for k, v in assignments.items()]]
    assert argv == ["serve", "run", "infra/serve.yaml"] and assignments == {"RAY_AUTH_MODE": "token"}, command
    serve_cli = Path(sys.executable).parent / "serve"
    proc = subprocess.Popen([str(serve_cli), "run", "-a", ctx.address_info["gcs_address"], str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **assignments},
                            preexec_fn=default_sigint)  # stopped with SIGINT below
    url = f"http://127.0.0.1:{port}"
    try:
        health = wait_healthy(url, timeout=180, proc=proc, headers=AUTH)  # an admin key sees the engine
        yield {"url": url, "export": tiny_export, "health": health, "registry": registry, "config": config}
    except Exception:
        log.flush()
        print((tmp / "serve-run.log").read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)  # serve run tears the application and Serve down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ray.shutdown()
        env.undo()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server):
    from ctxmem.export.runtime import load_onnx_generator

    return load_onnx_generator(server["export"])


def test_serve_run_on_the_shipped_yaml_answers(server, client):
    engine = server["health"]["engine"]
    assert engine["kind"] == "onnx" and engine["provider"] == "cpu"  # the production path: ONNX Runtime
    assert engine["spec"] == "models:/ctxmem@champion"
    assert Path(engine["path"]).is_relative_to(server["registry"]["cache"])  # downloaded from the registry
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.completions.create(model=NAME, prompt="hi", max_tokens=3).choices[0].finish_reason == "length"


def test_greedy_text_is_the_same_streamed_unstreamed_and_from_the_onnx_generator(client, reference):
    from ctxmem.sampling import GenerationConfig
    from ctxmem.chat_template import ChatTemplate

    greedy = GenerationConfig(max_new_tokens=24, temperature=0)
    prompt = "The quick brown fox"
    expected = reference.generate([prompt], greedy)[0].text
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True) if ch.choices)
    assert plain.choices[0].text == streamed == expected

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    expected = reference.generate([ChatTemplate(reference.tokenizer).render(messages)], greedy)[0].text
    chat = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chat.choices[0].message.content == streamed == expected
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_a_forty_turn_conversation_past_the_window_reuses_the_kv_state_every_turn(server, client):
    messages, usages = [], []
    capacity = server["health"]["engine"]["memory"]["window"] + server["health"]["engine"]["memory"]["sinks"]
    for turn in range(40):
        messages.append({"role": "user", "content": f"turn {turn}: and then what happened next?"})
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                           extra_headers={"X-Session-Id": "forty"})
        usages.append(r.usage)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    last = usages[-1]
    assert last.prompt_tokens > 5 * capacity  # far past the window, never rejected
    assert last.model_extra["evicted_tokens"] >= last.prompt_tokens - capacity
    for previous, usage in zip(usages[1:], usages[2:]):
        cached = usage.prompt_tokens_details.cached_tokens
        assert cached >= previous.prompt_tokens  # the whole previous turn came from the cache
        assert usage.prompt_tokens - cached < 64  # only the new message was prefilled
    metrics = httpx.get(server["url"] + "/metrics").text
    assert _value(metrics, 'ctxmem_kv_cache_lookups_total{result="hit"}') >= 39


def test_every_malformed_request_is_a_4xx_openai_error_and_the_server_stays_healthy(server):
    cases = list(malformed_requests(NAME))
    assert len(cases) >= 100
    with httpx.Client(base_url=server["url"], timeout=30) as http:
        for name, method, path, body, headers, expected in cases:
            r = http.request(method, path, content=body, headers=headers)
            check_error_shape(r.status_code, r.json(), expected, name)
        assert http.get("/health").status_code == 200
        ok = http.post("/v1/completions", headers=AUTH, json={"model": NAME, "prompt": "still fine", "max_tokens": 2})
        assert ok.status_code == 200


def test_thirty_two_concurrent_streaming_clients_all_complete(server):
    import openai

    async def main():
        client = openai.AsyncOpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(i: int):
            stream = await client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": f"client {i}"}], max_tokens=24, stream=True)
            finish, text = None, []
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            return finish

        results = await asyncio.gather(*[one(i) for i in range(32)], return_exceptions=True)
        await client.close()
        return results

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r in ("length", "stop") for r in results)
    metrics = httpx.get(server["url"] + "/metrics").text
    assert _value(metrics, 'ctxmem_requests_total{endpoint="/v1/chat/completions",status="500"}') == 0
    # shared forward passes: some decode steps ran with more than 8 sequences
    assert _value(metrics, "ctxmem_batch_size_count") > _value(metrics, 'ctxmem_batch_size_bucket{le="8.0"}')


def test_metrics_report_requests_tokens_latencies_batches_cache_and_evictions(server):
    text = httpx.get(server["url"] + "/metrics").text
    assert _value(text, 'ctxmem_requests_total{endpoint="/v1/chat/completions",status="200"}') > 0
    for series in ("ctxmem_completion_tokens_total", "ctxmem_prompt_tokens_total", "ctxmem_evicted_tokens_total",
                   "ctxmem_time_to_first_token_seconds_count", "ctxmem_inter_token_latency_seconds_count",
                   "ctxmem_batch_size_count", "ctxmem_cached_tokens_total", "ctxmem_engine_replicas"):
        assert _value(text, series) > 0, series


def test_promoting_a_new_champion_rolls_the_replicas_over_without_dropping_a_stream(server, client, tiny_export):  # noqa: F811,E501
    from ctxmem.export.registry import CHAMPION, promote, register_export

    url, uri = server["url"], server["registry"]["uri"]
    # the README's reload command, as written but for the port
    (curl,) = readme_commands("curl")
    done = subprocess.run(["bash", "-c", curl.replace("http://127.0.0.1:8000", url) + " --silent --show-error"],
                          env={**os.environ, "KEY": API_KEY}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replicas"][0]["changed"] is False
    before = httpx.get(url + "/health", headers=AUTH).json()["engine"]["path"]
    version = register_export(tiny_export, NAME, tracking_uri=uri)["version"]
    promote(NAME, CHAMPION, version=version, tracking_uri=uri, force=True,
            reason="serving test: the same weights as a new version")
    finished: list[str | None] = []

    def stream_through_the_rollover():
        chunks = client.completions.create(model=NAME, prompt="keep going", max_tokens=300, stream=True,
                                           extra_body={"ignore_eos": True})
        finished.append([c.choices[0].finish_reason for c in chunks if c.choices][-1])

    reader = threading.Thread(target=stream_through_the_rollover)
    reader.start()
    reloaded = httpx.post(url + "/admin/reload", headers=AUTH, timeout=120)
    reader.join(120)
    assert reloaded.status_code == 200
    replicas = reloaded.json()["replicas"]
    assert len(replicas) == 1 and replicas[0]["changed"] is True and replicas[0]["path"] != before
    assert f"/v{version}-" in replicas[0]["path"]
    assert finished == ["length"]  # the in-flight stream finished on the old version
    assert client.completions.create(model=NAME, prompt="after", max_tokens=3).choices[0].finish_reason == "length"
    assert httpx.post(url + "/admin/reload", timeout=30).status_code == 401


def test_a_user_config_change_reconfigures_the_live_replica(server):
    """`serve run` again with only the Engine's user_config changed: Serve's lightweight update calls
    `reconfigure` on the same replica (no restart), which applies the knob and re-resolves the alias."""
    import ray
    import yaml

    before = httpx.get(server["url"] + "/health", headers=AUTH).json()["engine"]
    config = yaml.safe_load(server["config"].read_text())
    engine = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Engine")
    engine["user_config"] = {"max_batch_size": 16, "reload_nonce": 1}
    changed = server["config"].with_name("serve-user-config.yaml")
    changed.write_text(yaml.safe_dump(config))
    done = subprocess.run([str(Path(sys.executable).parent / "serve"), "run", "--non-blocking", "-a",
                           ray.get_runtime_context().gcs_address, str(changed)], capture_output=True, text=True,
                          env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for _ in range(120):
        after = httpx.get(server["url"] + "/health", headers=AUTH).json()["engine"]
        if after["max_batch_size"] == 16:
            break
        time.sleep(0.5)
    assert after["max_batch_size"] == 16 and after["replica"] == before["replica"]


def test_a_client_that_disconnects_frees_its_batch_slot(server):
    body = {"model": NAME, "prompt": "a long story", "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=server["url"], headers=AUTH, timeout=60) as http:
        rows_before = _value(http.get("/metrics").text, "ctxmem_batch_size_sum")  # rows decoded so far
        with http.stream("POST", "/v1/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 4:
                    break  # hang up mid-stream
        for _ in range(100):
            metrics = http.get("/metrics").text
            if _value(metrics, "ctxmem_running_sequences") == 0:
                break
            time.sleep(0.1)
    assert _value(metrics, "ctxmem_running_sequences") == 0
    time.sleep(0.5)
    decoded = _value(httpx.get(server["url"] + "/metrics").text, "ctxmem_batch_size_sum") - rows_before
    assert decoded < 400  # it left the batch well before its 500 tokens


def test_the_readme_python_example_runs(server, capsys):
    text = (REPO / "serving" / "README.md").read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'base_url="http://127.0.0.1:8000/v1"' in example and 'model="ctxmem"' in example
    exec(compile(example.replace("http://127.0.0.1:8000", server["url"]).replace("sk-local", API_KEY),
                 "serving/README.md", "exec"), {})
    assert capsys.readouterr().out


@pytest.mark.parametrize("index", range(len(readme_commands("ctxmem"))))
def test_the_readme_ctxmem_serve_commands_run_beside_the_yaml_application(server, tiny_export, tmp_path, index):  # noqa: F811,E501
    """Each `ctxmem serve` line of the README, as written, plus flags that join the running cluster on
    its port and add the application under a route prefix of its own (conversations in tmp)."""
    import ray

    command = readme_commands("ctxmem")[index]
    argv = [str(tiny_export) if w == "path/to/export" else w for w in shlex.split(command)]
    assert argv[:2] == ["ctxmem", "serve"], command
    port = int(server["url"].rsplit(":", 1)[1])
    app = f"readme{index}"
    argv = [str(Path(sys.executable).parent / "ctxmem"), *argv[1:], "--port", str(port),
            "--address", ray.get_runtime_context().gcs_address, "--app-name", app, "--route-prefix", f"/{app}",
            "--session-store", f"sqlite:///{tmp_path}/sessions.sqlite"]
    key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else None
    env = {**os.environ, "RAY_AUTH_MODE": "token", "MLFLOW_TRACKING_URI": server["registry"]["uri"]}
    env.pop("CTXMEM_API_KEYS", None)
    log = open(tmp_path / "cli.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=default_sigint)
    try:
        url = f"{server['url']}/{app}"
        health = wait_healthy(url, timeout=180, proc=proc, headers={"Authorization": f"Bearer {key}"} if key else None)
        assert health["engine"]["kind"] == "onnx"
        if "models:/" in command:  # resolved through the registry ($MLFLOW_TRACKING_URI)
            assert health["model"] == NAME and health["engine"]["spec"] == "models:/ctxmem@champion"
        else:
            assert health["model"] == tiny_export.name and health["engine"]["path"] == str(tiny_export)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if key:
            assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=120,
                       json={"model": health["model"], "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    except Exception:
        log.flush()
        print((tmp_path / "cli.log").read_text()[-3000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)  # deletes its own application, leaves the YAML one running
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_a_killed_engine_replica_loses_no_turn(server):
    """Kill the engine actor between turns: the next turn lands on the replacement replica, which has
    no KV state - it rebuilds the conversation from the shared store (a cache miss) and goes on."""
    import ray

    url = server["url"]
    sid = "survivor"
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:

        def turn(i: int) -> dict:
            r = http.post(f"/v1/sessions/{sid}/messages", json={"content": f"message {i}", "max_tokens": 6})
            assert r.status_code == 200, r.text
            return r.json()

        assert http.post("/v1/sessions", json={"id": sid}).status_code == 201
        for i in range(3):
            turn(i)
        before = http.get("/health").json()["engine"]
        ray.kill(ray.get_actor(before["actor_name"], namespace="serve"), no_restart=True)
        after_kill = [turn(i) for i in range(3, 6)]
        assert [t["session"]["turns"] for t in after_kill] == [4, 5, 6]
        assert after_kill[0]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # rebuilt from the store
        assert after_kill[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # and cached again
        history = http.get(f"/v1/sessions/{sid}").json()
        assert [m["content"] for m in history["messages"] if m["role"] == "user"] == [f"message {i}" for i in range(6)]
        assert http.get("/health").json()["engine"]["replica"] != before["replica"]


def _value(metrics: str, series: str) -> float:
    """The value of one series (exact name+labels) in Prometheus text; 0 when absent."""
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_value_parser_reads_exact_series():
    text = 'a_total{x="1"} 3\na_total 5\n'
    assert _value(text, "a_total") == 5 and _value(text, 'a_total{x="1"}') == 3 and _value(text, "b") == 0
