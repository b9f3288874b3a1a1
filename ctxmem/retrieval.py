"""Memory beyond the window: the ``retrieve`` policy's bounded store of evicted KV and its selection.

The ``sink`` policy drops what leaves the window. ``retrieve`` keeps it, per stream, in a store of
at most ``store`` tokens, and before each token past the window puts the ``budget`` most relevant
evicted tokens back between the sinks and the window, at compacted positions (InfLLM, Xiao et al.
2024, training-free). bench/probe_retrieval.py chose the scoring by measurement on the
recall-trained model: one retrieval layer's queries (not an average over layers: 0.41-0.62 recall
past the window, against 0.91-0.97 for the best single layer), the softmax attention mass each
16-token block would get among all stored tokens, averaged over the stream's latest ``queries``
queries, and the best block taken together with the block after it (what followed the match).

Exact meaning (the same whatever the piecing, cached or rebuilt from history): the choice is made
at refresh points, the stream indices n >= sinks + window (once the window has moved) that are
multiples of ``every``. At a refresh point n the stored tokens (those evicted before n, within the
bound) are scored by the layer's queries of tokens n - ``queries`` .. n - 1, all against the store as
it is at n; tokens n .. next refresh - 1 read that choice. So a stream past the window is fed in
pieces that end at refresh points, and everything here is a function of the stream alone.
``every`` 1 chooses afresh before every token; larger values feed a long prompt in longer pieces
(prefill cost) and score less often (decode cost), at the price of choosing with queries up to
``every`` - 1 tokens old.

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
    every: int  # refresh points: stream indices past the window that are multiples of this
    sinks: int  # stream indices below this are sinks, never stored


class StreamStore:
    """One stream's evicted tokens (a ring of ``store`` slots) and its latest query scores.

    A token of stream index t lives in ring slot (t - sinks) % store, its block id is
    (t - sinks) // block. ``lo``/``hi``: the stored stream range [lo, hi), contiguous (evictions come
    in stream order), ``lo`` block-aligned."""

    def __init__(self, s: RetrievalSettings):
        self.s = s
        # the ring's arrays are made at the first eviction (their shapes come from the cache) and
        # double up to `store` slots (a short conversation does not pay for the bound); they only
        # wrap once full, so a slot is (t - sinks) % store throughout
        self.k = self.v = self.rk = self.ids = None  # (N, L, Hkv, D) x2, (N, Hkv, D) float32, (N,) int64
        self.lo = self.hi = s.sinks
        self.q: np.ndarray | None = None  # (queries, H, D) float32: the latest queries, slot = count % queries
        self.q_seen = 0
        self.chosen: tuple[tuple[int, int], ...] = ()  # (block id, size) put back now
        self.put: tuple[np.ndarray, ...] | None = None  # gather(chosen) as it was then: what the cache holds

    def copy(self) -> "StreamStore":
        out = StreamStore.__new__(StreamStore)
        out.__dict__.update(self.__dict__)
        for name in ("k", "v", "rk", "ids", "q"):
            if getattr(self, name) is not None:
                setattr(out, name, getattr(self, name).copy())
        return out

    @property
    def tokens(self) -> int:
        return self.hi - self.lo

    @property
    def nbytes(self) -> int:
        """Bytes held for this stream (at most the bound's: the ring grows up to `store` slots)."""
        return sum(a.nbytes for a in (self.k, self.v, self.rk, self.ids, self.q) if a is not None)

    # ---- filling -------------------------------------------------------------------------------
    def remember(self, queries: np.ndarray) -> None:
        """The retrieval layer's queries (T, H, D) of new tokens, before rotation, in stream order."""
        Q = self.s.queries
        if self.q is None:
            self.q = np.zeros((Q, *queries.shape[1:]), np.float32)
        T = len(queries)
        kept = queries[-Q:]  # (T', H, D): older ones would be overwritten anyway
        self.q[(self.q_seen + T - len(kept) + np.arange(len(kept))) % Q] = kept  # token i's slot: its count % Q
        self.q_seen += T

    def _grow(self, slots: int, like_k: np.ndarray) -> None:
        """Room for `slots` ring slots (at most `store`), doubling; like_k (n, L, Hkv, D) gives shapes."""
        have = 0 if self.ids is None else len(self.ids)
        if slots <= have:
            return
        n = min(self.s.store, max(slots, 2 * have, 4 * self.s.block))
        shapes = {"k": (like_k.shape[1:], like_k.dtype), "v": (like_k.shape[1:], like_k.dtype),
                  "rk": (like_k.shape[2:], np.float32), "ids": ((), np.int64)}
        for name, (shape, dtype) in shapes.items():
            new = np.zeros((n, *shape), dtype)
            if have:
                new[:have] = getattr(self, name)
            setattr(self, name, new)

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
            self._grow(self.hi + n - s.sinks, k)
            while self.hi + n - self.lo > s.store:  # drop the oldest whole block
                self.lo += s.block
            slots = (stream[part] - s.sinks) % s.store
            self.k[slots], self.v[slots], self.ids[slots] = k[part], v[part], ids[part]
            self.rk[slots] = k[part][:, s.layer]
            self.hi += n

    # ---- choosing ------------------------------------------------------------------------------
    def block_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored block ids (nb,), oldest first, and each one's attention mass (nb,): softmax over every
        stored token per query head and remembered query, averaged over both, summed per block."""
        s = self.s
        n = self.tokens
        first = (self.lo - s.sinks) % s.store  # ring slot of the oldest stored token (block-aligned)
        keys = self.rk[first:first + n] if first + n <= len(self.rk) else \
            np.concatenate((self.rk[first:], self.rk[:first + n - s.store]))  # (n, Hkv, D), stream order
        q = self.q[:min(self.q_seen, s.queries)]  # (Q', H, D)
        Qn, H, D = q.shape
        Hkv = keys.shape[1]
        # query head h reads kv head h // rep: (Hkv, rep * Q', D) against (Hkv, D, n)
        q = q.reshape(Qn, Hkv, H // Hkv, D).transpose(1, 2, 0, 3).reshape(Hkv, -1, D)
        # einsum, not matmul: these products are small, and a threaded BLAS spinning for them on a
        # busy machine measured 38 ms a call against ~1 ms in one thread
        scores = np.einsum("gqd,ngd->gqn", q, keys) * np.float32(1.0 / np.sqrt(D))  # (Hkv, rep * Q', n)
        scores -= scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w /= w.sum(axis=-1, keepdims=True)
        per_token = w.reshape(-1, n).mean(axis=0)  # (n,)
        sums = np.add.reduceat(per_token, np.arange(0, n, s.block))  # (nb,)
        return (self.lo - s.sinks) // s.block + np.arange(len(sums)), sums

    def choose(self) -> tuple[tuple[int, int], ...]:
        """The blocks to put back, as (block id, tokens stored of it): the best-scored block, the one
        after it, the one before it, then the next best ..., each whole, while they fit the budget;
        sorted. Ties go to the older block."""
        s = self.s
        if self.tokens == 0 or self.q_seen == 0 or s.budget == 0:
            return ()
        ids, score = self.block_scores()
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

    def gather(self, chosen: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The stored tokens of ``chosen`` blocks: stream indices (n,), k, v (n, L, Hkv, D) and token
        ids (n,), in stream order."""
        s = self.s
        blocks = [b for b, _ in chosen]
        t = np.concatenate([np.arange(max(s.sinks + b * s.block, self.lo), min(s.sinks + (b + 1) * s.block, self.hi))
                            for b in blocks]) if blocks else np.zeros(0, np.int64)
        slots = (t - s.sinks) % s.store
        return t.astype(np.int64), self.k[slots], self.v[slots], self.ids[slots]
