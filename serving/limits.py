"""Per-key rate limits (requests/min, tokens/min) and the server's limits on per-request memory knobs.

Rates are sliding 60-second windows. Here they are kept in this ingress replica's memory, so with K
ingress replicas a key may get up to K times its rate; with the Redis store, limits_redis.py keeps
them in Redis instead, one count per key for every replica. Tokens are charged when a request finishes (prompt +
completion, as `usage` reports them); a key over its tokens/min is refused until enough of its
recent tokens leave the window, so one long request may overshoot the budget once.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable

from .auth import Principal
from .config import RequestMemory
from .errors import APIError, bad_request

WINDOW_S = 60.0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._requests: dict[str, deque[float]] = {}
        self._tokens: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def admit(self, who: Principal) -> None:
        """Count a request against `who`, or a 429 with Retry-After (seconds) when over a limit."""
        limits = who.limits
        if limits.requests_per_minute is None and limits.tokens_per_minute is None:
            return
        with self._lock:
            now = self.clock()
            start = now - WINDOW_S
            reqs = self._requests.setdefault(who.name, deque())
            while reqs and reqs[0] <= start:
                reqs.popleft()
            toks = self._tokens.setdefault(who.name, deque())
            while toks and toks[0][0] <= start:
                toks.popleft()
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            if rpm is not None and len(reqs) >= rpm:
                wait = reqs[len(reqs) - rpm] + WINDOW_S - now  # when the request that fills the window leaves
                raise too_many(f"the key {who.name!r} is over its limit of {rpm} requests per minute", wait)
            used = sum(n for _, n in toks)
            if tpm is not None and used >= tpm:
                freed, wait = used, 0.0
                for t, n in toks:  # the oldest tokens leave first
                    freed -= n
                    wait = t + WINDOW_S - now
                    if freed < tpm:
                        break
                raise too_many(f"the key {who.name!r} used {used} tokens in the last minute; its limit is "
                                f"{tpm} tokens per minute", wait)
            reqs.append(now)

    def charge(self, who: Principal, tokens: int) -> None:
        if who.limits.tokens_per_minute is None or tokens <= 0:
            return
        with self._lock:
            self._tokens.setdefault(who.name, deque()).append((self.clock(), tokens))


def too_many(message: str, wait: float) -> APIError:
    seconds = max(1, math.ceil(wait))
    return APIError(429, f"{message}; retry after {seconds} s", code="rate_limit_exceeded",
                    headers={"Retry-After": str(seconds)})


def outside(memory: dict[str, Any] | None, allowed: RequestMemory) -> list[str]:
    """The knobs of a request's policy/window/sinks/budget that are not in the server's allowed set."""
    rules = {"policy": allowed.policies, "window": allowed.windows, "sinks": allowed.sinks, "budget": allowed.budgets}
    return [k for k, v in (memory or {}).items() if k in rules and v not in rules[k]]


def check_memory(memory: dict[str, Any] | None, allowed: RequestMemory, own: dict[str, Any] | None = None) -> None:
    """A 400 naming the allowed values when a request's policy/window/sinks/budget is not in the server's set.
    A value equal to the server's own setting (`own`, the engine's memory policy) is always allowed:
    restating it changes nothing."""
    own = own or {}
    rules = (("policy", allowed.policies), ("window", allowed.windows), ("sinks", allowed.sinks),
             ("budget", allowed.budgets))
    for param, values in rules:
        if param in (memory or {}) and memory[param] not in values and memory[param] != own.get(param):
            if values:
                what = f"send one of {sorted(values)} or leave it out"
            else:
                what = "leave it out (the server's memory policy applies)"
            raise bad_request(f"{param}={memory[param]!r} is not allowed on this server; {what}",
                              param=param, code="not_allowed")
