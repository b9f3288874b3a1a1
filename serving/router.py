"""Sessions follow their replica: a Ray Serve request router for the Engine deployment.

An engine replica keeps the KV state of the conversations it served (`kv_reuse.SessionCache`), so a
turn that reaches the same replica prefills only its new tokens. Serve's default router (power of two
choices) sends a conversation's turns to any replica: with N replicas about 1 turn in N hits. This
router sends a request that names a conversation (`session_id` in the request dict the ingress passes
to `Engine.generate`) to its *home* replica:

* the replica this router last sent the conversation to, while that replica is still running, else
* the conversation's rendezvous-hash replica (highest `hash(session, replica)`): every ingress replica
  picks the same one without sharing state, and when a replica comes or goes only its own
  conversations move;

as long as the home is not overloaded: its queue (Serve's cached count of requests in flight) is more
than `imbalance` above the least busy replica's, or it rejects the request (at `max_ongoing_requests`)
- then the request falls back to the power of two choices among the others, and the conversation's
home moves to where it went (its state is built there). A dead replica leaves the candidate set, so
its conversations move to their next rendezvous replica and rebuild their state from the request (the
KV cache is an accelerator only; correctness never depends on routing). Requests without a session
use the power of two choices.

`home_replica` is the decision, pure and tested alone; `SessionAffinityRouter` wires it into Serve
(`RequestRouterConfig(request_router_class=...)`, set on the Engine deployment in `deployments.py`).
"""
from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from typing import Any, Mapping, Sequence

from ray.serve.request_router import (FIFOMixin, LocalityMixin, MultiplexMixin, PendingRequest, ReplicaID,
                                      RequestRouter, RunningReplica)

ROUTER_PATH = "ctxmem.serving.router.SessionAffinityRouter"  # for RequestRouterConfig / YAML
MAX_HOMES = 1 << 16  # conversations whose last replica one router remembers (LRU)


def rendezvous(session: str, replicas: Sequence[str]) -> str:
    """The replica with the highest hash of (session, replica): stable while that replica lives."""
    def score(replica: str) -> bytes:
        return hashlib.blake2b(f"{session}\0{replica}".encode(), digest_size=8).digest()
    return max(replicas, key=score)


def home_replica(session: str, replicas: Sequence[str], remembered: str | None,
                 queue: Mapping[str, int | None], imbalance: int) -> str | None:
    """Where `session`'s request should go: its remembered replica if still running, else its
    rendezvous replica - or None when that replica is overloaded (its known queue more than
    `imbalance` above the least busy known queue), meaning: balance the load instead."""
    if not replicas:
        return None
    home = remembered if remembered in replicas else rendezvous(session, replicas)
    known = [q for q in queue.values() if q is not None]
    mine = queue.get(home)
    if mine is not None and known and mine - min(known) > imbalance:
        return None
    return home


def session_of(pending: PendingRequest | None) -> str | None:
    """The conversation a routed `Engine.generate(request)` call names, if any."""
    if pending is None:
        return None
    request: Any = pending.args[0] if pending.args else pending.kwargs.get("request")
    sid = request.get("session_id") if isinstance(request, dict) else None
    return sid if isinstance(sid, str) and sid else None


class SessionAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Sends a conversation's requests to the replica holding its KV state (see the module docstring).
    `request_router_kwargs`: `imbalance` (default 16 requests in flight)."""

    def initialize_state(self, imbalance: int = 16) -> None:  # Serve calls it with request_router_kwargs
        self._imbalance = int(imbalance)
        self._homes: OrderedDict[str, str] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        others = random.sample(candidate_replicas, min(2, len(candidate_replicas)))  # power of two choices
        sid = session_of(pending_request)
        if sid is None or not candidate_replicas:
            return [others]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queue = {rid: cache.get(r.replica_id) for rid, r in by_id.items()}
        home = home_replica(sid, list(by_id), self._homes.get(sid), queue, self._imbalance)
        if home is None:
            return [others]
        rest = [r for r in others if r.replica_id.unique_id != home]
        return [[by_id[home]], rest] if rest else [[by_id[home]]]  # the home rejects (full): the others

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        sid = session_of(pending_request)
        if sid is None:
            return
        self._homes[sid] = replica_id.unique_id
        self._homes.move_to_end(sid)
        while len(self._homes) > MAX_HOMES:
            self._homes.popitem(last=False)
