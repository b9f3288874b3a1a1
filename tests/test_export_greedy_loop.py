"""The greedy loop (OrtBackend.decode_greedy): an all-greedy batch's next decode steps in one backend
call give what the step-by-step loop gives. No tolerance: each step is a plain in-place decode step on
the decode branch, so its logits are a plain decode step's bit for bit, and the picks are numpy's argmax
of them."""
from __future__ import annotations

import numpy as np
import pytest

from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.sampling import GenerationConfig

PROMPTS = [[5, 17, 42, 9, 88, 3, 61], [7, 7, 200], [120, 33, 4, 250, 19]]  # different lengths: left padding


@pytest.fixture(scope="module")
def generators(small_export):
    from ctxmem.export.runtime import load_onnx_generator

    full = MemoryConfig("full")
    looped = load_onnx_generator(small_export, memory=full, provider="cpu")
    stepped = load_onnx_generator(small_export, memory=full, provider="cpu", greedy_loop=False)
    assert looped.backend.greedy_loop and not stepped.backend.greedy_loop
    return looped, stepped


def spy(backend, monkeypatch) -> list:
    """Record what each decode_greedy call returns."""
    calls, real = [], backend.decode_greedy

    def recorded(*args):
        out = real(*args)
        calls.append(out)
        return out
    monkeypatch.setattr(backend, "decode_greedy", recorded)
    return calls


def generate_both(generators, monkeypatch, memory: MemoryConfig, tokens: int):
    """(the looped generator's decode_greedy returns, its completions, the step-by-step generator's) for
    PROMPTS, ``tokens`` greedy tokens under ``memory``."""
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    config = GenerationConfig(max_new_tokens=tokens, temperature=0.0, stop_token_ids=[])
    return calls, looped.generate(PROMPTS, config, memory=memory), stepped.generate(PROMPTS, config, memory=memory)


def test_the_loop_gives_the_step_by_step_tokens_texts_and_reasons(generators, monkeypatch):
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    config = GenerationConfig(max_new_tokens=80, temperature=0.0, stop_token_ids=[])  # the first pick, runs of 64 + 15
    expected = stepped.generate(PROMPTS, config)
    got = looped.generate(PROMPTS, config)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert {type(i) for c in got for i in c.token_ids} == {int}  # JSON-ready, as the step-by-step loop's
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in got] == \
        [(c.text, c.finish_reason, c.completion_tokens) for c in expected]
    assert len(calls) == 2 and all(c is not None for c in calls)  # the Loop ran: 64 + 15 steps ahead
    assert [c[0].shape[1] for c in calls] == [64, 15]


def test_a_row_that_stops_on_the_way_stops_where_it_would_have(generators, monkeypatch):
    looped, stepped = generators
    free = stepped.generate(PROMPTS, GenerationConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=[]))
    # a row stops at a token it first makes inside the first run (`small` is trained a little: its
    # rows do not just repeat a token), and no row stops at its first
    # token (the Loop runs only while every row does)
    row, stop = next((r, tok) for r, c in enumerate(free) for i, tok in enumerate(c.token_ids[1:30], 1)
                     if tok not in c.token_ids[:i] and all(tok != other.token_ids[0] for other in free))
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=[stop])
    calls = spy(looped.backend, monkeypatch)
    expected = stepped.generate(PROMPTS, config)
    got = looped.generate(PROMPTS, config)
    assert calls and expected[row].finish_reason == "stop" and expected[row].completion_tokens < 30
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == \
        [(c.token_ids, c.text, c.finish_reason) for c in expected]


@pytest.mark.parametrize("memory", [MemoryConfig("full"), MemoryConfig("sink", window=16, sinks=4)])
def test_each_steps_logits_are_a_plain_decode_steps_bit_for_bit(generators, monkeypatch, memory):
    """Runs one after the other (under `sink` across the window's end and far past it: evicting, the sink
    keys turned, a compaction between two runs), each step's logits against a plain decode step's."""
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    looped_memory, stepped_memory = ContextMemory(looped.backend, memory), ContextMemory(stepped.backend, memory)
    a, b = looped_memory.start(len(PROMPTS)), stepped_memory.start(len(PROMPTS))
    first = looped_memory.feed(a, PROMPTS)
    np.testing.assert_array_equal(first, stepped_memory.feed(b, PROMPTS))
    fed = first.argmax(axis=1)[:, None]
    runs = []
    while sum(runs) < 60:
        picks = looped_memory.feed_greedy(a, fed, 30)
        assert picks is not None and picks.shape[0] == len(PROMPTS)
        runs.append(picks.shape[1])
        loop_logits = calls[-1][2]  # (steps, B, V)
        for i in range(picks.shape[1]):
            logits = stepped_memory.feed(b, fed)
            assert np.array_equal(logits, loop_logits[i])  # bit for bit
            assert np.array_equal(logits.argmax(axis=1), picks[:, i])
            fed = picks[:, i:i + 1]
        # the states agree too (under sink: the slots held, the count evicted)
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.tokens, b.tokens)
        assert np.array_equal(a.seen, b.seen) and np.array_equal(a.evicted, b.evicted)
    if memory.policy == "full":
        assert runs == [30, 30]
    else:
        # the first run ends where the first row's window does (4 + 16 - 7 held), later ones where another
        # row's does or where the cache would be compacted; the rows went far past the window
        assert runs[0] == 13 and len(runs) > 3 and b.evicted.min() > 20
    np.testing.assert_array_equal(looped_memory.feed(a, fed), stepped_memory.feed(b, fed))


@pytest.mark.parametrize("setting", [dict(temperature=0.7, seed=3), dict(temperature=0.0, repetition_penalty=1.3)])
def test_sampled_or_penalised_rows_never_take_the_loop(generators, monkeypatch, setting):
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[], **setting)
    assert [c.token_ids for c in looped.generate(PROMPTS, config)] == \
        [c.token_ids for c in stepped.generate(PROMPTS, config)]
    assert calls == []


def test_sink_takes_the_loop_across_its_window_in_runs_between_compactions(generators, monkeypatch):
    """Under `sink` the loop runs inside the window and past it: each step's layout masks what its band
    dropped (the eviction between two steps) and a row past its window has its sink keys turned for each
    step, as a plain decode step does; a run stops before the cache would be compacted, and the next one
    starts after the compaction. The tokens, texts and eviction counts are the step-by-step loop's."""
    sink = MemoryConfig("sink", window=16, sinks=4)
    calls, got, expected = generate_both(generators, monkeypatch, sink, 40)
    assert [(c.token_ids, c.text, c.evicted) for c in got] == [(c.token_ids, c.text, c.evicted) for c in expected]
    assert expected[0].evicted > 0  # the run went far past the window
    # the first pick, then runs. A run ends where a row's sink keys start being scored apart - its window's
    # end: the rows' prompts (7, 3, 5 tokens, left-padded to 7 slots) reach it 13, 15 and 17 steps in ->
    # 13, 2, 2 - or where the cache would be compacted: 24 slots held then, compacted past 4 + 16 + slack 10
    # (half the capacity) -> 7; after the compaction 19 slots (sinks + window - 1) -> 12; then the 3 tokens left
    slack = ContextMemory(generators[0].backend, sink).slack
    assert slack == 10 and [c[0].shape[1] for c in calls] == [13, 2, 2, 7, 12, 3]
    assert all(np.array_equal(c[0][r], got[r].token_ids[1:1 + c[0].shape[1]]) for c in calls[:1] for r in range(3))


def test_sink_far_past_its_window_and_across_frame_moves_gives_the_stepped_tokens(generators, monkeypatch):
    """Hundreds of tokens past the window: the rows' key frames move (a run ends at the rotation table's
    end, a plain step moves the frame, runs go on) and the tokens and eviction counts stay the step-by-step
    loop's; nearly every token comes out of a run."""
    backend = generators[0].backend
    tokens = 2 * backend.span[1]  # at least two frame moves
    calls, got, expected = generate_both(generators, monkeypatch, MemoryConfig("sink", window=16, sinks=4), tokens)
    assert [(c.token_ids, c.evicted) for c in got] == [(c.token_ids, c.evicted) for c in expected]
    runs = [c[0].shape[1] for c in calls if c is not None]
    # None where a row's next position is at the table's end: two plain steps, the second moving that row's
    # frame (each row's moves once per max_seq_len tokens, rows apart from each other)
    moves = len(PROMPTS) * (tokens // backend.max_seq_len)
    assert sum(c is None for c in calls) <= 2 * moves and sum(runs) > 0.9 * tokens


def test_a_window_without_sinks_takes_the_loop_and_gives_the_stepped_tokens(generators, monkeypatch):
    """sinks=0: past the window nothing is turned (no sink keys); the runs give the step-by-step tokens."""
    calls, got, expected = generate_both(generators, monkeypatch, MemoryConfig("sink", window=9, sinks=0), 60)
    assert [(c.token_ids, c.evicted) for c in got] == [(c.token_ids, c.evicted) for c in expected]
    assert expected[0].evicted > 40 and sum(c[0].shape[1] for c in calls if c is not None) > 40


def test_recompute_never_takes_the_loop(generators, monkeypatch):
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    recompute = MemoryConfig("recompute", window=16)
    config = GenerationConfig(max_new_tokens=30, temperature=0.0, stop_token_ids=[])
    assert [c.token_ids for c in looped.generate(PROMPTS, config, memory=recompute)] == \
        [c.token_ids for c in stepped.generate(PROMPTS, config, memory=recompute)]
    assert calls == []


def test_a_nan_on_the_way_hands_back_with_the_state_untouched(generators, monkeypatch):
    """A step whose logits hold a NaN (where the sampler's guarded path must decide) ends the run with
    None, and the state - its cache's buffer included, which the run wrote past its end - is as it was:
    the step-by-step loop goes on from it exactly as from a state the run never touched."""
    looped, stepped = generators
    backend = looped.backend
    full = MemoryConfig("full")
    looped_memory, stepped_memory = ContextMemory(backend, full), ContextMemory(stepped.backend, full)
    a, b = looped_memory.start(len(PROMPTS)), stepped_memory.start(len(PROMPTS))
    ids = looped_memory.feed(a, PROMPTS).argmax(axis=1)[:, None]
    stepped_memory.feed(b, PROMPTS)
    for _ in range(3):  # a few plain steps first: the cache is a KVBuffer's views, the run appends to it
        logits = looped_memory.feed(a, ids)
        np.testing.assert_array_equal(logits, stepped_memory.feed(b, ids))
        ids = logits.argmax(axis=1)[:, None]
    buffer, filled = a.past.buffer, a.past.buffer.filled
    before = [np.array(x) for kv in a.past for x in kv]
    session = backend._greedy_session or backend._make_greedy_session()
    backend._greedy_session = session
    runs = []

    class Poisoned:  # the decode session, with a NaN in one logit of the fifth step
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding):
            session.run_with_iobinding(binding)
            runs.append(1)
            if len(runs) == 5:
                backend._local.bindings[(id(self), ())][2][0][1, 0, 7] = np.nan

    monkeypatch.setattr(backend, "_greedy_session", Poisoned())
    assert looped_memory.feed_greedy(a, ids, 20) is None and len(runs) == 20
    assert a.past.buffer is buffer and buffer.filled == filled
    assert all(np.array_equal(x, y) for x, y in zip(before, (x for kv in a.past for x in kv)))
    for _ in range(5):  # on step by step from the untouched state: the step-by-step loop's logits
        logits = looped_memory.feed(a, ids)
        np.testing.assert_array_equal(logits, stepped_memory.feed(b, ids))
        ids = logits.argmax(axis=1)[:, None]


def test_a_run_leaves_a_kept_snapshot_of_the_cache_as_it_was(generators):
    """What a caller keeps of the cache (serving keeps states for reuse) does not change under it:
    the run writes only slots past its end."""
    looped, _ = generators
    memory = ContextMemory(looped.backend, MemoryConfig("full"))
    state = memory.start(len(PROMPTS))
    ids = memory.feed(state, PROMPTS).argmax(axis=1)[:, None]
    ids = memory.feed(state, ids).argmax(axis=1)[:, None]
    kept = state.past
    copies = [np.array(x) for kv in kept for x in kv]
    assert memory.feed_greedy(state, ids, 30) is not None
    assert state.past[0][0].shape[2] == kept[0][0].shape[2] + 30
    assert all(np.array_equal(x, y) for x, y in zip(copies, (x for kv in kept for x in kv)))


def test_with_the_decode_session_asked_for_the_run_shares_it_and_gives_the_stepped_tokens(small_export, generators):
    """decode_session=True: plain decode steps and greedy runs use one session (one more copy of the
    weights, not two) and one binding per thread; the tokens are the step-by-step loop's, under `full`
    and under `sink` across its window's end."""
    from ctxmem.export.runtime import load_onnx_generator

    _, stepped = generators
    both = load_onnx_generator(small_export, memory=MemoryConfig("full"), provider="cpu", decode_session=True)
    assert both.backend.greedy_loop and both.backend._greedy_session is both.backend._decode_session is not None
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=[])
    for memory in (MemoryConfig("full"), MemoryConfig("sink", window=16, sinks=4)):
        assert [c.token_ids for c in both.generate(PROMPTS, config, memory=memory)] == \
            [c.token_ids for c in stepped.generate(PROMPTS, config, memory=memory)]
