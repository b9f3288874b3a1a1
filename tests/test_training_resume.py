"""The trust boundary of --resume: a DeepSpeed checkpoint is pickles, and DeepSpeed's loader (and
ds_to_universal) unpickle them with torch.load(weights_only=False), which runs whatever code a
pickle names. So a checkpoint is verified against its sha256 manifest first, and refused - naming
the file and what to do - before anything reads it. These tests need no DeepSpeed run: the
checkpoint is a hostile pickle with a manifest written by `checkpoints.write_manifest`.

(Resuming on another number of ranks runs end to end in test_training_run.py and
test_training_readme.py.)
"""
from __future__ import annotations

import pathlib
import pickle

import pytest
import torch

from ctxmem.cli import main
from ctxmem.training import checkpoints as ckpt
from ctxmem.training.data import prepare
from helpers_training import TINY, tree_state, write_text_corpus

MODEL_STATES = "mp_rank_00_model_states.pt"


class _Payload:
    """Unpickling it writes a file: what a hostile checkpoint could do instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "unpickled")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare([str(write_text_corpus(tmp_path_factory.mktemp("corpus") / "c"))],
                   tmp_path_factory.mktemp("data") / "d", progress=False).out


@pytest.fixture
def hostile_run(tmp_path):
    """OUT/checkpoints/step_0000004 whose model-states file runs code when unpickled, listed with
    its true sha256 in the manifest; returns (out, the file, the marker it would write)."""
    out, marker = tmp_path / "run", tmp_path / "marker"
    root = out / ckpt.CHECKPOINTS
    (root / ckpt.tag_for(4)).mkdir(parents=True)
    path = root / ckpt.tag_for(4) / MODEL_STATES
    path.write_bytes(pickle.dumps({"module": _Payload(marker), "padding": "x" * 64}))
    ckpt.write_manifest(root, ckpt.tag_for(4), {"step": 4, "world_size": 2, "zero_stage": 2})
    return out, path, marker


@pytest.fixture
def no_torch_load(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or pytest.fail("torch.load was called"))
    return calls


def _resume(data, out, *args):
    return main(["train", "--config", str(TINY), f"data.path={data}", f"out={out}", "steps=12", "--resume", *args])


def test_a_checkpoint_one_byte_off_its_manifest_is_refused_before_it_is_unpickled(
        data, hostile_run, no_torch_load, capsys):
    out, path, marker = hostile_run
    blob = bytearray(path.read_bytes())
    blob[blob.index(b"x" * 64) + 10] ^= 0x01  # one flipped byte in the padding: still a working pickle
    path.write_bytes(bytes(blob))
    before = tree_state(out)
    assert _resume(data, out) == 1
    err = capsys.readouterr().err
    assert f"{path} is corrupt (its sha256 differs from the manifest" in err
    assert "was not loaded" in err and "--overwrite" in err and "Traceback" not in err
    assert not marker.exists() and no_torch_load == [] and tree_state(out) == before
    pickle.loads(path.read_bytes())  # what loading it would have done
    assert marker.read_text() == "unpickled"


def test_a_file_the_manifest_does_not_list_is_refused(data, hostile_run, no_torch_load, capsys):
    out, path, marker = hostile_run
    # DeepSpeed finds optimizer shards by glob: an added one would be unpickled unless refused
    planted = path.parent / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    planted.write_bytes(path.read_bytes())
    assert _resume(data, out, str(path.parent)) == 1
    err = capsys.readouterr().err
    assert f"{planted} is not in the checkpoint's manifest" in err and not marker.exists()


def test_a_latest_file_pointing_outside_its_folder_is_refused(data, hostile_run, no_torch_load, capsys):
    out, _, _ = hostile_run
    (out / ckpt.CHECKPOINTS / ckpt.LATEST).write_text("../../elsewhere")
    assert _resume(data, out) == 1
    assert "not a checkpoint folder beside it" in capsys.readouterr().err
