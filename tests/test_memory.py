"""Context-memory policies: sink (StreamingLLM), recompute, and full, over the torch backend."""
import numpy as np
import pytest
import torch

from ctxmem.backend import TorchBackend
from ctxmem.config import preset
from ctxmem.memory import ContextMemory, ContextOverflowError, MemoryConfig, MemoryConfigError, default_slack
from ctxmem.model import Transformer

# fp32 throughout. Cached vs recomputed attention differ only in reduction order (shapes
# (1 x S) vs (T x S)): 1e-5 on logits of size ~0.1-1 is ~100x the noise seen (~1e-7) and far
# below what one wrong position or one wrong kept token does (>1e-3).
ATOL = 1e-5


def make(n_layers=2, context=64, pos="rope", seed=0):
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=300, n_layers=n_layers, max_seq_len=context, pos=pos)).eval()
    return model, TorchBackend(model)


def stream(memory, tokens, prefill=16):
    state = memory.start(1)
    logits = memory.feed(state, [tokens[:prefill]])
    for t in tokens[prefill:]:
        logits = memory.feed(state, np.array([[t]]))
    return state, logits


def tokens(n, seed=1):
    return np.random.default_rng(seed).integers(0, 300, n).tolist()


def test_sink_cache_after_sliding_equals_a_fresh_forward_over_the_kept_tokens():
    # With one layer a token's cached key/value depends on that token alone, so after the window
    # has slid many times, the next-token logits must equal an uncached forward over exactly the
    # kept tokens at cache-relative positions 0..K-1 (StreamingLLM's position rule).
    model, backend = make(n_layers=1)
    memory = ContextMemory(backend, MemoryConfig("sink", window=12, sinks=4))
    state, logits = stream(memory, tokens(200))
    kept = state.kept_tokens(0)
    assert len(kept) == 16 and kept[:4] == tokens(200)[:4] and kept[4:] == tokens(200)[-12:]
    with torch.no_grad():
        fresh = model(torch.tensor([kept]))[0, -1].numpy()
    np.testing.assert_allclose(logits[0], fresh, atol=ATOL)


@pytest.mark.parametrize("window, sinks", [(4, 2), (12, 4), (40, 4)])
def test_sink_cache_grows_to_capacity_plus_the_default_slack_then_compacts(window, sinks):
    """The cache a long stream leaves is bounded: it carries masked (evicted) slots up to
    default_slack(capacity) - half a small capacity, at least 8 - and is then compacted back to the
    kept slots; the memory a conversation holds is at most capacity + slack + 1 slots."""
    _, backend = make(n_layers=1)
    memory = ContextMemory(backend, MemoryConfig("sink", window=window, sinks=sinks))
    capacity = window + sinks
    slack = default_slack(capacity)
    assert memory.slack == slack == max(8, capacity // 2)
    state = memory.start(1)
    memory.feed(state, [tokens(3)])
    sizes = []
    for t in tokens(3 * (capacity + slack)):
        memory.feed(state, np.array([[t]]))
        sizes.append(state.slots)
    assert max(sizes) == capacity + slack + 1  # grows into the slack (+ the token fed after the check) ...
    assert min(sizes[sizes.index(max(sizes)) + 1:]) <= capacity  # ... then is compacted back
    assert state.lengths()[0] == capacity  # what stays visible is the sinks and the window


def test_sink_cache_matches_a_naive_streamingllm_reference_on_a_deep_model():
    # Reference written independently: remember every token's pre-rotation K/V from the moment it
    # was processed, and at each step attend to sinks + the most recent tokens at positions given
    # by their rank in that visible set.
    model, backend = make(n_layers=3)
    sinks, window = 3, 9
    memory = ContextMemory(backend, MemoryConfig("sink", window=window, sinks=sinks))
    seq = tokens(70, seed=5)
    state, ours = stream(memory, seq, prefill=1)
    kv_of: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per token, per layer (k, v) (1, Hkv, 1, D)
    with torch.no_grad():
        for t, tok in enumerate(seq):
            earlier = list(range(t))
            if len(earlier) > sinks + window - 1:
                earlier = earlier[:sinks] + earlier[len(earlier) - (window - 1):]
            past = None
            if earlier:
                past = [(torch.cat([kv_of[j][layer][0] for j in earlier], 2), torch.cat([kv_of[j][layer][1] for j in earlier], 2))
                        for layer in range(model.cfg.n_layers)]
            logits, present = model(torch.tensor([[tok]]), positions=torch.tensor([[len(earlier)]]), past=past, use_cache=True)
            kv_of.append([(k[:, :, -1:], v[:, :, -1:]) for k, v in present])
    np.testing.assert_allclose(ours[0], logits[0, -1].numpy(), atol=ATOL)
    assert state.evicted[0] == len(seq) - (sinks + window)


def test_recompute_equals_a_fresh_forward_over_the_kept_window_for_any_depth():
    model, backend = make(n_layers=2)
    for chunk in (1, 4):
        memory = ContextMemory(backend, MemoryConfig("recompute", window=16, chunk=chunk))
        state, logits = stream(memory, tokens(90))
        kept = state.kept_tokens(0)
        assert kept == tokens(90)[-len(kept):] and len(kept) <= 16
        with torch.no_grad():
            fresh = model(torch.tensor([kept]))[0, -1].numpy()
        np.testing.assert_allclose(logits[0], fresh, atol=ATOL)
        assert state.evicted[0] == 90 - len(kept)


def test_recompute_works_with_learned_absolute_positions():
    model, backend = make(pos="learned")
    memory = ContextMemory(backend, MemoryConfig("recompute", window=16, chunk=2))
    state, logits = stream(memory, tokens(60))
    with torch.no_grad():
        fresh = model(torch.tensor([state.kept_tokens(0)]))[0, -1].numpy()
    np.testing.assert_allclose(logits[0], fresh, atol=ATOL)


def test_sink_policy_refuses_learned_positions_and_says_what_to_use():
    _, backend = make(pos="learned")
    with pytest.raises(MemoryConfigError, match="use --policy recompute"):
        ContextMemory(backend, MemoryConfig("sink", window=8, sinks=2))


def test_full_policy_raises_past_the_context_and_names_the_other_policies():
    _, backend = make(context=32)
    memory = ContextMemory(backend, MemoryConfig("full"))
    state = memory.start(1)
    memory.feed(state, [tokens(30)])
    memory.feed(state, np.array([[1]]))
    memory.feed(state, np.array([[2]]))
    with pytest.raises(ContextOverflowError, match="33 tokens .* context of 32 .*'sink'.*'recompute'"):
        memory.feed(state, np.array([[3]]))
    assert state.lengths()[0] == 32  # the failed feed lost nothing


@pytest.mark.parametrize("config", [MemoryConfig("sink", window=24, sinks=4), MemoryConfig("recompute", window=28, chunk=7)])
def test_sliding_policies_run_a_stream_20x_the_window_and_report_evictions(config):
    _, backend = make(context=32)
    memory = ContextMemory(backend, config)
    n = 20 * 28
    state, logits = stream(memory, tokens(n), prefill=100)  # prefill itself is longer than the window
    assert np.isfinite(logits).all()
    assert state.seen[0] == n
    assert state.lengths()[0] <= memory.config.capacity
    assert state.evicted[0] == n - state.lengths()[0] > 0


def test_rows_of_a_padded_batch_evict_independently_and_match_running_alone():
    _, backend = make(context=48)
    config = MemoryConfig("sink", window=10, sinks=2)
    memory = ContextMemory(backend, config)
    prompts = [tokens(5, seed=1), tokens(23, seed=2), tokens(14, seed=3)]
    state = memory.start(3)
    batched = memory.feed(state, prompts)
    for step in range(15):
        batched = memory.feed(state, np.full((3, 1), 7 + step))
    for row, prompt in enumerate(prompts):
        alone = memory.start(1)
        logits = memory.feed(alone, [prompt])
        for step in range(15):
            logits = memory.feed(alone, np.array([[7 + step]]))
        np.testing.assert_allclose(batched[row], logits[0], atol=ATOL)
        assert state.kept_tokens(row) == alone.kept_tokens(0)
        assert state.evicted[row] == alone.evicted[0]


def test_merge_and_select_let_sequences_join_and_leave_a_running_batch():
    _, backend = make(context=48)
    memory = ContextMemory(backend, MemoryConfig("sink", window=12, sinks=2))
    a, b = memory.start(1), memory.start(1)
    memory.feed(a, [tokens(20, seed=1)])
    memory.feed(b, [tokens(6, seed=2)])
    both = memory.merge([a, b])
    logits = memory.feed(both, np.array([[3], [4]]))
    ref_b = memory.feed(b, np.array([[4]]))
    np.testing.assert_allclose(logits[1], ref_b[0], atol=ATOL)
    only_b = memory.compact(memory.select(both, [1]))
    assert only_b.slots == only_b.lengths()[0] == b.lengths()[0]
    np.testing.assert_allclose(memory.feed(only_b, np.array([[5]]))[0], memory.feed(b, np.array([[5]]))[0], atol=ATOL)


@pytest.mark.parametrize("kwargs,message", [
    (dict(policy="lru"), "unknown memory policy"),
    (dict(policy="sink", window=60, sinks=10), "must be between 1 and the model's context"),
    (dict(policy="recompute", window=16, chunk=16), "chunk must be in"),
])
def test_bad_memory_settings_are_refused(kwargs, message):
    _, backend = make(context=64)
    with pytest.raises(MemoryConfigError, match=message):
        ContextMemory(backend, MemoryConfig(**kwargs))


def test_keep_first_and_last_picks_each_rows_first_and_last_valid_slots_left_padded():
    """The eviction's slot choice (vectorised) against a plain per-row statement of it."""
    from ctxmem.memory import keep_first_and_last

    rng = np.random.default_rng(0)
    for trial in range(400):
        mask = rng.random((int(rng.integers(1, 5)), int(rng.integers(0, 30)))) < rng.random()
        first, last = int(rng.integers(0, 6)), int(rng.integers(0, 10))
        picks = []
        for row in mask:
            valid = list(np.flatnonzero(row))
            picks.append(valid if len(valid) <= first + last else valid[:first] + valid[len(valid) - last:])
        width = max(len(p) for p in picks)
        idx, kept = keep_first_and_last(mask, first, last)
        assert idx.shape == kept.shape == (len(mask), width), trial
        for r, p in enumerate(picks):
            assert idx[r][kept[r]].tolist() == p and kept[r].tolist() == [False] * (width - len(p)) + [True] * len(p)
            assert (idx[r][~kept[r]] == 0).all()


@pytest.mark.parametrize("same_rows", [True, False])
def test_numpy_cache_take_gathers_each_rows_slots(same_rows):
    """NumpyCacheOps.take (np.take / per-row take) against np.take_along_axis, contiguous results."""
    from ctxmem.memory import NumpyCacheOps

    rng = np.random.default_rng(1)
    past = [(rng.normal(size=(3, 2, 12, 4)).astype(np.float32), rng.normal(size=(3, 2, 12, 4)).astype(np.float32))]
    rows = [np.sort(rng.choice(12, 7, replace=False)) for _ in range(3)]
    idx = np.stack([rows[0]] * 3 if same_rows else rows)
    for got, want in zip(NumpyCacheOps().take(past, idx)[0], past[0]):
        assert got.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(got, np.take_along_axis(want, idx[:, None, :, None], axis=2))
