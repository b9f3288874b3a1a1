"""runtime_config.json is validated by pydantic: unknown keys and values of the wrong type are
refused with a RuntimeConfigError that names the key and says to re-run the export."""
from __future__ import annotations

import json

import pytest

from ctxmem.config import preset
from ctxmem.export.contract import ExportContract
from ctxmem.export.errors import ExportError, RuntimeConfigError
from ctxmem.export.runtime import RUNTIME_CONFIG, RuntimeConfig
from ctxmem.memory import MemoryConfig


def _written(tmp_path, **changes) -> dict:
    """A valid runtime config as `ctxmem export` writes it, with some keys changed, on disk."""
    cfg = preset("tiny", vocab_size=263)
    config = RuntimeConfig(model=cfg.to_dict(), contract=ExportContract.for_model(cfg).to_dict(),
                           memory=MemoryConfig("sink", window=60, sinks=4).to_dict(), opset=18)
    data = {**config.to_dict(), **changes}
    (tmp_path / RUNTIME_CONFIG).write_text(json.dumps(data))
    return data


def test_a_written_config_loads_back_unchanged_with_its_keys_in_file_order(tmp_path):
    data = _written(tmp_path)
    loaded = RuntimeConfig.load(tmp_path)
    assert loaded.to_dict() == data and list(loaded.to_dict()) == list(data)
    assert loaded.variant == "fp32" and loaded.files["model"] == "model.onnx"


def test_an_unknown_key_is_refused_by_name(tmp_path):
    _written(tmp_path, windw=64)
    with pytest.raises(RuntimeConfigError, match=r"unknown keys \['windw'\].*re-run `ctxmem export") as err:
        RuntimeConfig.load(tmp_path)
    assert isinstance(err.value, ExportError)


@pytest.mark.parametrize("key,value,says", [
    ("opset", "18", "Input should be a valid integer"),  # not coerced from a string
    ("opset", 18.0, "Input should be a valid integer"),
    ("variant", "int2", "Input should be 'fp32', 'int8', 'int4' or 'fp16'"),
    ("memory", [60, 4], "Input should be a valid dictionary"),
    ("created_at", 1700000000, "Input should be a valid string"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, key, value, says):
    _written(tmp_path, **{key: value})
    with pytest.raises(RuntimeConfigError, match=rf"key '{key}': {says}"):
        RuntimeConfig.load(tmp_path)


def test_a_wrong_value_inside_a_section_names_the_nested_key(tmp_path):
    _written(tmp_path, files={"model": "model.onnx", "tokenizer": 7})
    with pytest.raises(RuntimeConfigError, match=r"key 'files\.tokenizer': Input should be a valid string"):
        RuntimeConfig.load(tmp_path)


def test_missing_keys_are_listed(tmp_path):
    data = _written(tmp_path)
    del data["opset"], data["memory"]
    (tmp_path / RUNTIME_CONFIG).write_text(json.dumps(data))
    with pytest.raises(RuntimeConfigError, match=r"lacks \['memory', 'opset'\]|lacks \['opset', 'memory'\]"):
        RuntimeConfig.load(tmp_path)
