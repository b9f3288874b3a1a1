"""Ray Serve's direct ingress (ServeArgs.direct_ingress, `ctxmem serve --direct-ingress`) over real HTTP:
the HTTP replica answers on a port of its own - streamed and plain completions equal to each other,
keys enforced, /health, /metrics and /admin/reload - while Serve's proxy still answers on its port; and the CLI puts
the replica on --port and Serve's proxy elsewhere."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from helpers_serving import API_KEY, AUTH, app_on_local_ray, sse_text, wait_healthy

from ctxmem.proc import default_sigint

pytestmark = pytest.mark.slow  # local Ray clusters (~1-2 min)


def test_the_cli_puts_the_replica_on_port_and_the_proxy_elsewhere(tiny_export, tmp_path):
    from ctxmem.net import free_port

    port, proxy_port = free_port(), free_port()
    argv = [str(Path(sys.executable).parent / "ctxmem"), "serve", "--model", str(tiny_export), "--direct-ingress",
            "--colocate-engine", "--port", str(port), "--proxy-port", str(proxy_port), "--engine-cpus", "0.25",
            "--api-key", API_KEY, "--session-store", f"sqlite:///{tmp_path}/sessions.sqlite", "--object-store-mb", "200"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "CTXMEM_API_KEYS")}
    log = open(tmp_path / "cli.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**env, "RAY_AUTH_MODE": "token"},
                            preexec_fn=default_sigint)  # stopped with SIGINT below
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", timeout=240, proc=proc, headers=AUTH)
        assert health["engine"]["kind"] == "onnx"
        body = {"model": health["model"], "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "stream": True}
        for url in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{proxy_port}"):  # the replica, Serve's proxy
            assert httpx.post(url + "/v1/completions", json=body, timeout=120).status_code == 401
            r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=120)
            assert r.status_code == 200 and sse_text(r.text)[1]["completion_tokens"] == 6
    except Exception:
        log.flush()
        print((tmp_path / "cli.log").read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_cli_refuses_direct_ingress_on_a_cluster_it_did_not_start(tiny_export):
    done = subprocess.run([str(Path(sys.executable).parent / "ctxmem"), "serve", "--model", str(tiny_export),
                           "--direct-ingress", "--address", "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and "--direct-ingress needs the Ray cluster this command starts" in done.stderr


def test_the_cli_says_when_no_ray_cluster_answers_at_address_instead_of_retrying_forever(tiny_export):
    from ctxmem.net import free_port

    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([str(Path(sys.executable).parent / "ctxmem"), "serve", "--model", str(tiny_export),
                           "--address", address], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode != 0
    assert f"no Ray cluster: nothing answers at {address}" in done.stderr and "ray start --head" in done.stderr


@pytest.fixture(scope="module")
def urls(tiny_export):
    """(Serve's proxy, the HTTP replica's own address) of a colocated app with direct ingress and a key."""
    from ctxmem.serving.app import direct_ingress_cluster_env

    cluster_env = direct_ingress_cluster_env()
    saved = {k: os.environ.get(k) for k in cluster_env}
    os.environ.update(cluster_env)  # before the fixture's ray.init: the local cluster inherits it
    try:
        with app_on_local_ray(tiny_export, "ctxdirect-", colocate_engine=True, direct_ingress=True,
                              api_keys=[API_KEY],
                              engine_deployment={"ray_actor_options": {"num_cpus": 0.25}}) as proxy:
            import ray
            from ray.serve.context import _get_global_client

            groups = ray.get(_get_global_client()._controller.get_target_groups.remote("ctxmem"))
            targets = [t for g in groups if str(g.protocol).endswith("HTTP") for t in g.targets]
            assert len(targets) == 1, groups
            direct = f"http://{targets[0].ip}:{targets[0].port}"
            yield proxy, direct
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_the_replica_answers_on_its_own_port_as_through_the_proxy(urls):
    proxy, direct = urls
    assert direct != proxy and direct.startswith("http://127.0.0.1:")
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    answers = {}
    for name, url in (("proxy", proxy), ("direct", direct)):
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as http:
            plain = http.post("/v1/completions", json=body)
            assert plain.status_code == 200, plain.text
            streamed = http.post("/v1/completions", json={**body, "stream": True,
                                                          "stream_options": {"include_usage": True}})
            assert streamed.status_code == 200, streamed.text
        text, usage = sse_text(streamed.text)
        assert text == plain.json()["choices"][0]["text"] and usage["completion_tokens"] == 24
        answers[name] = text
    assert answers["direct"] == answers["proxy"]


def test_keys_health_metrics_and_reload_hold_on_the_replicas_port(urls):
    _, direct = urls
    with httpx.Client(base_url=direct, timeout=120) as http:
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        chat = http.post("/v1/chat/completions", headers=AUTH, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
        assert chat.status_code == 200 and chat.text.rstrip().endswith("data: [DONE]")
        health = http.get("/health", headers=AUTH)
        metrics = http.get("/metrics", headers=AUTH)
        unknown = http.get("/v1/nothing-here", headers=AUTH)
        reload = http.post("/admin/reload", headers=AUTH)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["engine"]["scheduler"] == "running"
    assert metrics.status_code == 200 and "ctxmem_engine_replicas 1.0" in metrics.text
    completion = [float(line.split()[-1]) for line in metrics.text.splitlines()
                  if line.startswith("ctxmem_completion_tokens_total ")]
    assert completion and completion[0] >= 3, completion
    assert unknown.status_code == 404
    assert reload.status_code == 200 and [r.get("error") for r in reload.json()["replicas"]] == [None], reload.text
