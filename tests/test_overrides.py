"""The one override path: MemoryConfig.with_overrides and GenerationConfig.with_overrides.

Every caller (core CLI, MLflow pyfunc, server) goes through these, so the semantics are tested once
here: None = not set, 0 is a value, a policy change starts from that policy's defaults, and setting
only sinks (or only window) re-derives the other from the artifact's value."""
import pytest

from ctxmem.memory import MemoryConfig, MemoryConfigError
from ctxmem.sampling import GenerationConfig, GenerationConfigError

CTX = 128


def test_nothing_set_keeps_the_artifacts_policy():
    saved = MemoryConfig(policy="sink", sinks=4, window=44)
    assert saved.with_overrides(CTX) == saved.resolve(CTX)
    assert saved.with_overrides(CTX, policy=None, window=None, sinks=None, chunk=None) == saved.resolve(CTX)


def test_zero_is_a_value_not_unset():
    got = MemoryConfig(policy="sink", sinks=4, window=44).with_overrides(CTX, sinks=0)
    assert (got.sinks, got.window) == (0, 44)
    with pytest.raises(MemoryConfigError, match="window"):
        MemoryConfig(policy="sink").with_overrides(CTX, window=0)


def test_only_sinks_rederives_the_window():
    # derived default window (context - 4) does not fit 8 sinks: shrunk to what fits, not a 400
    got = MemoryConfig(policy="sink").resolve(CTX).with_overrides(CTX, sinks=8)
    assert (got.sinks, got.window) == (8, CTX - 8)
    # an explicit window that still fits is kept
    got = MemoryConfig(policy="sink", sinks=4, window=44).with_overrides(CTX, sinks=8)
    assert (got.sinks, got.window) == (8, 44)


def test_only_window_rederives_the_sinks():
    got = MemoryConfig(policy="sink", sinks=4, window=44).with_overrides(CTX, window=100)
    assert (got.sinks, got.window) == (4, 100)
    got = MemoryConfig(policy="sink", sinks=4, window=44).with_overrides(CTX, window=CTX - 1)
    assert (got.sinks, got.window) == (1, CTX - 1)


def test_policy_change_starts_from_that_policys_defaults():
    got = MemoryConfig(policy="sink", sinks=4, window=44).with_overrides(CTX, policy="recompute")
    assert (got.policy, got.window, got.chunk, got.sinks) == ("recompute", CTX, 1, 0)
    got = MemoryConfig(policy="recompute", window=64, chunk=16).with_overrides(CTX, window=8)
    assert (got.window, got.chunk) == (8, 7)


def test_bad_overrides_name_the_setting():
    with pytest.raises(MemoryConfigError, match="unknown memory settings"):
        MemoryConfig().with_overrides(CTX, windw=4)
    with pytest.raises(MemoryConfigError, match="sinks must be an integer"):
        MemoryConfig(policy="sink").with_overrides(CTX, sinks="4")
    with pytest.raises(MemoryConfigError, match="unknown memory policy"):
        MemoryConfig().with_overrides(CTX, policy="lru")
    with pytest.raises(MemoryConfigError, match="context"):
        MemoryConfig(policy="sink").with_overrides(CTX, sinks=4, window=CTX)


def test_generation_overrides():
    saved = GenerationConfig(max_new_tokens=32, temperature=0.7, seed=3)
    assert saved.with_overrides(temperature=None, seed=None) == saved
    got = saved.with_overrides(temperature=0.0, top_k=5)
    assert (got.temperature, got.top_k, got.max_new_tokens, got.seed) == (0.0, 5, 32, 3)
    with pytest.raises(GenerationConfigError, match="top_p"):
        saved.with_overrides(top_p=0.0)
    with pytest.raises(GenerationConfigError, match="unknown generation settings"):
        saved.with_overrides(temprature=1.0)


def test_full_takes_no_window_instead_of_dropping_it_silently():
    with pytest.raises(MemoryConfigError, match="policy 'full'"):
        MemoryConfig().with_overrides(CTX, window=64)
    with pytest.raises(MemoryConfigError, match="policy 'full'"):
        MemoryConfig(policy="sink").with_overrides(CTX, policy="full", sinks=2)
    assert MemoryConfig(policy="sink").with_overrides(CTX, policy="full").window == CTX
