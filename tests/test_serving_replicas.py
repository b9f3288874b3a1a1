"""Two engine replicas on a real Ray Serve, over HTTP: a conversation's turns go to the replica that
holds its KV state (serving/router.py), and when that replica's actor is killed mid-conversation the
next turn is served by the other replica from the conversation store - no turn is lost - and the
conversation sticks to its new replica."""
from __future__ import annotations

import httpx
import pytest

from helpers_serving import app_on_local_ray

pytestmark = pytest.mark.slow  # a Ray cluster with two engine replicas (~1 min)


@pytest.fixture(scope="module")
def cluster(tiny_export):
    with app_on_local_ray(tiny_export, "ctxreplicas-",
                          engine_deployment={"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
                          ingress_deployment={"ray_actor_options": {"num_cpus": 0.25}}) as url:
        yield url


def engine_actors() -> dict[str, str]:
    """replica unique id -> actor name, for the Engine replicas alive now."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "#Engine#" in a["name"]]
    alive = {}
    for name in names:
        try:
            ray.get_actor(name, namespace="serve")
        except ValueError:
            continue
        alive[name.rsplit("#", 1)[1]] = name
    return alive


def test_a_conversation_follows_its_replica_and_survives_its_death(cluster):
    import ray

    from ctxmem.serving.auth import ANONYMOUS
    from ctxmem.serving.router import rendezvous

    sid = "follows-its-replica"
    with httpx.Client(base_url=cluster, timeout=120) as http:
        def turn(i: int) -> dict:
            r = http.post(f"/v1/sessions/{sid}/messages", json={"content": f"message {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
            return r.json()

        assert http.post("/v1/sessions", json={"id": sid}).status_code == 201
        first = [turn(i) for i in range(4)]
        # every turn after the first reuses the KV state: each went to the replica that holds it
        assert [t["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for t in first] == [False, True, True, True]

        replicas = engine_actors()
        assert len(replicas) == 2
        home = rendezvous(f"{ANONYMOUS}/{sid}", sorted(replicas))
        ray.kill(ray.get_actor(replicas[home], namespace="serve"), no_restart=True)

        after = [turn(i) for i in range(4, 8)]
        assert [t["session"]["turns"] for t in after] == [5, 6, 7, 8]  # no turn lost
        cached = [t["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 for t in after]
        assert cached == [False, True, True, True], cached  # rebuilt once from the store, then it sticks
        history = http.get(f"/v1/sessions/{sid}").json()
        assert [m["content"] for m in history["messages"] if m["role"] == "user"] == [f"message {i}" for i in range(8)]
