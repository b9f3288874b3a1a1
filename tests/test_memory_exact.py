"""The memory's meaning holds whatever the piecing (ctxmem.layout).

Reference: token by token through the model's plain interface (valid-slot mask, positions = rank in
the cache), evicting physically down to the sinks and the window - 1 most recent tokens before each
token - StreamingLLM's decoding, written independently of ctxmem.memory and ctxmem.layout.

Tolerance 1e-4 on fp32 logits (magnitude ~1-10): the paths sum attention in different orders
(a piece scores many queries in one matmul, rotary angles are rebased) and differ in the last bits
(~1e-6 measured); a wrong token in a visible set or a wrong distance moves logits by > 1e-2.
"""
import numpy as np
import pytest
import torch

from ctxmem.backend import TorchBackend
from ctxmem.config import preset
from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.model import Transformer

ATOL = 1e-4
VOCAB = 300


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a short context so streams run many windows past it quickly
    return Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=64)).eval()


@torch.inference_mode()
def reference_logits(model, tokens, sinks, window) -> np.ndarray:
    """(N, V): token n sees its first `sinks` stream tokens and the `window` most recent up to itself."""
    past, out = None, []
    for tok in tokens:
        if past is not None and past[0][0].shape[2] > sinks + window - 1:
            S = past[0][0].shape[2]
            keep = list(range(sinks)) + list(range(S - (window - 1), S))
            past = [(k[:, :, keep], v[:, :, keep]) for k, v in past]
        P = past[0][0].shape[2] if past else 0
        logits, past = model(torch.tensor([[tok]]), attention_mask=torch.ones(1, P + 1, dtype=torch.bool),
                             past=past, use_cache=True)
        out.append(logits[0, -1].float().numpy())
    return np.stack(out)


def random_pieces(rng, n, most):
    cuts, at = [], 0
    while at < n:
        size = int(rng.integers(1, most + 1))
        cuts.append((at, min(n, at + size)))
        at += size
    return cuts


@pytest.mark.parametrize("sinks,window", [(4, 12), (1, 20), (0, 16), (4, 59)])
@pytest.mark.parametrize("seed", [0, 1])
def test_pieces_of_any_size_match_token_by_token(model, sinks, window, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, 5 * (sinks + window)).tolist()
    ref = reference_logits(model, tokens, sinks, window)
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=sinks, window=window),
                        piece=int(rng.integers(1, 3 * window)))
    state = mem.start(1)
    got = []
    for a, b in random_pieces(rng, len(tokens), 2 * window + 7):
        got.append(mem.feed(state, [tokens[a:b]], all_logits=True)[0])
    got = np.concatenate(got)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)
    assert int(state.seen[0]) == len(tokens)
    assert int(state.lengths()[0]) == sinks + window  # what the last token's window holds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_rows_of_unequal_lengths_match_each_row_alone(model, seed):
    rng = np.random.default_rng(seed)
    sinks, window = 4, 14
    B = 3
    streams = [rng.integers(0, VOCAB, int(rng.integers(40, 120))).tolist() for _ in range(B)]
    refs = [reference_logits(model, s, sinks, window) for s in streams]
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=sinks, window=window))
    state = mem.start(B)
    fed = [0] * B
    while any(f < len(s) for f, s in zip(fed, streams)):
        take = [min(len(s) - f, int(rng.integers(0, 30))) for f, s in zip(fed, streams)]
        if not any(take):
            continue
        rows = [s[f:f + t] for s, f, t in zip(streams, fed, take)]
        logits = mem.feed(state, rows)
        for r in range(B):
            if take[r]:
                np.testing.assert_allclose(logits[r], refs[r][fed[r] + take[r] - 1], atol=ATOL, rtol=0)
            fed[r] += take[r]


def test_cached_session_and_rebuild_from_history_agree(model):
    """A conversation continued from its cached state == the same history fed from scratch."""
    rng = np.random.default_rng(7)
    sinks, window = 4, 20
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=sinks, window=window))
    cached = mem.start(1)
    history: list[int] = []
    for turn in range(8):
        message = rng.integers(0, VOCAB, int(rng.integers(5, 40))).tolist()
        history += message
        logits = mem.feed(cached, [message])
        rebuilt = mem.start(1)
        logits_rebuilt = mem.feed(rebuilt, [history])
        np.testing.assert_allclose(logits, logits_rebuilt, atol=ATOL, rtol=0, err_msg=f"turn {turn}")
        reply = []
        for _ in range(6):  # greedy reply, decoded on both and compared token by token
            a, b = int(logits[0].argmax()), int(logits_rebuilt[0].argmax())
            assert a == b, f"turn {turn}: greedy replies diverge"
            reply.append(a)
            logits, logits_rebuilt = mem.feed(cached, [[a]]), mem.feed(rebuilt, [[a]])
        history += reply
    assert int(cached.evicted[0]) > 3 * window


def test_recompute_row_is_the_same_alone_and_batched(model):
    """recompute, chunk > 1: one row filling its window must not cut its neighbours."""
    rng = np.random.default_rng(3)
    cfg = MemoryConfig("recompute", window=24, chunk=6)
    backend = TorchBackend(model)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (50, 5, 23)]
    steps = 30

    def run(rows):
        mem = ContextMemory(backend, cfg)
        state = mem.start(len(rows))
        logits = mem.feed(state, rows)
        out = [logits]
        for _ in range(steps):
            logits = mem.feed(state, logits.argmax(-1)[:, None])
            out.append(logits)
        return np.stack(out, axis=1)  # (B, steps + 1, V)

    together = run(prompts)
    for r, p in enumerate(prompts):
        alone = run([p])[0]
        np.testing.assert_allclose(together[r], alone, atol=ATOL, rtol=0, err_msg=f"row {r}")


def test_multi_token_feed_to_padded_rows_does_not_over_evict(model):
    """A row fed fewer tokens than its batch neighbour keeps its own window."""
    sinks, window = 2, 10
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=sinks, window=window))
    state = mem.start(2)
    mem.feed(state, [list(range(1, 13)), list(range(1, 13))])
    mem.feed(state, [list(range(20, 29)), [40]])
    assert state.lengths().tolist() == [sinks + window, sinks + window]
    assert state.seen.tolist() == [21, 13]
    assert state.kept_tokens(1) == [1, 2] + list(range(4, 13)) + [40]
