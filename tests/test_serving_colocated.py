"""The engine inside the HTTP replica (ServeArgs.colocate_engine) on a real Ray Serve, two replicas,
over HTTP: one deployment ("Server"), streamed and plain answers equal to the same engine's greedy
text in this process, /metrics summing both replicas' engines, /health and /admin/reload reaching
the engines."""
from __future__ import annotations


import httpx
import pytest

from helpers_serving import app_on_local_ray, sse_text

pytestmark = pytest.mark.slow  # a Ray cluster with two Server replicas (~1 min)


@pytest.fixture(scope="module")
def cluster(tiny_export):
    with app_on_local_ray(tiny_export, "ctxcoloc-", colocate_engine=True, ingress_deployment={"num_replicas": 2},
                          engine_deployment={"ray_actor_options": {"num_cpus": 0.25}}) as url:
        yield url


def deployments() -> set[str]:
    from ray import serve

    return set(serve.status().applications["ctxmem"].deployments)


def test_one_deployment_answers_streamed_and_plain_as_the_engine_does(cluster, tiny_export):
    from ctxmem.serving.config import EngineConfig
    from ctxmem.serving.engine import Engine
    from ctxmem.serving.events import Delta

    assert deployments() == {"Server"}
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=cluster, timeout=120) as http:
        plain = http.post("/v1/completions", json=body)
        assert plain.status_code == 200, plain.text
        streamed = http.post("/v1/completions", json={**body, "stream": True})
        assert streamed.status_code == 200, streamed.text
    text, usage = sse_text(streamed.text)
    assert text == plain.json()["choices"][0]["text"] and usage["completion_tokens"] == 24

    import asyncio

    engine = Engine(EngineConfig(model=str(tiny_export)))  # the same engine, in this process
    try:
        async def collect():
            return [c async for c in engine.generate({"kind": "completion", "prompt": body["prompt"], "generation": {
                "max_new_tokens": 24, "temperature": 0.0, "stop_token_ids": []}})]
        chunks = asyncio.run(collect())
    finally:
        engine.close()
    assert text == "".join(ev.text for chunk in chunks for ev in chunk if isinstance(ev, Delta))


def test_metrics_health_and_reload_reach_every_replicas_engine(cluster):
    with httpx.Client(base_url=cluster, timeout=120) as http:
        for i in range(6):  # requests spread over both replicas
            assert http.post("/v1/completions", json={"model": "tiny", "prompt": f"r{i}", "max_tokens": 3,
                                                      "ignore_eos": True}).status_code == 200
        metrics = http.get("/metrics").text
        health = http.get("/health")
        reload = http.post("/admin/reload")
    replicas = [line for line in metrics.splitlines() if line.startswith("ctxmem_engine_replicas ")]
    assert replicas == ["ctxmem_engine_replicas 2.0"], replicas
    completion = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("ctxmem_completion_tokens_total ")]
    assert completion and completion[0] >= 18, completion  # the HTTP side's count, summed over replicas
    decoded = [line for line in metrics.splitlines() if line.startswith("ctxmem_batch_size_count ")]
    assert decoded and float(decoded[0].split()[-1]) > 0, decoded  # the engines' own series are there too
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["engine"]["scheduler"] == "running"
    assert reload.status_code == 200, reload.text
    assert len(reload.json()["replicas"]) == 2 and all("error" not in r for r in reload.json()["replicas"])
