"""The export stage's callers of the one override path: `ctxmem export --policy/--window/--sinks/
--chunk` and the MLflow pyfunc's params both go through MemoryConfig.with_overrides /
GenerationConfig.with_overrides (the semantics themselves are tested in test_overrides.py)."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from ctxmem.memory import MemoryConfig, MemoryConfigError


def _flags(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"policy": None, "window": None, "sinks": None, "chunk": None, "budget": None,
                                 "store": None, **given})


def test_export_flags_start_from_the_checkpoints_saved_policy(tiny_checkpoint, tmp_path):
    import shutil

    from ctxmem.config import ModelConfig
    from ctxmem.export.cli import _memory

    ctx = ModelConfig.load(tiny_checkpoint / "config.json").max_seq_len
    assert _memory(_flags(), tiny_checkpoint) is None  # nothing set: export writes the saved policy
    # the checkpoint saved nothing (policy full): --window alone means a sink window, as documented
    assert _memory(_flags(window=44), tiny_checkpoint) == MemoryConfig("sink", window=44, sinks=4, chunk=1)
    with pytest.raises(MemoryConfigError, match="policy 'full'"):  # full has no window: said, not dropped
        _memory(_flags(policy="full", window=44), tiny_checkpoint)
    assert _memory(_flags(policy="full"), tiny_checkpoint) == MemoryConfig("full", window=ctx, sinks=0)

    saved = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (saved / "generation_config.json").write_text(json.dumps(
        {"memory": {"policy": "recompute", "window": 64, "chunk": 16}}))
    # unset flags keep the saved values; a window alone re-derives only what no longer fits
    assert _memory(_flags(window=32), saved) == MemoryConfig("recompute", window=32, sinks=0, chunk=16)
    assert _memory(_flags(chunk=8), saved) == MemoryConfig("recompute", window=64, sinks=0, chunk=8)
    with pytest.raises(MemoryConfigError, match="window"):
        _memory(_flags(policy="sink", window=ctx + 1), saved)
    # retrieve: its budget and store written to the runtime config; a budget without it is refused
    got = _memory(_flags(policy="retrieve", window=32, budget=16, store=512), saved)
    assert (got.policy, got.window, got.budget, got.store) == ("retrieve", 32, 16, 512)
    assert got.to_dict()["store"] == 512
    with pytest.raises(MemoryConfigError, match="choose policy 'retrieve'"):
        _memory(_flags(budget=16), saved)


def test_pyfunc_sentinels_mean_unset_and_everything_else_is_a_value():
    from ctxmem.export.pyfunc import UNSET, requested, signature

    defaults = {p.name: p.default for p in signature().params.params}
    assert {k: defaults[k] for k in UNSET} == UNSET  # the schema's defaults are exactly the sentinels
    assert requested(defaults) == {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0,
                                   "seed": None, "policy": None, "window": None, "sinks": None}
    assert requested(None) == dict.fromkeys(requested(defaults))
    got = requested({"sinks": np.int64(0), "seed": 0, "window": 12, "policy": "sink"})
    assert (got["sinks"], got["seed"], got["window"], got["policy"]) == (0, 0, 12, "sink")  # 0 is a value
    assert type(got["sinks"]) is int


def test_pyfunc_predict_applies_params_through_the_core_override_path(tiny_export):
    from ctxmem.export.pyfunc import OnnxGeneratorModel, signature
    from ctxmem.export.runtime import load_onnx_generator

    model = OnnxGeneratorModel()
    model.generator = load_onnx_generator(tiny_export)  # what load_context does with the artifact
    generator, backend = model.generator, model.generator.backend
    defaults = {p.name: p.default for p in signature().params.params}  # MLflow fills these in
    prompt = "the sink keeps the first token and " * 3

    def direct(memory: MemoryConfig | None, **gen) -> str:
        config = generator.defaults.with_overrides(**{"max_new_tokens": 64, "temperature": 0.0, "top_k": 0,
                                                      "top_p": 1.0, **gen})
        return generator.generate([prompt], config, memory)[0].text

    same = model.predict(None, np.array([prompt]), params=defaults)["text"][0]
    assert same == direct(None)
    params = {**defaults, "sinks": 0, "max_new_tokens": 40}  # sinks only: the window is re-derived
    window_only = generator.memory_config.with_overrides(backend.max_seq_len, backend.uses_rope, sinks=0)
    assert window_only.sinks == 0 and window_only.window == generator.memory_config.window
    assert model.predict(None, np.array([prompt]), params=params)["text"][0] == direct(window_only, max_new_tokens=40)
    with pytest.raises(MemoryConfigError, match="window"):
        model.predict(None, np.array([prompt]), params={**defaults, "policy": "sink", "window": 10_000})
