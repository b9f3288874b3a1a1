"""Which cached slots each new token reads, and at which rotary positions: the memory's meaning.

Under the ``sink`` policy (``sinks`` S0, ``window`` W) token n of a stream attends to the first S0
tokens of its stream and the W most recent tokens up to and including itself, with positions given
by rank within that visible set (StreamingLLM, Xiao et al. 2023, section 3.2). Every path - token by
token, a prompt fed in pieces of any size, left-padded batch rows, a cached session or a rebuild
from the whole history, PyTorch or ONNX Runtime - computes exactly this, because every path builds
its attention from this one function.

With rotary positions a score depends only on the distance between the query's and the key's
rotation positions. Inside the visible set of token n (rank of n = min(n, S0 + W - 1)):
  * an ordinary key j (stream index >= S0) sits at distance n - j, its true distance, so query and
    key are both rotated at their stream index minus a per-row base. The base keeps the angles as
    small as decoding has them (the row's last new token lands on rank min(n, S0 + W - 1)), so a long
    stream never evaluates rotary angles at large positions (fp32 angle error grows with position);
  * a sink key j (< S0) sits at distance min(n, S0 + W - 1) - j, which differs from query to query
    when a piece holds many: for these keys the query is rotated a second time, at min(n, S0 + W - 1)
    (``sink_positions``), and the key at j. Token by token (one query, the common case) both query
    positions coincide and the layout says so (``sink_positions`` None), so decoding pays nothing.
``recompute`` and ``full`` have no band: positions are ranks in the cache, reads are causal.

Shapes: B rows, S slots (cached + new), T new tokens (the last T slots).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class AttentionLayout:
    """What a backend needs besides the ids and the cache; numpy, built per forward."""

    positions: np.ndarray  # (B, T) int64: query rotation positions (against ordinary keys)
    # (B, S) int64: key rotation positions; None in a decode layout built for a backend that stores
    # keys already rotated and so never reads them (build_decode_layout's key_positions=False)
    key_positions: np.ndarray | None
    allowed: np.ndarray  # (B, T, S) bool: new token i may read slot j
    sink_positions: np.ndarray | None = None  # (B, T) int64: query rotation positions against sink keys
    sink_keys: np.ndarray | None = None  # (B, S) bool: the slots scored with sink_positions
    valid: np.ndarray | None = None  # (B, S) bool: the slots the memory holds (for checks; not a graph input)
    # Where each slot sits in its stream, for a backend that stores keys already rotated (export
    # contract v3): a key rotated once at its stream index minus a per-row frame offset keeps every
    # distance to an ordinary key, whatever the base above does later. Not graph inputs.
    stream: np.ndarray | None = None  # (B, S) int64: each slot's stream index (its rank without a band)
    sink_slots: np.ndarray | None = None  # (B, S) bool: valid slots holding a sink token (sink policy)

    def trimmed(self) -> "AttentionLayout":
        """sink_keys cut to the slots up to the last sink (B, S'), S' <= S: sinks are a stream's first
        tokens, so they sit in the first few slots and an eager backend scores only those twice."""
        if self.sink_keys is None:
            return self
        span = int(np.flatnonzero(self.sink_keys.any(axis=0)).max(initial=-1)) + 1
        return AttentionLayout(self.positions, self.key_positions, self.allowed, self.sink_positions,
                               self.sink_keys[:, :max(span, 1)], self.valid, self.stream, self.sink_slots)

    def with_sinks(self) -> "AttentionLayout":
        """The same layout with the sink inputs always present (a graph with fixed inputs needs them)."""
        if self.sink_positions is not None:
            return self
        return AttentionLayout(self.positions, self.key_positions, self.allowed, self.positions,
                               np.zeros(self.allowed.shape[::2], dtype=bool), self.valid, self.stream, self.sink_slots)


def build_layout(stream_pos: np.ndarray, valid: np.ndarray, n_new: int, sinks: int = 0,
                 window: int | None = None, pinned: np.ndarray | None = None) -> AttentionLayout:
    """stream_pos (B, S) int64: each slot's index in its stream (the rank in the cache for policies
    without a band); valid (B, S) bool; the last ``n_new`` slots are the new tokens. ``window``
    None = no band (causal over everything valid). ``pinned`` (B, S) int64 (``retrieve``): the
    compacted position of each evicted slot put back between the sinks and the window (sinks,
    sinks + 1, ...), -1 elsewhere; such a slot is read like a sink, at that position, and the window
    moves up by the row's count R (rank of a query = sinks + R + window - 1: a row holds put-back
    slots only once its window is full). See the module docstring for the meaning."""
    B, S = valid.shape
    T = n_new
    q_pos = stream_pos[:, S - T:]  # (B, T)
    q_valid = valid[:, S - T:]
    k = stream_pos[:, None, :]  # (B, 1, S)
    q = q_pos[:, :, None]  # (B, T, 1)
    allowed = valid[:, None, :] & (k <= q)
    pin = np.zeros(valid.shape, bool) if pinned is None else valid & (pinned >= 0)
    if window is not None:
        allowed &= (k < sinks) | (k > q - window) | pin[:, None, :]
    # a token always reads its own slot, so a padding query never has an all-masked row (NaN)
    own = np.arange(T)
    allowed[:, own, S - T + own] = True
    if window is None:
        key_positions = _own_key_positions(np.where(valid, stream_pos, 0), q_pos, q_valid)
        return AttentionLayout(q_pos.astype(np.int64), key_positions, allowed, valid=valid, stream=stream_pos)
    extra = pin.sum(axis=1)  # (B,) R
    top = (sinks + extra + window - 1)[:, None]  # (B, 1) the rank of a token whose visible set is full
    last = np.where(q_valid, q_pos, -1).max(axis=1)[:, None]  # (B, 1) the row's last new token
    full = (extra > 0)[:, None] & q_valid.any(axis=1, keepdims=True)  # a put-back row's query is at the top
    base = np.where(full, last - top, np.maximum(last - top, 0))  # (B, 1)
    is_sink = valid & ((stream_pos < sinks) | pin)
    positions = (q_pos - base).astype(np.int64)
    fixed = np.where(pin, pinned if pinned is not None else 0, stream_pos)  # sinks at their index, put-back at theirs
    key_positions = _own_key_positions(np.where(valid, np.where(is_sink, fixed, stream_pos - base), 0),
                                       positions, q_valid)
    sink_positions = np.where(full, top, np.minimum(q_pos, top)).astype(np.int64)
    if not is_sink.any() or np.array_equal(sink_positions[q_valid], positions[q_valid]):
        return AttentionLayout(positions, key_positions, allowed, valid=valid, stream=stream_pos, sink_slots=is_sink)
    return AttentionLayout(positions, key_positions, allowed, sink_positions, is_sink, valid, stream_pos, is_sink)


def build_decode_layout(stream_pos: np.ndarray, valid: np.ndarray, sinks: int = 0,
                        window: int | None = None, key_positions: bool = True) -> AttentionLayout:
    """build_layout(stream_pos, valid, 1, sinks, window) - one new token per row, no put-back slots -
    with (B, S) operations only: the decode step's layout, built every token, so it skips what one
    query makes trivial (its own-slot diagonal, the put-back terms, the (B, T) maxima). Same arrays
    bit for bit as build_layout (tests/test_memory_decode.py checks every field). key_positions
    False leaves the (B, S) key positions out (None): a backend that caches keys already rotated
    (``reads_key_positions`` False) never reads them, and they are two (B, S) passes a token."""
    B, S = valid.shape
    q = stream_pos[:, -1:]  # (B, 1) the new token's stream index
    q_valid = valid[:, -1:]  # (B, 1)
    allowed = valid & (stream_pos <= q)  # (B, S)
    if window is not None:
        sink_cols = stream_pos < sinks  # (B, S)
        allowed &= sink_cols | (stream_pos > q - window)
    allowed[:, -1] = True  # its own slot, so a padding query never has an all-masked row
    allowed = allowed[:, None, :]  # (B, 1, S)
    if window is None:
        keys = None
        if key_positions:
            keys = np.where(valid, stream_pos, 0).astype(np.int64, copy=False)  # a new array: written below
            keys[:, -1] = q[:, 0]  # a padding token's own slot sits at its query's position (valid: the same)
        return AttentionLayout(q.astype(np.int64), keys, allowed, valid=valid, stream=stream_pos)
    top = sinks + window - 1  # the rank of a token whose visible set is full (no put-back slots)
    base = np.maximum(np.where(q_valid, q, -1) - top, 0)  # (B, 1)
    is_sink = valid & sink_cols  # (B, S)
    positions = (q - base).astype(np.int64, copy=False)  # (B, 1)
    keys = None
    if key_positions:
        keys = np.where(valid, np.where(is_sink, stream_pos, stream_pos - base), 0).astype(np.int64, copy=False)
        keys[:, -1:] = np.where(q_valid, keys[:, -1:], positions)
    # a valid row's one query is at q - max(q - top, 0) = min(q, top): its sink position, always - so
    # build_layout's comparison of the two is always equal here and the layout leaves sink_positions out
    return AttentionLayout(positions, keys, allowed, valid=valid, stream=stream_pos, sink_slots=is_sink)


def _own_key_positions(key_positions: np.ndarray, positions: np.ndarray, q_valid: np.ndarray) -> np.ndarray:
    """(B, S) int64 key positions where a padding token's own slot - the one slot its query reads -
    sits at its query's position, as a backend that rotates each new key with its query (contract v3)
    puts it: padding outputs are meaningless, but then equal on every path."""
    T = positions.shape[1]
    out = key_positions.astype(np.int64)
    out[:, out.shape[1] - T:] = np.where(q_valid, out[:, out.shape[1] - T:], positions)
    return out


def build_decode_run(stream_pos: np.ndarray, valid: np.ndarray, steps: int, sinks: int = 0,
                     window: int | None = None) -> list[AttentionLayout]:
    """The layouts of ``steps`` decode steps in a row (a greedy run: one new token per row per step,
    every row a token each step), for a backend that never reads key positions (left out: None).
    stream_pos, valid (B, S): the first step's slots, its new token last, as build_decode_layout takes
    them; step i's new token sits i slots further, at stream index + i. Step i's layout is
    build_decode_layout's for the slots held after i more steps, bit for bit, with ``valid`` the slots
    a `sink` row still holds then: a slot that its band dropped since the first step is masked, which
    is what the memory's eviction does between two steps (it never compacts inside a run: the caller
    keeps runs short of that). Each layout's arrays (B, 1, S + i) are views of arrays built at once
    (without a band, of one (B, 1, S + steps - 1) array: step i reads the first S + i slots), not a pass
    over the cache per step."""
    B, S = valid.shape
    q0 = stream_pos[:, -1:]  # (B, 1) the first new token's stream index
    stream = np.concatenate((stream_pos, q0 + np.arange(1, steps)), axis=1)  # (B, W), W = S + steps - 1
    held = np.concatenate((valid, np.ones((B, steps - 1), bool)), axis=1)  # (B, W)
    q = (q0[None] + np.arange(steps)[:, None, None]).astype(np.int64, copy=False)  # (steps, B, 1) each step's query
    if window is None:
        # no band: step i reads every slot held before it and its own - the first S + i columns of held
        # (every held slot's stream index is below the query's), views of one (B, 1, W) array
        reads = held[:, None, :]
        return [AttentionLayout(q[i], None, reads[:, :, :S + i], valid=held[:, :S + i], stream=stream[:, :S + i])
                for i in range(steps)]
    allowed = held[None] & (stream[None] <= q)  # (steps, B, W)
    sink_cols = stream < sinks  # (B, W)
    allowed &= sink_cols[None] | (stream[None] > q - window)
    sink_slots = held & sink_cols
    top = sinks + window - 1  # the rank of a token whose visible set is full
    own = np.arange(steps)
    allowed[own, :, S - 1 + own] = True  # each step reads its own slot
    out = []
    for i in range(steps):
        n = S + i
        # every row holds a token: build_decode_layout's query position q - max(q - top, 0)
        positions = q[i] - np.maximum(q[i] - top, 0)
        out.append(AttentionLayout(positions, None, allowed[i, :, None, :n], valid=allowed[i, :, :n],
                                   stream=stream[:, :n], sink_slots=sink_slots[:, :n]))
    return out
