"""Memory beyond the window: the ``retrieve`` policy's bounded store of evicted KV and its selection.

The ``sink`` policy drops what leaves the window. ``retrieve`` keeps it, per stream, in a store of
at most ``store`` tokens, and before each token past the window puts the ``budget`` most relevant
evicted tokens back between the sinks and the window, at compacted positions (InfLLM, Xiao et al.
2024, training-free). bench/probe_retrieval.py chose the scoring by measurement on the
recall-trained model: one retrieval layer's queries (not an average over layers: 0.41-0.62 recall
past the window, against 0.91-0.97 for the best single layer), the softmax attention mass each
16-token block would get among all stored tokens, averaged over the stream's latest ``queries``
queries, and the best block taken together with the block after it (what followed the match).

Exact meaning (the same whatever the piecing, cached or rebuilt from history): token n's retrieved
set is chosen from the tokens evicted before n (those the sink rule no longer shows n), by the
layer's queries of tokens n - ``queries`` .. n - 1, each query scored against the store as it was
right after its own token. So a stream past the window is fed token by token, and everything here
is a function of the stream alone.

Bound: a ring of ``store`` tokens (a multiple of ``block``); when it is full the oldest whole block
is dropped (first in, first out: a conversation's oldest turns go first). Keys and values are kept
for every layer, before rotation (position-free), in the cache's dtype:
``store x layers x 2 x kv_heads x head_dim x itemsize`` bytes per stream.

Shapes: L layers, Hkv key/value heads, H query heads, D head dim, N = ``store`` ring slots,
NB = N / block ring blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class RetrievalSettings:
    """What the ``retrieve`` policy needs besides sinks and window (resolved: every field set)."""

    budget: int  # tokens re-inserted at most (whole blocks)
    block: int  # tokens per block; blocks are a grid over stream indices from the first non-sink token
    store: int  # tokens kept per stream at most, a multiple of block
    layer: int  # the layer whose queries and keys score the blocks
    queries: int  # latest queries averaged
    sinks: int  # stream indices below this are sinks, never stored


class StreamStore:
    """One stream's evicted tokens (a ring of ``store`` slots) and its latest query scores.

    A token of stream index t lives in ring slot (t - sinks) % store, its block id is
    (t - sinks) // block. ``lo``/``hi``: the stored stream range [lo, hi), contiguous (evictions come
    in stream order), ``lo`` block-aligned."""

    def __init__(self, s: RetrievalSettings, layers: int, kv_heads: int, head_dim: int, dtype):
        self.s = s
        # the ring's arrays start small and double up to `store` slots (a short conversation does not
        # pay for the bound); they only wrap once full, so a slot is (t - sinks) % store throughout
        n = min(s.store, 4 * s.block)
        self.k = np.zeros((n, layers, kv_heads, head_dim), dtype)  # (N, L, Hkv, D) keys before rotation
        self.v = np.zeros((n, layers, kv_heads, head_dim), dtype)
        self.rk = np.zeros((n, kv_heads, head_dim), np.float32)  # (N, Hkv, D) the retrieval layer's, contiguous
        self.ids = np.zeros(n, np.int64)  # (N,) token ids, to show what was put back
        self.lo = self.hi = s.sinks
        # the latest `queries` queries' attention mass per ring block (Q, NB), and the block id each
        # mass was computed for (Q, NB; -1 none), so a ring block reused by a newer block does not
        # inherit an old block's mass; row `seen % Q` is the next to be written
        nb = s.store // s.block
        self.mass = np.zeros((s.queries, nb))
        self.stamp = np.full((s.queries, nb), -1, np.int64)
        self.seen = 0
        self.chosen: tuple[tuple[int, int], ...] = ()  # (block id, size) re-inserted now

    def copy(self) -> "StreamStore":
        out = StreamStore.__new__(StreamStore)
        out.__dict__.update(self.__dict__)
        for name in ("k", "v", "rk", "ids", "mass", "stamp"):
            setattr(out, name, getattr(self, name).copy())
        return out

    @property
    def tokens(self) -> int:
        return self.hi - self.lo

    def _grow(self, slots: int) -> None:
        """Room for `slots` ring slots (at most `store`), doubling."""
        have = len(self.ids)
        if slots <= have:
            return
        n = min(self.s.store, max(slots, 2 * have))
        for name in ("k", "v", "rk", "ids"):
            old = getattr(self, name)
            new = np.zeros((n, *old.shape[1:]), old.dtype)
            new[:have] = old
            setattr(self, name, new)

    @property
    def nbytes(self) -> int:
        """Bytes held for this stream (at most the bound's: the ring grows up to `store` slots)."""
        return self.k.nbytes + self.v.nbytes + self.rk.nbytes + self.ids.nbytes + self.mass.nbytes + self.stamp.nbytes

    # ---- filling -------------------------------------------------------------------------------
    def add(self, stream: np.ndarray, k: np.ndarray, v: np.ndarray, ids: np.ndarray) -> None:
        """stream (n,) consecutive stream indices starting at ``hi``; k, v (n, L, Hkv, D) before
        rotation; ids (n,) their tokens."""
        s = self.s
        if len(stream) == 0:
            return
        if int(stream[0]) != self.hi or (np.diff(stream) != 1).any():
            raise ValueError(f"evicted tokens must arrive in stream order: expected {self.hi}, got {stream[:4]}...")
        for start in range(0, len(stream), s.store):  # more than the ring at once: only the last ring survives
            part = slice(start, start + s.store)
            n = len(stream[part])
            self._grow(self.hi + n - s.sinks)
            while self.hi + n - self.lo > s.store:  # drop the oldest whole block
                self.lo += s.block
            slots = (stream[part] - s.sinks) % s.store
            self.k[slots], self.v[slots], self.ids[slots] = k[part], v[part], ids[part]
            self.rk[slots] = k[part][:, s.layer]
            self.hi += n

    def observe(self, query: np.ndarray) -> None:
        """One new token's retrieval-layer query (H, D), before rotation: its attention mass per stored
        block (softmax over every stored token, per head, averaged over heads) joins the latest scores."""
        s = self.s
        n = self.tokens
        if n == 0:
            return
        H, D = query.shape
        first = (self.lo - s.sinks) % s.store  # ring slot of the oldest stored token (block-aligned)
        keys = self.rk[first:first + n] if first + n <= s.store else \
            np.concatenate((self.rk[first:], self.rk[:first + n - s.store]))  # (n, Hkv, D), stream order
        Hkv = keys.shape[1]
        q = query.astype(np.float32, copy=False).reshape(Hkv, H // Hkv, D)  # query head h reads kv head h // rep
        scores = np.matmul(q, keys.transpose(1, 2, 0)) * (1.0 / np.sqrt(D))  # (Hkv, rep, n)
        scores -= scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w /= w.sum(axis=-1, keepdims=True)
        per_token = w.reshape(H, n).mean(axis=0)  # (n,)
        sums = np.add.reduceat(per_token, np.arange(0, n, s.block))  # (blocks,) oldest first
        blocks = (self.lo - s.sinks) // s.block + np.arange(len(sums))
        row = self.seen % s.queries
        nb = s.store // s.block
        self.mass[row] = 0.0
        self.stamp[row] = -1
        self.mass[row, blocks % nb] = sums
        self.stamp[row, blocks % nb] = blocks
        self.seen += 1

    # ---- choosing ------------------------------------------------------------------------------
    def choose(self) -> tuple[tuple[int, int], ...]:
        """The blocks to re-insert, as (block id, tokens stored of it): the best-scored block, the one
        after it, the one before it, then the next best ..., each whole, while they fit the budget;
        sorted. Ties go to the older block. Nothing before any query has scored the store."""
        s = self.s
        if self.tokens == 0 or self.seen == 0 or s.budget == 0:
            return ()
        first, last = (self.lo - s.sinks) // s.block, (self.hi - 1 - s.sinks) // s.block
        ids = np.arange(first, last + 1)  # stored block ids, oldest first
        ring = ids % (s.store // s.block)
        score = np.where(self.stamp[:, ring] == ids, self.mass[:, ring], 0.0).sum(axis=0)  # (blocks,)
        starts = np.maximum(s.sinks + ids * s.block, self.lo)
        sizes = np.minimum(s.sinks + (ids + 1) * s.block, self.hi) - starts
        chosen: dict[int, int] = {}
        used = 0
        for best in np.argsort(-score, kind="stable"):
            for i in (best, best + 1, best - 1):
                if 0 <= i < len(ids) and int(ids[i]) not in chosen and used + sizes[i] <= s.budget:
                    chosen[int(ids[i])] = int(sizes[i])
                    used += int(sizes[i])
            if used + s.block > s.budget and used:
                break
        # with each block's size: a block still filling is a different choice once it has grown
        return tuple(sorted(chosen.items()))

    def block_size(self, block: int) -> int:
        a = max(self.s.sinks + block * self.s.block, self.lo)
        return max(0, min(self.s.sinks + (block + 1) * self.s.block, self.hi) - a)

    def gather(self, chosen: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The stored tokens of ``chosen`` blocks: stream indices (n,), k, v (n, L, Hkv, D) and token
        ids (n,), in stream order."""
        s = self.s
        blocks = [b for b, _ in chosen]
        t = np.concatenate([np.arange(max(s.sinks + b * s.block, self.lo), min(s.sinks + (b + 1) * s.block, self.hi))
                            for b in blocks]) if blocks else np.zeros(0, np.int64)
        slots = (t - s.sinks) % s.store
        return t.astype(np.int64), self.k[slots], self.v[slots], self.ids[slots]
