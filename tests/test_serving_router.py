"""Session affinity (serving/router.py): which engine replica a conversation's request goes to.
The decision is pure and tested here; bench/bench_serving.py measures the KV hit rate it gives
with 4 real replicas (serving/README.md)."""
from __future__ import annotations

from collections import Counter

from ctxmem.serving.router import ROUTER_PATH, home_replica, rendezvous, session_of

REPLICAS = ["r0", "r1", "r2", "r3"]
IDLE = {r: 0 for r in REPLICAS}


def test_a_conversation_has_one_home_and_conversations_spread_over_the_replicas():
    homes = {f"conv-{i}": home_replica(f"conv-{i}", REPLICAS, None, IDLE, 16) for i in range(400)}
    assert all(home_replica(s, list(reversed(REPLICAS)), None, IDLE, 16) == h for s, h in homes.items())
    spread = Counter(homes.values())
    assert set(spread) == set(REPLICAS) and min(spread.values()) > 60  # ~100 each


def test_a_replica_that_goes_moves_only_its_own_conversations():
    sessions = [f"s{i}" for i in range(300)]
    before = {s: rendezvous(s, REPLICAS) for s in sessions}
    after = {s: rendezvous(s, REPLICAS[:3]) for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == "r3"}


def test_the_remembered_replica_wins_while_it_runs():
    s = "conversation-7"
    other = next(r for r in REPLICAS if r != rendezvous(s, REPLICAS))
    assert home_replica(s, REPLICAS, other, IDLE, 16) == other  # its state is there (a fallback moved it)
    assert home_replica(s, [r for r in REPLICAS if r != other], other, IDLE, 16) == rendezvous(
        s, [r for r in REPLICAS if r != other])  # that replica died: the next rendezvous replica


def test_an_overloaded_home_is_passed_over_and_unknown_queues_do_not_count():
    s = "busy"
    home = rendezvous(s, REPLICAS)
    assert home_replica(s, REPLICAS, None, {**IDLE, home: 17}, 16) is None  # balance the load instead
    assert home_replica(s, REPLICAS, None, {**IDLE, home: 16}, 16) == home
    assert home_replica(s, REPLICAS, None, {r: None for r in REPLICAS}, 16) == home
    assert home_replica(s, [], None, {}, 16) is None


def test_the_session_is_read_from_the_engine_request():
    class Pending:
        def __init__(self, args, kwargs=None):
            self.args, self.kwargs = args, kwargs or {}

    assert session_of(Pending([{"kind": "chat", "session_id": "alice/c1"}])) == "alice/c1"
    assert session_of(Pending([{"kind": "chat"}])) is None
    assert session_of(Pending([], {"request": {"session_id": "x"}})) == "x"
    assert session_of(None) is None


def test_the_engine_deployment_routes_by_session():
    from ctxmem.serving.deployments import EngineDeployment

    config = EngineDeployment._deployment_config.request_router_config
    assert config.request_router_class == ROUTER_PATH
