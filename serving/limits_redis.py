"""Per-key rates counted in Redis, so every ingress replica on every node shares one count per key.

Used when the conversation store is Redis (the same server, the same key prefix):

    {prefix}r:{name}   sorted set: one member per admitted request, scored by its time (ms)
    {prefix}t:{name}   sorted set: one member "TOKENS:id" per finished request, scored by its time (ms)

The check and the count are one Lua script (atomic), on Redis' own clock, so replicas with drifting
clocks agree. The rules and messages are those of limits.RateLimiter. Should Redis fail, the request
is let through and the failure logged: a limiter outage must not take the API down with it.
"""
from __future__ import annotations

import logging
import uuid

import redis

from .auth import Principal
from .limits import WINDOW_S, too_many

log = logging.getLogger("ctxmem.serving.limits")
WINDOW_MS = int(WINDOW_S * 1000)

# KEYS: requests set, tokens set. ARGV: rpm (-1 = none), tpm (-1 = none), window ms, member.
# Returns {0} when admitted, {1, wait_ms} over the request rate, {2, wait_ms, used} over the token rate.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if rpm >= 0 then
  local n = redis.call('ZCARD', KEYS[1])
  if n >= rpm then
    local e = redis.call('ZRANGE', KEYS[1], n - rpm, n - rpm, 'WITHSCORES')
    return {1, tonumber(e[2]) + window - now}
  end
end
if tpm >= 0 then
  local all = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #all, 2 do used = used + tonumber(string.match(all[i], '^(%d+):')) end
  if used >= tpm then
    local freed, wait = used, 0
    for i = 1, #all, 2 do
      freed = freed - tonumber(string.match(all[i], '^(%d+):'))
      wait = tonumber(all[i + 1]) + window - now
      if freed < tpm then break end
    end
    return {2, wait, used}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {0}
"""

_CHARGE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, prefix: str):
        self.prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._charge = client.register_script(_CHARGE)

    def admit(self, who: Principal) -> None:
        limits = who.limits
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        if rpm is None and tpm is None:
            return
        keys = [f"{self.prefix}r:{who.name}", f"{self.prefix}t:{who.name}"]
        try:
            result = self._admit(keys=keys, args=[-1 if rpm is None else rpm, -1 if tpm is None else tpm,
                                                  WINDOW_MS, uuid.uuid4().hex])
        except redis.RedisError as err:
            log.error("rate limits not checked (Redis: %s)", err)
            return
        if result[0] == 1:
            raise too_many(f"the key {who.name!r} is over its limit of {rpm} requests per minute", result[1] / 1000)
        if result[0] == 2:
            raise too_many(f"the key {who.name!r} used {result[2]} tokens in the last minute; its limit is "
                           f"{tpm} tokens per minute", result[1] / 1000)

    def charge(self, who: Principal, tokens: int) -> None:
        if who.limits.tokens_per_minute is None or tokens <= 0:
            return
        try:
            self._charge(keys=[f"{self.prefix}t:{who.name}"], args=[f"{tokens}:{uuid.uuid4().hex}", WINDOW_MS])
        except redis.RedisError as err:
            log.error("tokens not charged (Redis: %s)", err)
