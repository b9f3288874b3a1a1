"""The export contract and the runtime config, without exporting anything (fast)."""
from __future__ import annotations

import json

import pytest
import torch

from ctxmem.config import preset
from ctxmem.memory import MemoryConfig
from ctxmem.export.contract import EXAMPLE_PAST, ExportContract, past_names, present_names
from ctxmem.export.errors import RuntimeConfigError
from ctxmem.export.runtime import RUNTIME_CONFIG, RuntimeConfig


def test_contract_names_inputs_and_outputs_per_layer_in_cache_order():
    c = ExportContract.for_model(preset("tiny"))
    assert c.version == 4 and c.keys_rotated and c.gives_queries  # keys cached rotated: no key_positions input
    assert c.input_names == ["input_ids", "positions", "allowed", "sink_positions", "sink_keys",
                             "past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    traced = ExportContract.for_model(preset("tiny"), version=2)  # the traced graph's: keys before rotation
    assert traced.input_names[:3] == ["input_ids", "positions", "key_positions"] and not traced.keys_rotated
    assert c.output_names == ["logits", "present_key_0", "present_value_0", "present_key_1", "present_value_1",
                              "query_0", "query_1"]  # v4: each layer's queries before rotation (retrieve)
    assert {t.name: t.dims for t in c.outputs()}["query_1"] == ("batch", "new_tokens", 96)  # (B, T, H*D)
    v3 = ExportContract.for_model(preset("tiny"), version=3)  # an older export: every policy but retrieve
    assert v3.output_names == c.cache_output_names == c.output_names[:5] and not v3.gives_queries
    assert past_names(1) == ["past_key_0", "past_value_0"] and present_names(1) == ["present_key_0", "present_value_0"]


def test_contract_gives_the_mask_its_own_dynamic_dimension_and_fixes_heads_and_head_dim():
    cfg = preset("tiny")
    c = ExportContract.for_model(cfg)
    dims = {t.name: t.dims for t in c.inputs()}
    assert dims["sink_keys"] == ("batch", "mask_len")
    assert {t.name: t.dims for t in ExportContract.for_model(cfg, version=2).inputs()}["key_positions"] == (
        "batch", "mask_len")
    assert dims["allowed"] == ("batch", "new_tokens", "mask_len")
    assert dims["past_key_0"] == ("batch", cfg.n_kv_heads, "past_len", cfg.head_dim)
    assert c.output_shapes(batch=3, new=1, past=0)["present_value_1"] == (3, cfg.n_kv_heads, 1, cfg.head_dim)
    assert c.output_shapes(batch=2, new=4, past=5)["logits"] == (2, 4, cfg.vocab_size)
    assert EXAMPLE_PAST >= 2  # torch.export specialises sizes 0 and 1


def test_contract_round_trips_through_its_dict_and_rejects_other_cache_dtypes():
    c = ExportContract.for_model(preset("tiny"), cache_dtype="float16")
    assert ExportContract.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="cache_dtype"):
        ExportContract(2, 2, 24, 263, cache_dtype="int8")


def test_a_contract_this_ctxmem_does_not_run_names_the_reexport_command():
    """An export from before contract v2 (or from a newer ctxmem) is refused with the command that
    rewrites it, at load time, not with a graph that crashes on its first call."""
    data = ExportContract.for_model(preset("tiny")).to_dict()
    for version in (None, 1, 5):
        old = {**data, "version": version} if version else {k: v for k, v in data.items() if k != "version"}
        with pytest.raises(ValueError, match=r"re-export it with `ctxmem export --model"):
            ExportContract.from_dict(old)
    with pytest.raises(RuntimeConfigError, match=r"re-export it with `ctxmem export --model"):
        _config(contract={**data, "version": 1})


def test_the_traced_example_scores_sinks_apart_so_the_graph_holds_both_paths():
    """The graph is traced once: its example must take the sink path, or the exporter would bake in
    an example where the sink query positions equal the ordinary ones and prune nothing visible."""
    c = ExportContract.for_model(preset("tiny"), version=2)
    ids, positions, key_positions, allowed, sink_positions, sink_keys, past = c.example_inputs()
    assert ids.shape == positions.shape == sink_positions.shape
    assert allowed.shape == (ids.shape[0], ids.shape[1], key_positions.shape[1])
    assert sink_keys.any() and not torch.equal(sink_positions, positions)
    assert len(past) == c.n_layers and past[0][0].shape[2] == EXAMPLE_PAST


def _config(**changes) -> RuntimeConfig:
    cfg = preset("tiny", vocab_size=263)
    base = dict(model=cfg.to_dict(), contract=ExportContract.for_model(cfg).to_dict(),
                memory=MemoryConfig("sink", window=60, sinks=4).to_dict(), opset=18)
    return RuntimeConfig(**{**base, **changes})


def test_runtime_config_round_trips_through_its_file(tmp_path):
    config = _config(source={"run_id": "abc", "val_ppl": 3.5})
    config.save(tmp_path)
    loaded = RuntimeConfig.load(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.memory_config == MemoryConfig("sink", window=60, sinks=4)
    assert loaded.export_contract == ExportContract.for_model(preset("tiny", vocab_size=263))


def test_runtime_config_missing_tells_the_user_to_rerun_export(tmp_path):
    with pytest.raises(RuntimeConfigError, match=r"re-run `ctxmem export"):
        RuntimeConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeConfigError, match="checkpoint, not an export"):
        RuntimeConfig.load(tmp_path)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "JSON object"),
    ('{"model": {}}', "lacks"),
])
def test_runtime_config_that_is_not_valid_is_a_typed_error(tmp_path, content, match):
    (tmp_path / RUNTIME_CONFIG).write_text(content)
    with pytest.raises(RuntimeConfigError, match=match):
        RuntimeConfig.load(tmp_path)


def test_runtime_config_checks_its_sections_agree(tmp_path):
    with pytest.raises(RuntimeConfigError, match="opset"):
        _config(opset=17)
    with pytest.raises(RuntimeConfigError, match="does not match"):
        _config(contract=ExportContract(3, 2, 24, 263, n_heads=4).to_dict())
    with pytest.raises(RuntimeConfigError, match="memory"):
        _config(memory={"policy": "sink", "window": 1000, "sinks": 4, "chunk": 1})
