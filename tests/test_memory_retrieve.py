"""The retrieve policy (ctxmem.retrieval): its meaning, written again independently, token by token.

Reference: the model's plain interface (valid-slot mask, positions = rank in the cache) on a cache
assembled by hand before each token: [sinks][the chosen evicted blocks' own keys and values][the
window - 1 most recent], the blocks chosen by a second implementation of the scoring rule (softmax
mass of the retrieval layer's query over every evicted token, per block, summed over the latest
queries; best block, the next, the previous ... within the budget).

Tolerance 1e-4 on fp32 logits, as tests/test_memory_exact.py: the paths sum in different orders and
rebase rotary angles (~1e-6 measured); a wrong block, slot or position moves logits by > 1e-2.
"""
import numpy as np
import pytest
import torch

from ctxmem.backend import TorchBackend
from ctxmem.config import preset
from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError
from ctxmem.model import Transformer

ATOL = 1e-4
VOCAB = 300
SINKS, WINDOW, BUDGET, BLOCK, QUERIES = 2, 10, 8, 4, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=64)).eval()


def config(**kw) -> MemoryConfig:
    base = dict(window=WINDOW, sinks=SINKS, budget=BUDGET, block=BLOCK, queries=QUERIES, store=64, layer=1, every=1)
    return MemoryConfig("retrieve", **{**base, **kw})


def choose(score: dict[int, float], sizes: dict[int, int], budget: int) -> list[int]:
    """Second implementation of the choice: best block, the next, the previous, then the next best."""
    order = sorted(sizes, key=lambda b: (-score[b], b))  # best first; ties to the older block
    chosen, used = [], 0
    for best in order:
        for b in (best, best + 1, best - 1):
            if b in sizes and b not in chosen and used + sizes[b] <= budget:
                chosen.append(b)
                used += sizes[b]
        if used and used + BLOCK > budget:
            break
    return sorted(chosen)


@torch.inference_mode()
def reference_logits(model, tokens, layer=1, store=64, every=1) -> tuple[np.ndarray, list[list[int]]]:
    """(N, V) logits and, per token, the stream indices put back before it."""
    cfg = model.cfg
    keys, values, queries, out, put_back = [], [], [], [], []
    captured = []
    back: list[int] = []
    hook = model.blocks[layer].attn.wq.register_forward_hook(lambda m, a, o: captured.append(o))
    try:
        for n, tok in enumerate(tokens):
            lo = max(SINKS, n - WINDOW + 1)  # tokens [SINKS, lo) are evicted before token n
            if n >= SINKS + WINDOW and n % every == 0:  # a refresh point: choose again
                # the store keeps at most `store` of the evicted, dropping whole blocks, oldest first
                first = SINKS + max(0, -(-(lo - SINKS - store) // BLOCK)) * BLOCK
                stored = list(range(first, lo))
                k = torch.stack([keys[t][layer] for t in stored], dim=1)  # (Hkv, n, D)
                k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=0)  # (H, n, D)
                q = torch.stack(queries[-QUERIES:], dim=1)  # (H, Q, D) of tokens n - Q .. n - 1
                w = torch.softmax(q @ k.transpose(1, 2) / cfg.head_dim ** 0.5, dim=-1)  # (H, Q, n)
                mass = w.mean(dim=(0, 1)).tolist()
                score: dict[int, float] = {}
                for t, x in zip(stored, mass):
                    score[(t - SINKS) // BLOCK] = score.get((t - SINKS) // BLOCK, 0.0) + x
                sizes = {b: sum(1 for t in stored if (t - SINKS) // BLOCK == b) for b in score}
                back = [t for b in choose(score, sizes, BUDGET) for t in stored if (t - SINKS) // BLOCK == b]
            put_back.append(back)
            slots = list(range(min(SINKS, n))) + back + list(range(lo, n))
            past = None
            if slots:
                past = [(torch.stack([keys[t][i] for t in slots], dim=1)[None],
                         torch.stack([values[t][i] for t in slots], dim=1)[None]) for i in range(cfg.n_layers)]
            logits, present = model(torch.tensor([[tok]]), attention_mask=torch.ones(1, len(slots) + 1, dtype=torch.bool),
                                    past=past, use_cache=True)
            out.append(logits[0, -1].float().numpy())
            keys.append([k[0, :, -1] for k, _ in present])  # (Hkv, D) before rotation
            values.append([v[0, :, -1] for _, v in present])
            queries.append(captured[-1][0, -1].float().view(cfg.n_heads, cfg.head_dim))  # (H, D)
    finally:
        hook.remove()
    return np.stack(out), put_back


@pytest.mark.parametrize("every", [1, 3])
def test_token_by_token_and_one_prompt_match_the_independent_reference(model, every):
    tokens = np.random.default_rng(0).integers(0, VOCAB, 70).tolist()
    expected, put_back = reference_logits(model, tokens, every=every)
    assert sum(len(b) for b in put_back) > 100  # the reference did put tokens back, many times
    assert len({tuple(b) for b in put_back if b}) > 3  # and changed its mind along the way
    for pieces in ([[t] for t in tokens], [tokens]):  # decoding, and one prompt (cut at refresh points)
        memory = ContextMemory(TorchBackend(model), config(every=every))
        state = memory.start(1)
        got = np.concatenate([memory.feed(state, [p], all_logits=True)[0] for p in pieces])
        np.testing.assert_allclose(got, expected, atol=ATOL)


def test_a_bounded_store_drops_its_oldest_blocks(model):
    tokens = np.random.default_rng(1).integers(0, VOCAB, 60).tolist()
    expected, _ = reference_logits(model, tokens, store=8)
    memory = ContextMemory(TorchBackend(model), config(store=8))
    state = memory.start(1)
    got = memory.feed(state, [tokens], all_logits=True)[0]
    np.testing.assert_allclose(got, expected, atol=ATOL)
    store = state.stores[0]
    # 48 tokens evicted (stream 2..49); blocks of 4 from 2; the newest whole blocks within 8 tokens: 42..49
    assert (store.lo, store.hi, store.tokens) == (42, 50, 8)
    kv = 2 * 8 * model.cfg.n_layers * model.cfg.n_kv_heads * model.cfg.head_dim * 4  # the bound's keys and values
    assert store.k.nbytes + store.v.nbytes == kv and store.nbytes < 2 * kv  # + scoring keys, ids, scores


@pytest.mark.parametrize("seed,every", [(0, 1), (1, 8)])
def test_pieces_of_any_size_and_batched_rows_match_token_by_token(model, seed, every):
    rng = np.random.default_rng(seed)
    backend = TorchBackend(model)

    def config(**kw):  # rows of unequal lengths reach their refresh points at different columns
        return globals()["config"](every=every, **kw)
    streams = [rng.integers(0, VOCAB, n).tolist() for n in (57, 40, 12)]
    alone = []
    for s in streams:
        memory = ContextMemory(backend, config())
        state = memory.start(1)
        alone.append(np.concatenate([memory.feed(state, [[t]], all_logits=True)[0] for t in s]))
    memory = ContextMemory(backend, config())
    state = memory.start(1)
    at, pieces = 0, []
    while at < len(streams[0]):
        size = int(rng.integers(1, 25))
        pieces.append(memory.feed(state, [streams[0][at:at + size]], all_logits=True)[0])
        at += size
    np.testing.assert_allclose(np.concatenate(pieces), alone[0], atol=ATOL)
    # three rows of unequal lengths, left-padded, fed together: each row's last logits as alone
    memory = ContextMemory(backend, config())
    state = memory.start(3)
    last = memory.feed(state, streams)
    for r, expected in enumerate(alone):
        np.testing.assert_allclose(last[r], expected[-1], atol=ATOL)
    # and decoding on together, one token each
    more = rng.integers(0, VOCAB, (5, 3))
    for col in more:
        step = memory.feed(state, [[int(t)] for t in col])
    for r, s in enumerate(streams):
        single = ContextMemory(backend, config())
        st = single.start(1)
        single.feed(st, [s])
        for col in more:
            ref = single.feed(st, [[int(col[r])]])
        np.testing.assert_allclose(step[r], ref[0], atol=ATOL)


def test_a_selected_row_owns_its_store(model):
    memory = ContextMemory(TorchBackend(model), config())
    state = memory.start(2)
    memory.feed(state, np.random.default_rng(2).integers(0, VOCAB, (2, 40)))
    one = memory.select(state, [0])
    before = one.stores[0].hi
    memory.feed(state, [[1], [2]])  # the batch goes on; the selected copy does not move
    assert one.stores[0].hi == before and state.stores[0].hi == before + 1


def test_the_policy_is_refused_where_it_cannot_run(model):
    backend = TorchBackend(model)
    with pytest.raises(MemoryConfigError, match="multiple of block"):
        ContextMemory(backend, config(store=10))
    with pytest.raises(MemoryConfigError, match="budget"):
        ContextMemory(backend, config(window=60, budget=8))  # 2 + 60 + 8 > the context of 64
    with pytest.raises(MemoryConfigError, match="layers 0..1"):
        ContextMemory(backend, config(layer=5))

    class NoQueries:  # a backend that cannot give its queries (an old ONNX export)
        max_seq_len, vocab_size, uses_rope, name = 64, VOCAB, True, "old-export"
        ops = backend.ops
    with pytest.raises(MemoryConfigError, match="re-export"):
        ContextMemory(NoQueries(), config())
    memory = ContextMemory(backend, config())
    state = memory.start(1)
    memory.feed(state, [list(range(30))])
    with pytest.raises(ValueError, match="rebuild it from the history"):  # its remembered queries moved
        memory.rewind(state, 1)


def test_overrides_keep_the_budget_inside_the_context():
    saved = MemoryConfig("sink", window=60, sinks=4)
    got = saved.with_overrides(64, policy="retrieve", budget=16)
    assert (got.policy, got.sinks, got.budget, got.window) == ("retrieve", 4, 16, 44)
    assert got.capacity == 64 and got.to_dict()["store"] == 2048
    assert MemoryConfig("retrieve").resolve(64).window == 64 - 4 - 32
    with pytest.raises(MemoryConfigError, match="choose policy 'retrieve'"):
        saved.with_overrides(64, budget=16)  # a budget means nothing to the sink policy: said, not ignored
