"""Checkpoint directories: round trip, and clear errors for every way one can be broken."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ctxmem.checkpoint import CheckpointError, load_model


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, dst)
    return dst


def test_checkpoint_round_trips_bit_exactly(tiny_checkpoint):
    a, b = load_model(tiny_checkpoint), load_model(tiny_checkpoint)
    assert a.lm_head.weight is a.tok_emb.weight  # tied embeddings stay tied after loading
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_missing_tensor_is_named(copy):
    sd = load_file(copy / "model.safetensors")
    del sd["blocks.1.ffn.w_up.weight"]
    save_file(sd, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks tensors \['blocks.1.ffn.w_up.weight'\]"):
        load_model(copy)


def test_wrong_shape_is_named_with_both_shapes(copy):
    sd = load_file(copy / "model.safetensors")
    sd["norm.weight"] = torch.ones(7)
    save_file(sd, copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"norm.weight has shape \(7,\), config.json implies \(96,\)"):
        load_model(copy)


def test_corrupt_safetensors_file_is_reported_not_crashed(copy):
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:20] + b"garbage" + data[40:200])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(copy)


def test_missing_pieces_are_named(copy, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_model(tmp_path / "nowhere")
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="needs config.json"):
        load_model(copy)


def test_config_with_bad_values_is_refused(copy):
    (copy / "config.json").write_text('{"format": "ctxmem", "d_model": 96, "n_heads": 5}')
    with pytest.raises(CheckpointError, match="n_heads=5 does not divide d_model=96"):
        load_model(copy)
