"""Decode steps in place (export/runtime.py: KVBuffer): past and present bound to one preallocated
buffer that GroupQueryAttention appends to, and a `sink` row far past its window brought onto the
decode branch by rotating its few sink keys for the call. Compared with the same export run the
plain way (session.run over the general path wherever the graph would score sinks apart)."""
from __future__ import annotations

import numpy as np
import pytest


def _backends(export):
    """(in place, plain): two backends over one export; the plain one runs session.run every step."""
    from ctxmem.export.runtime import OrtBackend

    fast, plain = OrtBackend(export, provider="cpu"), OrtBackend(export, provider="cpu")
    plain.in_place = plain.ops.buffered = False
    assert fast.in_place, "the export has the decode branch, on CPU: decode steps run in place"
    return fast, plain


def _feed_all(backend, memory_config, prompts, steps, seed=0):
    """Prompts, then `steps` greedy tokens fed one at a time: every step's logits (B, V), and how many
    calls ran in place and how many of those rotated sink keys."""
    from ctxmem.memory import ContextMemory

    calls = [0, 0]
    inner = backend._decode_in_place

    def counted(*args):
        calls[0] += 1
        calls[1] += bool(args[-1])  # shift: the sink keys rotated for the call, or ()
        return inner(*args)
    backend._decode_in_place = counted
    memory = ContextMemory(backend, memory_config)
    state = memory.start(len(prompts))
    logits = [memory.feed(state, prompts)]
    for _ in range(steps):
        logits.append(memory.feed(state, np.argmax(logits[-1], axis=-1)[:, None]))
    return np.stack(logits), calls, memory, state


def test_full_policy_decode_in_place_gives_the_plain_logits_bit_for_bit(branch_export):
    """Under `full` the in-place step runs the same op on the same numbers (the op appends to the
    buffer instead of to a new present): logits equal exactly, two rows of different lengths."""
    from ctxmem.memory import MemoryConfig

    fast, plain = _backends(branch_export)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    got, in_place, _, state = _feed_all(fast, MemoryConfig("full"), prompts, 80)
    want, plain_calls, _, plain_state = _feed_all(plain, MemoryConfig("full"), prompts, 80)
    assert in_place == [80, 0] and plain_calls == [0, 0]  # every decode step in place; 80 > GROW: a new buffer
    np.testing.assert_array_equal(got, want)
    for (k, v), (pk, pv) in zip(state.past, plain_state.past):  # the cache the memory holds, too
        np.testing.assert_array_equal(k, pk)
        np.testing.assert_array_equal(v, pv)


def test_sink_far_past_the_window_runs_the_decode_branch_and_keeps_the_general_paths_logits(branch_export):
    """Far past the window a sink row's sink query differs from its ordinary one: the plain run
    scores the sinks apart on the general path, the in-place run rotates the sink keys by the
    difference for the call. Same scores up to fp32 rounding of one rotation (measured 3.6e-7 on
    logits up to 1.5; tolerance 1e-5); 300 steps move each row's key frame (the rotation table
    spans 2 * 128) and compact the cache many times."""
    from ctxmem.memory import MemoryConfig

    fast, plain = _backends(branch_export)
    memory = MemoryConfig("sink", window=20, sinks=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    got, in_place, _, state = _feed_all(fast, memory, prompts, 300)
    want, _, _, plain_state = _feed_all(plain, memory, prompts, 300)
    assert in_place[0] == 300 and in_place[1] > 250  # past the window (~20 steps in), every step rotates
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert (np.argmax(got, -1) == np.argmax(want, -1)).all()
    # the sink keys the caller sees were put back bit for bit: the cache keeps the contract's meaning
    for (k, _), (pk, _) in zip(state.past, plain_state.past):
        np.testing.assert_allclose(k, pk, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(k[:, :, :4], pk[:, :, :4])


def test_a_window_without_sinks_decodes_in_place_far_past_it(branch_export):
    """`sink` with sinks=0 (a sliding window alone): past the window its rows' queries are apart from
    their ordinary positions but there is no sink key to turn. The in-place step used to fail there
    (KeyTurns over no keys); it now runs the decode branch with nothing turned, giving the general
    path's logits (1e-5: the two branches' fp32 summation order)."""
    from ctxmem.memory import MemoryConfig

    fast, plain = _backends(branch_export)
    memory = MemoryConfig("sink", window=9, sinks=0)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [40, 41, 42]]
    got, in_place, _, state = _feed_all(fast, memory, prompts, 60)
    want, _, _, _ = _feed_all(plain, memory, prompts, 60)
    assert in_place[0] == 60 and in_place[1] == 0 and state.evicted.min() > 40
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert (np.argmax(got, -1) == np.argmax(want, -1)).all()


def test_a_kept_snapshot_never_changes_and_continuing_it_copies(branch_export):
    """A caller that keeps an older cache (serving's reused states) and steps from it twice: the
    first continuation appends in place, the second finds the buffer already written past the
    snapshot and copies it; the snapshot's slots never change and both continuations agree."""
    from ctxmem.memory import ContextMemory, MemoryConfig

    fast, _ = _backends(branch_export)
    memory = ContextMemory(fast, MemoryConfig("full"))
    state = memory.start(1)
    memory.feed(state, [[5, 6, 7, 8]])
    memory.feed(state, np.array([[9]]))  # the first decode step: the cache moves into a buffer
    kept = state.past
    kept_copy = [(k.copy(), v.copy()) for k, v in kept]
    runs = []
    for _ in range(2):
        branch = ContextMemory(fast, MemoryConfig("full"))
        again = branch.start(1)
        again.past, again.mask, again.tokens = kept, state.mask.copy(), state.tokens.copy()
        again.seen, again.evicted = state.seen.copy(), state.evicted.copy()
        runs.append(np.stack([branch.feed(again, np.array([[t]])) for t in (11, 12, 13)]))
        assert again.past.buffer is not None
    assert runs[0].shape == runs[1].shape
    np.testing.assert_array_equal(runs[0], runs[1])
    for (k, v), (ck, cv) in zip(kept, kept_copy):
        np.testing.assert_array_equal(k, ck)
        np.testing.assert_array_equal(v, cv)


def test_a_sink_cache_kept_past_the_window_never_changes(branch_export):
    """Past the window each step rotates the sink keys in the buffer for the call and puts them
    back, and compactions gather into new buffers: a cache kept mid-stream reads the same afterwards,
    and continuing from it again gives the same logits as the first time."""
    from ctxmem.memory import ContextMemory, MemoryConfig

    fast, _ = _backends(branch_export)
    config = MemoryConfig("sink", window=12, sinks=4)
    memory = ContextMemory(fast, config)
    state = memory.start(1)
    memory.feed(state, [[5, 6, 7, 8, 9]])
    for t in range(40):  # well past sinks + window: every step rotates the sink keys
        memory.feed(state, np.array([[20 + t]]))
    kept = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in vars(state).items() if k != "past"}
    kept_past = state.past
    kept_copy = [(k.copy(), v.copy()) for k, v in kept_past]
    runs = []
    for _ in range(2):
        again = memory.start(1)
        for name, value in kept.items():
            setattr(again, name, value.copy() if isinstance(value, np.ndarray) else value)
        again.past = kept_past
        runs.append(np.stack([memory.feed(again, np.array([[t]])) for t in range(60, 90)]))  # 30 steps, compactions
    np.testing.assert_array_equal(runs[0], runs[1])
    for (k, v), (ck, cv) in zip(kept_past, kept_copy):
        np.testing.assert_array_equal(k, ck)
        np.testing.assert_array_equal(v, cv)


def test_an_ort_value_over_a_numpy_array_reads_what_is_written_into_it_later():
    """The decode step binds input_ids and positions once per binding, as OrtValues over (B, 1)
    arrays, and writes each step's values into those arrays: ONNX Runtime must read the array's
    memory, not a copy taken when the OrtValue was made."""
    import onnxruntime as ort

    array = np.zeros((2, 1), np.int64)
    value = ort.OrtValue.ortvalue_from_numpy(array)
    array[...] = [[7], [-3]]
    np.testing.assert_array_equal(value.numpy(), [[7], [-3]])
    assert value.data_ptr() == array.ctypes.data


def _fresh_bindings(backend):
    """backend whose every decode step makes its IOBinding anew and binds that step's ids and
    positions as copies (bind_cpu_input), not through the arrays the backend writes them into."""
    inner_step, inner_binding = backend._decode_in_place, backend._binding
    fed = {}

    def step(ids, allowed, sink_slots, positions, *rest):
        fed["ids"], fed["positions"] = ids.copy(), positions.copy()
        return inner_step(ids, allowed, sink_slots, positions, *rest)

    def fresh(buffer, extra):
        backend._local.bindings = {}
        binding, outs, ids, positions = inner_binding(buffer, extra)
        binding.bind_cpu_input("input_ids", fed["ids"])
        binding.bind_cpu_input("positions", fed["positions"])
        binding.bind_cpu_input("sink_positions", fed["positions"].copy())
        return binding, outs, np.empty_like(ids), np.empty_like(positions)  # the step's writes land elsewhere
    backend._decode_in_place, backend._binding = step, fresh
    return backend


@pytest.mark.parametrize("memory", [("full", None, 0), ("sink", 20, 4)], ids=["full", "sink"])
def test_the_reused_binding_gives_a_fresh_bindings_logits_bit_for_bit(branch_export, memory):
    """One IOBinding per buffer, its ids/positions arrays written each step, against a binding made
    anew every step with the step's ids and positions bound as copies: the same logits and cache bit for bit over 90 steps - past a buffer's growth
    (GROW = 64 free slots) and, under `sink`, past the window (sink keys rotated for each call) and
    across compactions (new buffers)."""
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.memory import MemoryConfig

    policy, window, sinks = memory
    config = MemoryConfig(policy) if window is None else MemoryConfig(policy, window=window, sinks=sinks)
    reused = OrtBackend(branch_export, provider="cpu")
    fresh = _fresh_bindings(OrtBackend(branch_export, provider="cpu"))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    got, calls, _, state = _feed_all(reused, config, prompts, 90)
    want, fresh_calls, _, fresh_state = _feed_all(fresh, config, prompts, 90)
    assert calls[0] == fresh_calls[0] == 90
    if policy == "sink":
        assert calls[1] > 50  # far past the window: the sink keys were rotated for most calls
    np.testing.assert_array_equal(got, want)
    for (k, v), (fk, fv) in zip(state.past, fresh_state.past):
        np.testing.assert_array_equal(k, fk)
        np.testing.assert_array_equal(v, fv)


@pytest.mark.parametrize("memory", [("full", None, 0), ("sink", 20, 4), ("retrieve", 12, 2)],
                         ids=["full", "sink", "retrieve"])
def test_the_decode_session_gives_the_if_graphs_logits_bit_for_bit(branch_export, memory):
    """decode_session=True runs decode steps on the decode branch as a session of its own: the same
    nodes on the same numbers as the If's branch, so the same logits and cache bit for bit (a
    padded batch, past a buffer's growth; under `sink` past the window and across compactions). Off
    by default; the derived graph reads no sink input. Under `retrieve` the decode steps also fetch a
    layer's queries (an extra output) and score put-back keys apart."""
    from ctxmem.export.runtime import MODEL_FILE, OrtBackend, decode_branch_model
    from ctxmem.memory import MemoryConfig

    policy, window, sinks = memory
    extra = dict(budget=8, block=4, queries=3, store=32, layer=1, every=1) if policy == "retrieve" else {}
    config = MemoryConfig(policy) if window is None else MemoryConfig(policy, window=window, sinks=sinks, **extra)
    assert OrtBackend(branch_export, provider="cpu")._decode_session is None
    split = OrtBackend(branch_export, provider="cpu", decode_session=True)
    assert split._decode_session is not None
    names = {i.name for i in split._decode_session.get_inputs()}
    assert "sink_keys" not in names and "sink_positions" not in names and "allowed" in names
    assert not any(n.op_type == "If" for n in decode_branch_model(branch_export / MODEL_FILE).graph.node)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    got, calls, _, state = _feed_all(split, config, prompts, 90)
    want, if_calls, _, if_state = _feed_all(OrtBackend(branch_export, provider="cpu"), config, prompts, 90)
    assert calls == if_calls and calls[0] >= 80  # (retrieve: a step that puts blocks back may not run in place)
    np.testing.assert_array_equal(got, want)
    for (k, v), (ik, iv) in zip(state.past, if_state.past):
        np.testing.assert_array_equal(k, ik)
        np.testing.assert_array_equal(v, iv)


@pytest.mark.parametrize("memory", [("full", None, 0), ("sink", 20, 4)], ids=["full", "sink"])
def test_decode_layouts_leave_out_the_key_positions_a_rotated_graph_never_reads(branch_export, memory):
    """A v3/v4 graph caches keys already rotated and takes no key positions, so OrtBackend says it
    never reads them (reads_key_positions False) and ContextMemory's decode steps build layouts
    without them: every other layout field equal to the layouts built with them, step by step, and
    the same logits and cache bit for bit (a padded batch; under `sink` past the window and across
    compactions). Prefill layouts keep them."""
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.memory import MemoryConfig

    policy, window, sinks = memory
    config = MemoryConfig(policy) if window is None else MemoryConfig(policy, window=window, sinks=sinks)
    skip = OrtBackend(branch_export, provider="cpu")
    build = OrtBackend(branch_export, provider="cpu")
    assert skip.reads_key_positions is False
    build.reads_key_positions = True  # as a backend that reads them (a v2 graph, PyTorch)

    def recorded(backend):
        layouts, inner = [], backend.forward

        def forward(ids, layout, past, last_only=True):
            layouts.append(layout)
            return inner(ids, layout, past, last_only=last_only)
        backend.forward = forward
        return layouts
    seen_skip, seen_build = recorded(skip), recorded(build)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]
    got, calls, _, state = _feed_all(skip, config, prompts, 90)
    want, build_calls, _, build_state = _feed_all(build, config, prompts, 90)
    assert calls == build_calls and calls[0] == 90 and len(seen_skip) == len(seen_build) == 91
    assert seen_skip[0].key_positions is not None  # prefill
    assert all(layout.key_positions is None for layout in seen_skip[1:])
    assert all(layout.key_positions is not None for layout in seen_build)
    for a, b in zip(seen_skip, seen_build):
        for f in ("positions", "allowed", "sink_positions", "sink_keys", "valid", "stream", "sink_slots"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f
            if x is not None:
                np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(got, want)
    for (k, v), (bk, bv) in zip(state.past, build_state.past):
        np.testing.assert_array_equal(k, bk)
        np.testing.assert_array_equal(v, bv)
