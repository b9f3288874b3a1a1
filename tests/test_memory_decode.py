"""The decode fast paths give what the general paths give, bit for bit.

* ctxmem.layout.build_decode_layout (one new token per row, (B, S) operations) against
  build_layout with n_new=1: every field equal, on random streams with padding slots and rows.
* ctxmem.layout.build_decode_run (a greedy run's layouts, built at once) against build_decode_layout
  step by step on the slots held after each step's eviction: every field equal.
* ContextMemory's decode step (that layout, stream positions carried from the previous step, under
  `sink` the evicted slots read off those positions and no second eviction pass after one token)
  against the same memory with the general layout, positions and eviction ranks by cumsum and both
  eviction passes: identical logits, states and layouts, token
  by token across sink compactions, on a left-padded batch whose rows stop early.
* Generator's batched greedy pick against each row's Sampler: identical tokens, and a row whose
  logits hold NaN/inf still takes the Sampler's guarded path.

Exact equality, no tolerance: the fast paths compute the same integers and call the backend with
the same arrays, so nothing may differ in any bit.
"""
import numpy as np
import pytest
import torch

import ctxmem.memory as memory_module
from ctxmem.backend import TorchBackend
from ctxmem.config import preset
from ctxmem.generation import Generator
from ctxmem.layout import build_decode_layout, build_decode_run, build_layout
from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.model import Transformer
from ctxmem.sampling import GenerationConfig, Sampler
from ctxmem.tokenizer import ByteTokenizer

FIELDS = ("positions", "key_positions", "allowed", "sink_positions", "sink_keys", "valid", "stream", "sink_slots")


def _same_layout(a, b, stream_on=None):
    """Every field equal; ``stream_on`` (B, S): compare ``stream`` on those slots only (a carried
    position of an evicted, masked slot is never read: every other field gates it by ``valid``)."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if name == "stream" and stream_on is not None:
            x, y = x[stream_on], y[stream_on]
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("band", [None, (0, 5), (4, 6), (2, 30)])
def test_decode_layout_equals_the_general_layout(seed, band):
    rng = np.random.default_rng(seed)
    B, S = int(rng.integers(1, 6)), int(rng.integers(1, 40))
    valid = rng.random((B, S)) < 0.7
    valid[rng.random(B) < 0.3, -1] = False  # padding rows: their new column is not a token
    # stream indices as the memory gives them: increasing over valid slots, with gaps (evicted middles)
    stream = np.cumsum(rng.integers(0, 3, (B, S)), axis=1).astype(np.int64)
    sinks, window = band if band is not None else (0, None)
    _same_layout(build_decode_layout(stream, valid, sinks, window), build_layout(stream, valid, 1, sinks, window))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("band", [None, (0, 5), (4, 6), (2, 30)])
def test_a_runs_layouts_are_the_decode_layouts_step_by_step(seed, band):
    rng = np.random.default_rng(100 + seed)
    B, S, steps = int(rng.integers(1, 6)), int(rng.integers(1, 40)), int(rng.integers(2, 12))
    valid = rng.random((B, S)) < 0.7
    valid[:, -1] = True  # a run feeds every row
    stream = np.cumsum(rng.integers(0, 3, (B, S)), axis=1).astype(np.int64)
    stream[:, -1] = stream[:, -2] + 1 if S > 1 else 0  # the new token one past the row's last slot
    sinks, window = band if band is not None else (0, None)
    run = build_decode_run(stream, valid, steps, sinks, window)
    assert len(run) == steps
    for i, got in enumerate(run):
        at = np.concatenate((stream, stream[:, -1:] + np.arange(1, i + 1)), axis=1)  # (B, S + i)
        held = np.concatenate((valid, np.ones((B, i), bool)), axis=1)
        if window is not None:  # what the eviction before step i leaves: the sinks and the band
            held &= (at < sinks) | (at > at[:, -1:] - window)
        _same_layout(got, build_decode_layout(at, held, sinks, window, key_positions=False))


VOCAB = 300


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    return TorchBackend(Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=64)).eval(), "cpu")


def _general():
    """The general path: build_layout for a decode step too, and the second eviction pass always."""
    def layout(stream, valid, sinks=0, window=None, key_positions=True):
        # build_layout always gives the key positions: this backend (TorchBackend) reads them
        assert key_positions
        return build_layout(stream, valid, 1, sinks, window)
    return layout


@pytest.mark.parametrize("policy", ["full", "sink"])
def test_decode_step_matches_the_general_path(backend, policy, monkeypatch):
    config = MemoryConfig(policy, window=10, sinks=3) if policy == "sink" else MemoryConfig("full")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (5, 1, 9)]
    steps = 40 if policy == "sink" else 30  # sink: 4x the window, several compactions (slack 8)

    def run(fast: bool):
        mem = ContextMemory(_Recording(backend, layouts[fast]), config, slack=8 if policy == "sink" else None)
        if not fast:  # the general layout and stream positions, and the post-forward eviction pass always
            monkeypatch.setattr(memory_module, "build_decode_layout", _general())
            mem._forward = _forward_then_evict(mem, mem._evict, policy == "sink")
        state = mem.start(3)
        out = [mem.feed(state, prompts)]
        for t in range(steps):
            ids = rng_ids[t][:, None]
            valid = np.array([[True], [t < steps // 2], [t % 3 != 1]])  # row 1 stops; row 2 skips steps
            out.append(mem.feed(state, ids, valid))
        monkeypatch.undo()
        return np.stack(out), state

    rng_ids = np.random.default_rng(1).integers(0, VOCAB, (steps, 3))
    layouts = {True: [], False: []}
    fast, fast_state = run(True)
    slow, slow_state = run(False)
    assert fast.dtype == np.float32 and np.array_equal(fast, slow)
    assert len(layouts[True]) == len(layouts[False]) == steps + 1
    for a, b in zip(layouts[True], layouts[False]):  # every array the backend saw
        _same_layout(a, b, stream_on=a.valid)
    for name in ("mask", "tokens", "evicted", "seen"):
        assert np.array_equal(getattr(fast_state, name), getattr(slow_state, name)), name
    if policy == "sink":
        assert fast_state.evicted.max() > 0 and fast_state.slots <= config.window + 3 + 8  # evicted, compacted


@pytest.mark.parametrize("policy", ["full", "sink"])
def test_positions_carried_through_select_merge_and_compact(backend, policy, monkeypatch):
    """Continuous batching's moves - a row leaving (select + compact), a prefilled row joining (merge, the
    shorter side left-padded), sink compactions - keep each row's carried stream positions, so the next
    decode step appends one column: identical logits, states and layouts to the same moves with nothing
    carried (positions by cumsum at every step)."""
    config = MemoryConfig(policy, window=10, sinks=3) if policy == "sink" else MemoryConfig("full")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (6, 2, 9, 4)]
    joiners = [rng.integers(0, VOCAB, n).tolist() for n in (3, 12)]
    ids = np.random.default_rng(4).integers(0, VOCAB, (60, 4))

    def run(fast: bool):
        mem = ContextMemory(_Recording(backend, layouts[fast]), config, slack=8 if policy == "sink" else None)
        if not fast:
            monkeypatch.setattr(memory_module, "build_decode_layout", _general())
            mem._forward = _forward_then_evict(mem, mem._evict, policy == "sink")
        state = mem.start(4)
        out, carried, t = [mem.feed(state, prompts)], [], 0

        def steps(n):
            nonlocal t
            for _ in range(n):
                out.append(mem.feed(state, ids[t, :state.batch, None]))
                t += 1

        steps(12)
        for rows, joiner in (([0, 2, 3], joiners[0]), ([1, 2], joiners[1])):
            state = mem.compact(mem.select(state, rows))  # rows leave
            carried.append(state.carry is not None)
            part = mem.start(1)
            mem.feed(part, [joiner])
            state = mem.merge([state, part])  # a prefilled row joins
            carried.append(state.carry is not None)
            steps(14)
        monkeypatch.undo()
        return out, state, carried

    layouts = {True: [], False: []}
    fast, fast_state, carried = run(True)
    slow, slow_state, _ = run(False)
    assert all(carried)  # the moves above kept the positions (the slow run recomputes them every step)
    assert len(fast) == len(slow) and all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(fast, slow))
    assert len(layouts[True]) == len(layouts[False])
    for a, b in zip(layouts[True], layouts[False]):
        _same_layout(a, b, stream_on=a.valid)
    for name in ("mask", "tokens", "evicted", "seen"):
        assert np.array_equal(getattr(fast_state, name), getattr(slow_state, name)), name
    if policy == "sink":
        assert fast_state.evicted.max() > 0


class _Recording:
    """A backend that keeps every layout it is called with."""

    def __init__(self, backend, into):
        self.backend, self.into = backend, into
        self.max_seq_len, self.vocab_size, self.uses_rope, self.ops = (backend.max_seq_len, backend.vocab_size,
                                                                      backend.uses_rope, backend.ops)

    def forward(self, ids, layout, past, last_only=True):
        self.into.append(layout)
        return self.backend.forward(ids, layout, past, last_only=last_only)


def _forward_then_evict(mem, evict, sink):
    """mem._forward with no carried stream positions (the cumsum every step), followed under sink by the
    eviction pass the decode step leaves out (a no-op there: checked). Nothing carried survives the
    call either, so the next step's eviction ranks slots by cumsum (first_and_last_mask) too."""
    forward = ContextMemory._forward.__get__(mem)

    def wrapped(state, ids, valid, last_only=True, queries=False):
        state.carry = None
        out = forward(state, ids, valid, last_only, queries)
        state.carry = None
        if sink and ids.shape[1] == 1:
            before = state.mask.copy()
            evict(state, mem.config.window)
            assert np.array_equal(before, state.mask)  # the pass finds nothing after one token per row
        return out
    return wrapped


class _Fixed:
    """A backend stand-in that returns given logits rows (the loop's sampler path is what is tested)."""

    max_seq_len, vocab_size, uses_rope, sink_token_id = 64, 8, True, None
    ops = memory_module.NumpyCacheOps()

    def __init__(self, logits):
        self.logits, self.calls = logits, 0

    def forward(self, ids, layout, past, last_only=True):
        out = self.logits[min(self.calls, len(self.logits) - 1)][:ids.shape[0]]
        self.calls += 1
        cache = np.zeros((ids.shape[0], 1, layout.key_positions.shape[1], 2), np.float32)
        return out.astype(np.float32), [(cache, cache)]


def test_batched_greedy_pick_equals_each_rows_sampler():
    nan, inf = np.nan, np.inf
    steps = np.array([
        [[0, 5, 5, 1, 0, 0, 0, 0], [1, nan, 3, 0, 0, 0, 0, 0], [-inf] * 7 + [2], [0, inf, 9, 0, 0, 0, 0, 0]],
        [[3, 2, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 7], [4, 4, 4, 4, 4, 4, 4, 4], [-1, -2, -3, -4, 0, 0, 0, 0]],
    ])  # (steps, B, V): ties, a NaN, -inf, +inf
    config = GenerationConfig(max_new_tokens=2, temperature=0.0, stop_token_ids=[])
    got = Generator(_Fixed(steps), ByteTokenizer(), MemoryConfig("full")).generate([[1], [2], [3], [4]], config)
    want = [[Sampler(config)(steps[t, r].astype(np.float32)) for t in range(2)] for r in range(4)]
    assert [c.token_ids for c in got] == want
    assert want[1][0] == 2 and want[3][0] == 2  # the guarded path: NaN and +inf rows pick the finite maximum
