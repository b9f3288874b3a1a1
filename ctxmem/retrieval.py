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
        self.k = np.zeros((s.store, layers, kv_heads, head_dim), dtype)  # (N, L, Hkv, D) keys before rotation
        self.v = np.zeros((s.store, layers, kv_heads, head_dim), dtype)
        self.ids = np.zeros(s.store, np.int64)  # (N,) token ids, to show what was put back
        self.lo = self.hi = s.sinks
        # per recent query: the attention mass of each ring block (NB,) and the block ids it was
        # computed for (NB,), so a ring block reused by a newer block does not inherit old mass
        self.masses: list[tuple[np.ndarray, np.ndarray]] = []
        self.chosen: tuple[tuple[int, int], ...] = ()  # (block id, size) re-inserted now

    def copy(self) -> "StreamStore":
        out = StreamStore.__new__(StreamStore)
        out.s, out.k, out.v, out.ids, out.lo, out.hi = self.s, self.k.copy(), self.v.copy(), self.ids.copy(), \
            self.lo, self.hi
        out.masses, out.chosen = list(self.masses), self.chosen  # the mass arrays are never written in place
        return out

    @property
    def tokens(self) -> int:
        return self.hi - self.lo

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

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
            while self.hi + n - self.lo > s.store:  # drop the oldest whole block
                self.lo += s.block
            slots = (stream[part] - s.sinks) % s.store
            self.k[slots], self.v[slots], self.ids[slots] = k[part], v[part], ids[part]
            self.hi += n

    def observe(self, query: np.ndarray) -> None:
        """One new token's retrieval-layer query (H, D), before rotation: its attention mass per stored
        block (softmax over every stored token, per head, averaged over heads) joins the latest scores."""
        s = self.s
        if self.tokens == 0:
            return
        H, D = query.shape
        slots, blocks = self.slot_range()
        keys = self.k[slots, s.layer].astype(np.float32)  # (n, Hkv, D)
        rep = H // keys.shape[1]
        q = query.astype(np.float32).reshape(keys.shape[1], rep, D)  # query head h reads kv head h // rep
        scores = np.einsum("grd,ngd->grn", q, keys) / np.sqrt(D)  # (Hkv, rep, n)
        scores -= scores.max(axis=-1, keepdims=True)
        w = np.exp(scores)
        w /= w.sum(axis=-1, keepdims=True)
        per_token = w.mean(axis=(0, 1))  # (n,)
        nb = s.store // s.block
        mass = np.zeros(nb, np.float64)
        np.add.at(mass, blocks % nb, per_token)
        ids = np.full(nb, -1, np.int64)
        ids[blocks % nb] = blocks
        self.masses.append((mass, ids))
        del self.masses[:-s.queries]

    # ---- choosing ------------------------------------------------------------------------------
    def slot_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Ring slots (n,) of the stored tokens in stream order, and each token's block id (n,)."""
        t = np.arange(self.lo, self.hi)
        return (t - self.s.sinks) % self.s.store, (t - self.s.sinks) // self.s.block

    def choose(self) -> tuple[tuple[int, int], ...]:
        """The blocks to re-insert, as (block id, tokens stored of it): the best-scored block, the one after it, the one before it, then
        the next best ..., each whole, while they fit the budget; sorted. Ties go to the older block."""
        s = self.s
        if self.tokens == 0 or not self.masses or s.budget == 0:
            return ()
        first, last = (self.lo - s.sinks) // s.block, (self.hi - 1 - s.sinks) // s.block
        ids = np.arange(first, last + 1)  # (nb,) stored block ids, oldest first
        nb = s.store // s.block
        score = np.zeros(len(ids))
        for mass, stamp in self.masses:
            here = stamp[ids % nb] == ids
            score += np.where(here, mass[ids % nb], 0.0)
        sizes = np.array([self.block_size(int(b)) for b in ids])
        chosen: list[int] = []
        used = 0
        for best in np.argsort(-score, kind="stable"):
            for i in (best, best + 1, best - 1):
                if 0 <= i < len(ids) and int(ids[i]) not in chosen and used + sizes[i] <= s.budget:
                    chosen.append(int(ids[i]))
                    used += int(sizes[i])
            if used + s.block > s.budget and used:
                break
        # with each block's size: a block still filling is a different choice once it has grown
        return tuple((b, self.block_size(b)) for b in sorted(chosen))

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
