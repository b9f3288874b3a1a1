"""`sample_rows` picks a batch's tokens at once and must pick, row for row, exactly what each row's own
Sampler picks: the same token for the same seed, step after step (the same draws from each row's
generator), whatever the mix of settings, vocabulary sizes and non-finite values. No tolerance."""
from __future__ import annotations

import numpy as np
import pytest

from ctxmem.sampling import GenerationConfig, NonFiniteLogitsError, Sampler, batchable, sample_rows

SETTINGS = [
    {"temperature": 0.0},
    {"temperature": 0.0, "top_p": 0.5, "top_k": 3},  # greedy: top-k and top-p do not matter
    {"temperature": 1.0},
    {"temperature": 0.7},
    {"temperature": 2.5},
    {"temperature": 1e-30},  # greedy in the limit
    {"temperature": 1.0, "top_k": 8},  # each of these goes through its own Sampler
    {"temperature": 1.3, "top_p": 0.9},
    {"temperature": 0.0, "repetition_penalty": 1.5},
    {"temperature": 1.0, "repetition_penalty": 1.2},
]


def batch_logits(rng, batch: int, vocab: int, step: int) -> np.ndarray:
    x = (rng.normal(0, 3, (batch, vocab)) * (1 if step % 2 else 20)).astype(np.float32)  # (B, V)
    x[:, rng.integers(0, vocab, 3)] = -1e30 if step % 3 == 0 else x[:, :1]  # zero-probability tokens, ties
    if step % 4 == 1:  # a few rows with NaN / inf / a whole row non-finite
        x[rng.integers(0, batch), rng.integers(0, vocab)] = [np.nan, np.inf, -np.inf][step % 3]
        if step % 8 == 1:
            x[rng.integers(0, batch)] = np.nan
    return x


@pytest.mark.parametrize("vocab", [2, 7, 260, 4099, 16384, 32000])  # 16384: chunks of 2 rows; 32000: greedy only
def test_a_batch_picks_what_each_rows_sampler_picks(vocab):
    rng = np.random.default_rng(vocab)
    batch = 24
    configs = [GenerationConfig(seed=100 + i, **SETTINGS[(i * 7 + vocab) % len(SETTINGS)]) for i in range(batch)]
    alone = [Sampler(c) for c in configs]
    together = [Sampler(c) for c in configs]
    history = [1, 0, 1]
    batched = 0
    for step in range(12):
        x = batch_logits(rng, batch, vocab, step)
        rows = [None if (i + step) % 5 == 0 else s for i, s in enumerate(together)]  # some rows skipped
        picks = sample_rows(rows, x)
        for i, (s, pick) in enumerate(zip(rows, picks)):
            if s is None:
                assert pick == -1
                continue
            try:
                want = alone[i](x[i], history)
            except NonFiniteLogitsError:
                want = None
            if pick < 0:  # left to the row's own Sampler: what the scheduler and Generator then call
                assert not batchable(s.config) or not np.isfinite(x[i]).all() or pick == -1
                try:
                    pick = s(x[i], history)
                except NonFiniteLogitsError:
                    pick = None
            else:
                batched += 1
                assert batchable(s.config)
            assert pick == want, (vocab, step, i, configs[i])
    assert batched > 30  # the batched path ran, not only the per-row one


def test_only_plain_rows_are_batchable_and_a_kind_of_one_row_is_left_to_its_sampler():
    assert batchable(GenerationConfig(temperature=0.0, top_k=5, top_p=0.3))
    assert batchable(GenerationConfig(temperature=0.8))
    assert not batchable(GenerationConfig(temperature=0.8, top_k=5))
    assert not batchable(GenerationConfig(temperature=0.8, top_p=0.95))
    assert not batchable(GenerationConfig(repetition_penalty=1.1))
    x = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32)
    one_each = [Sampler(GenerationConfig()), Sampler(GenerationConfig(temperature=1.0, seed=1)), None]
    assert sample_rows(one_each, x) == [-1, -1, -1]
    two_greedy = [Sampler(GenerationConfig()), Sampler(GenerationConfig()), None]
    assert sample_rows(two_greedy, x) == [int(x[0].argmax()), int(x[1].argmax()), -1]
