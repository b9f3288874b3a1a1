"""The sampler never lets inf/NaN through: extreme-but-valid settings saturate to the right limit, and
non-finite logits are handled deterministically per row (greedy over the finite values, or a clear
error when there are none)."""
from __future__ import annotations

import numpy as np
import pytest

from ctxmem.sampling import GenerationConfig, GenerationConfigError, NonFiniteLogitsError, Sampler

V = 50


def logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, V).astype(np.float32)


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-30])
def test_a_tiny_temperature_is_greedy_not_nan(temperature):
    x = logits()
    for seed in range(5):
        sampler = Sampler(GenerationConfig(temperature=temperature, seed=seed))
        assert sampler(x) == int(np.argmax(x))


@pytest.mark.parametrize("top_p", [1e-12, 1e-300])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p):
    x = logits(1)
    assert Sampler(GenerationConfig(temperature=1.0, top_p=top_p, seed=0))(x) == int(np.argmax(x))


@pytest.mark.parametrize("top_k", [1, V, V + 1, 2**62])
def test_any_top_k_gives_a_token_in_the_vocabulary(top_k):
    x = logits(2)
    token = Sampler(GenerationConfig(temperature=2.0, top_k=top_k, seed=3))(x)
    assert 0 <= token < V
    if top_k == 1:
        assert token == int(np.argmax(x))


@pytest.mark.parametrize("penalty", [1e-300, 1e-30, 1e30, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1.0, 1e-300])
def test_extreme_repetition_penalties_saturate(penalty, temperature):
    x = logits(3)
    x[7] = 5.0
    x[9] = -5.0
    history = [7, 9, 7, V + 3]  # an id outside the vocabulary is ignored, not an IndexError
    token = Sampler(GenerationConfig(temperature=temperature, repetition_penalty=penalty, seed=1))(x, history)
    assert 0 <= token < V
    if penalty < 1 and temperature <= 1e-300 or penalty < 1 and temperature == 0:
        assert token == 7  # a penalty below 1 rewards the seen positive logit without bound
    if penalty > 1 and temperature == 0:
        assert token not in (7, 9)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_non_finite_logits_fall_back_to_greedy_over_the_finite_values(bad, temperature):
    x = logits(4)
    best = int(np.argmax(x))
    x[(best + 1) % V] = bad
    x[(best + 2) % V] = np.nan
    picks = {Sampler(GenerationConfig(temperature=temperature, seed=s))(x) for s in range(4)}
    assert picks == {best}


def test_a_row_with_no_finite_logit_fails_with_a_clear_error():
    x = np.full(V, np.nan, dtype=np.float32)
    x[3] = np.inf
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite"):
        Sampler(GenerationConfig(temperature=1.0, seed=0))(x)


def test_ordinary_sampling_still_follows_the_seed_and_distribution():
    x = logits(5)
    a = [Sampler(GenerationConfig(temperature=1.0, seed=11))(x) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same first draw
    sampler = Sampler(GenerationConfig(temperature=1.0, seed=12))
    draws = np.bincount([sampler(x) for _ in range(4000)], minlength=V) / 4000
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    assert np.abs(draws - p).max() < 0.05


@pytest.mark.parametrize("seed", [-1, -(2**63), 1.5, True, "3"])
def test_a_seed_that_is_not_a_non_negative_integer_is_refused_by_name(seed):
    with pytest.raises(GenerationConfigError, match="seed"):
        GenerationConfig(seed=seed)


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**63])  # a batch's rows use seed + row
def test_large_seeds_are_accepted(seed):
    assert 0 <= Sampler(GenerationConfig(temperature=1.0, seed=seed))(logits()) < V


def test_greedy_picks_the_first_largest_finite_logit_whatever_the_non_finite_values():
    """Greedy takes a fast path on the raw float32 logits; every mix of -inf, +inf and NaN must still
    give the rule's answer: the first maximum over the finite values (or the clear error)."""
    rng = np.random.default_rng(0)
    sampler = Sampler(GenerationConfig(temperature=0.0))
    for trial in range(300):
        logits = rng.normal(size=64).astype(np.float32)
        logits[rng.integers(0, 64, size=3)] = logits.max()  # ties: the first one wins
        for bad in (-np.inf, np.inf, np.nan):
            logits[rng.random(64) < rng.random() * 0.3] = bad
        finite = np.isfinite(logits)
        if not finite.any():
            with pytest.raises(NonFiniteLogitsError):
                sampler(logits)
            continue
        want = int(np.argmax(np.where(finite, logits.astype(np.float64), -np.inf)))
        assert sampler(logits) == want, trial
        assert sampler(logits, history=[]) == want  # an empty history takes the same path


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 8},
                                      {"temperature": 1.3, "top_p": 0.9}, {"temperature": 2.0, "repetition_penalty": 1.5}])
def test_the_draw_is_generator_choice_token_for_token(settings):
    """The sampler draws with a cumulative sum and one uniform instead of Generator.choice(V, p=...)
    (whose per-call checks of p cost more than the rest of a step's sampling). Exact parity, no tolerance:
    for the same seed and distribution it must pick what choice picks - the same seed gives the same
    text as before the change. The distribution is rebuilt here the way the sampler builds it."""
    rng = np.random.default_rng(7)
    history = [1, 2, 3, 5, 8]
    for seed in range(20):
        sampler = Sampler(GenerationConfig(seed=seed, **settings))
        reference = np.random.default_rng(seed)
        for step in range(25):
            x = (rng.normal(0, 3, V) * (1 if step % 2 else 20)).astype(np.float32)
            x[rng.integers(0, V, 5)] = -1e30 if step % 3 == 0 else x[0]  # zero-probability tokens, ties
            got = sampler(x, history)
            z = x.astype(np.float64)
            seen = np.array(history)
            if settings.get("repetition_penalty", 1.0) != 1.0:
                r = settings["repetition_penalty"]
                z[seen] = np.where(z[seen] > 0, z[seen] / r, z[seen] * r)
            with np.errstate(over="ignore", under="ignore"):
                z = (z - z.max()) / settings["temperature"]
                if settings.get("top_k"):
                    z[z < np.partition(z, -settings["top_k"])[-settings["top_k"]]] = -np.inf
                p = np.exp(z)
            p /= p.sum()
            if settings.get("top_p", 1.0) < 1.0:
                order = np.argsort(-p, kind="stable")
                cut = int(np.searchsorted(np.cumsum(p[order]), settings["top_p"])) + 1
                p = np.where(np.isin(np.arange(V), order[:cut]), p, 0.0)
                p /= p.sum()
            assert got == int(reference.choice(V, p=p)), (seed, step)
