"""Conversation KV reuse: an engine replica keeps the KV state of recent conversations, so a turn
that extends one prefills only its new tokens.

`SessionCache` is a bounded LRU of `CachedConversation`s; `reuse` advances a cached state to the
longest common prefix with a new prompt (`rewind`ing what diverged, as long as those tokens are still
in the window). The cache is an accelerator only: a miss rebuilds the state from the prompt.

Under `retrieve` a state also carries its conversation's store of evicted KV (ctxmem.retrieval); the
LRU counts its bytes with the cache's. The store and every choice made from it are a function of the
token stream alone, so a conversation rebuilt from its history - on another replica, or after its
state left this LRU - has the same store and gives the same replies. A retrieve state cannot be
rewound (`ContextMemory.rewind` refuses: its store and query scores moved with those tokens): `reuse`
then rebuilds instead.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctxmem.memory import ContextMemory, MemoryConfig, MemoryState


def past_nbytes(past: Any) -> int:
    if past is None:
        return 0
    return int(sum(k.nbytes + v.nbytes for k, v in past))  # numpy arrays and torch tensors alike


def store_nbytes(state: MemoryState) -> int:
    """Bytes of a state's retrieve stores (ctxmem.retrieval: each a fixed ring, allocated whole)."""
    return int(sum(s.nbytes for s in state.stores or () if s is not None))


def state_nbytes(state: MemoryState) -> int:
    """What keeping a conversation's state costs: its KV cache and, under retrieve, its store."""
    return past_nbytes(state.past) + store_nbytes(state)


@dataclass
class CachedConversation:
    version: str  # the model it was computed with
    memory: MemoryConfig
    history: list[int]  # every token fed into `state`, in order
    state: MemoryState  # batch of 1
    nbytes: int  # state_nbytes(state): its KV cache and its retrieve store
    store_nbytes: int = 0  # of which the retrieve store (store_nbytes(state))


class SessionCache:
    """LRU of conversation states, bounded in entries and bytes. `take` removes the entry: one
    request owns a state at a time, and puts it back (extended) when it finishes."""

    def __init__(self, max_bytes: int, max_entries: int):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._items: OrderedDict[str, CachedConversation] = OrderedDict()
        self.nbytes = 0
        self.store_bytes = 0  # of nbytes, the retrieve stores'
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, sid: str) -> CachedConversation | None:
        with self._lock:
            item = self._items.pop(sid, None)
            if item is not None:
                self._count(item, -1)
            return item

    def put(self, sid: str, item: CachedConversation) -> None:
        with self._lock:
            old = self._items.pop(sid, None)
            if old is not None:
                self._count(old, -1)
            if item.nbytes > self.max_bytes or self.max_entries == 0:
                return
            self._items[sid] = item
            self._count(item, 1)
            while self._items and (self.nbytes > self.max_bytes or len(self._items) > self.max_entries):
                _, dropped = self._items.popitem(last=False)
                self._count(dropped, -1)

    def _count(self, item: CachedConversation, sign: int) -> None:
        self.nbytes += sign * item.nbytes
        self.store_bytes += sign * item.store_nbytes

    def drop_version(self, version: str) -> int:
        """Forget the states computed with model `version` (swapped out); returns how many went."""
        with self._lock:
            stale = [sid for sid, item in self._items.items() if item.version == version]
            for sid in stale:
                self._count(self._items.pop(sid), -1)
            return len(stale)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = self.store_bytes = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def rewind(memory: ContextMemory, state: MemoryState, n: int) -> MemoryState | None:
    """Forget the last n tokens of a one-row state (ContextMemory.rewind), or None where it refuses (a
    retrieve stream). The caller checks they are still in the cache - the sink window only ever evicts
    from the middle."""
    try:
        return memory.rewind(state, n)
    except ValueError:
        return None


def reuse(entry: CachedConversation, prompt: list[int], memory: ContextMemory) -> tuple[MemoryState, int] | None:
    """The cached state advanced to the longest common prefix with `prompt`, and that prefix's length;
    None when nothing can be reused. At least one prompt token is always left to feed (its logits start
    the reply), so a repeated prompt rewinds one token."""
    state, history = entry.state, entry.history
    # the state also holds the model's stream prefix (sink token, BOS), which ContextMemory put first
    if int(state.seen[0]) != len(history) + len(memory.prefix_for(history)):
        return None  # bookkeeping mismatch: never guess, rebuild
    p = min(common_prefix(history, prompt), len(prompt) - 1)
    if p <= 0:
        return None
    back = len(history) - p
    if back:
        kept = int(state.lengths()[0])
        evicted = int(state.seen[0]) > kept
        # with evictions the cache holds [sinks | recent tail]; only the tail can be rewound
        protected = memory.config.sinks if evicted and memory.config.policy in ("sink", "retrieve") else 0
        if back > kept - protected:
            return None
        state = rewind(memory, state, back)
        if state is None:
            return None  # rewinding refused: rebuild from the prompt (the same result, slower)
    return state, p
