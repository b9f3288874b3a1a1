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


@pytest.mark.parametrize("memory, asked, runs", [(MemoryConfig("full"), 30, 30),
                                                 # sink: the steps up to the window's end (4 + 16 - 7 held)
                                                 (MemoryConfig("sink", window=16, sinks=4), 30, 13)])
def test_each_steps_logits_are_a_plain_decode_steps_bit_for_bit(generators, monkeypatch, memory, asked, runs):
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    looped_memory, stepped_memory = ContextMemory(looped.backend, memory), ContextMemory(stepped.backend, memory)
    a, b = looped_memory.start(len(PROMPTS)), stepped_memory.start(len(PROMPTS))
    first = looped_memory.feed(a, PROMPTS)
    np.testing.assert_array_equal(first, stepped_memory.feed(b, PROMPTS))
    ids = first.argmax(axis=1)[:, None]
    picks = looped_memory.feed_greedy(a, ids, asked)
    assert picks is not None and picks.shape == (len(PROMPTS), runs)
    loop_logits = calls[0][2]  # (runs, B, V)
    fed = ids
    for i in range(runs):
        logits = stepped_memory.feed(b, fed)
        assert np.array_equal(logits, loop_logits[i])  # bit for bit
        assert np.array_equal(logits.argmax(axis=1), picks[:, i])
        fed = picks[:, i:i + 1]
    # the states agree too: the next step from either gives the same logits (under sink, the first that evicts)
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.tokens, b.tokens) and np.array_equal(a.seen, b.seen)
    np.testing.assert_array_equal(looped_memory.feed(a, fed), stepped_memory.feed(b, fed))


@pytest.mark.parametrize("setting", [dict(temperature=0.7, seed=3), dict(temperature=0.0, repetition_penalty=1.3)])
def test_sampled_or_penalised_rows_never_take_the_loop(generators, monkeypatch, setting):
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[], **setting)
    assert [c.token_ids for c in looped.generate(PROMPTS, config)] == \
        [c.token_ids for c in stepped.generate(PROMPTS, config)]
    assert calls == []


def test_sink_takes_the_loop_inside_its_window_only_and_gives_the_stepped_tokens_across_it(generators, monkeypatch):
    """Under `sink`, before anything leaves the window, a decode step scores every slot at its stream
    position as under `full`: the Loop runs as many steps as the window still takes, then the step-by-step
    loop evicts and scores the sinks apart - the tokens the step-by-step loop gives all the way."""
    looped, stepped = generators
    calls = spy(looped.backend, monkeypatch)
    sink = MemoryConfig("sink", window=16, sinks=4)
    config = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_token_ids=[])
    got = looped.generate(PROMPTS, config, memory=sink)
    expected = stepped.generate(PROMPTS, config, memory=sink)
    assert [(c.token_ids, c.text, c.evicted) for c in got] == [(c.token_ids, c.text, c.evicted) for c in expected]
    assert expected[0].evicted > 0  # the run went far past the window
    # one run, up to the window's end: before it a row holds its prompt (the first pick goes in as the run's
    # first step), and its i-th step finds prompt + i tokens, at most sinks + window - 1 with nothing evicted
    assert [c[0].shape[1] for c in calls] == [4 + 16 - max(len(p) for p in PROMPTS)]
    assert all(np.array_equal(c[0][r], got[r].token_ids[1:1 + c[0].shape[1]]) for c in calls for r in range(3))


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
