"""Training with attention sinks (model.sink: token | learned), the two sample regimes
(data.samples: crop | document) and the memory evaluation at the end of a run (eval.memory).

The slow tests train the `tiny` preset for a few steps under DeepSpeed ZeRO on CPU
(infra/train-tiny.yaml, as tests/test_training_run.py), load the final checkpoint and export it to
ONNX with the usual verification."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctxmem.tokenizer import ByteTokenizer
from ctxmem.training.config import TrainConfig
from ctxmem.training.data import IGNORE, Split, TokenData, prepare, sample_prefix
from ctxmem.training.errors import DataError, TrainConfigError
from helpers_export import new_sqlite_store
from helpers_training import TINY, train_inprocess


def tiny(*overrides: str) -> TrainConfig:
    return TrainConfig.load(TINY, list(overrides))


# ---- config ----------------------------------------------------------------------------------------
def test_a_token_sink_takes_one_id_past_the_tokenizer_and_learned_adds_no_row():
    tok = ByteTokenizer()
    for vocab in (tok.vocab_size, 264):  # 264 is a multiple of vocab_multiple 8: the sink still gets its own row
        model = tiny("model.sink=token").model.build(vocab)
        assert model.sink == "token" and model.sink_token_id == model.vocab_size - 1 >= vocab
    assert tiny("model.sink=token").model.build(264).vocab_size == 272
    learned = tiny("model.sink=learned").model.build(264)
    assert learned.sink == "learned" and learned.vocab_size == 264 and learned.sink_token_id is None
    assert tiny().model.build(264).sink == "none"


def test_bad_sink_samples_and_memory_settings_are_refused_naming_the_key():
    with pytest.raises(TrainConfigError, match=r"model\.sink"):
        tiny("model.sink=both")
    with pytest.raises(TrainConfigError, match=r"model\.overrides\.sink cannot be set: use model\.sink"):
        tiny("model.overrides.sink=token")
    with pytest.raises(TrainConfigError, match=r"data\.samples"):
        tiny("data.samples=shuffle")
    with pytest.raises(TrainConfigError, match=r"eval\.memory: window \(126\) \+ sinks \(4\) exceeds"):
        tiny("eval.memory.enabled=true", "eval.memory.window=126")
    with pytest.raises(TrainConfigError, match=r"eval\.memory\.sinks must be >= 0"):
        tiny("eval.memory.sinks=-1")


def test_eval_memory_true_is_short_for_enabled_with_the_defaults():
    cfg = tiny("eval.memory=true")
    assert cfg.eval.memory.enabled and cfg.eval.memory.sinks == 4 and cfg.eval.memory.window is None
    assert not tiny().eval.memory.enabled
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg  # round-trips as a section


# ---- samples ---------------------------------------------------------------------------------------
EOS = 9


def documents(*lengths: int) -> np.ndarray:
    """Documents of the given lengths (EOS included), content ids 100, 101, ... then EOS."""
    return np.concatenate([np.r_[100 + np.arange(n - 1), EOS] for n in lengths]).astype(np.uint16)


def test_crop_samples_are_the_consecutive_windows_as_before():
    stream = np.arange(1000).astype(np.uint16)
    split = Split([stream], 32)
    assert split.n_windows == (1000 - 1) // 32
    x, y = split.batch([0, 5])
    assert torch.equal(x[1], torch.arange(160, 192)) and torch.equal(y[1], torch.arange(161, 193))
    assert (y != IGNORE).all()


def test_document_samples_start_with_bos_at_each_document_and_continue_long_ones():
    bos = ByteTokenizer().bos_id
    stream = documents(10, 40, 7, 30)  # starts at 0, 10, 50, 57
    split = Split([stream], 16, sample_prefix("document", None, bos), "document", EOS)
    starts = [0, 10, 10 + 16, 10 + 32, 50, 57, 57 + 16]  # 40 tokens: 3 samples of 16 scored tokens
    x, y = split.batch(range(split.n_windows))
    assert split.n_windows == len(starts) - 1  # the last would run past the shard's end
    assert (x[:, 0] == bos).all()  # every sample: BOS at position 0
    for row, start in enumerate(starts[:-1]):
        assert y[row, 0] == int(stream[start])  # the first target is the first real token
        assert torch.equal(x[row, 1:], torch.from_numpy(stream[start: start + 15].astype(np.int64)))
    assert (y != bos).all() and (y != IGNORE).all()


def test_a_sink_token_starts_every_sample_and_is_never_a_target():
    sink, bos = 271, ByteTokenizer().bos_id
    stream = documents(20, 20, 20, 20)
    crop = Split([stream], 16, sample_prefix("crop", sink, bos), "crop", EOS)
    x, y = crop.batch(range(crop.n_windows))
    assert (x[:, 0] == sink).all() and (y != sink).all() and (y != IGNORE).all()
    assert y[0, 0] == int(stream[0]) and y[1, 0] == int(stream[16])  # 16 scored tokens per sample, no gap
    both = Split([stream], 16, sample_prefix("document", sink, bos), "document", EOS)
    x, y = both.batch(range(both.n_windows))
    assert (x[:, 0] == sink).all() and (x[:, 1] == bos).all()
    assert (y[:, 0] == IGNORE).all()  # the target BOS (part of the fixed prefix) is not scored
    assert (y[:, 1:] != IGNORE).all()
    # 20-token documents, 15 scored tokens per sample: each document in two samples, from its start and 15 on
    assert both._offsets[0][:4].tolist() == [0, 15, 20, 35]
    assert y[:, 1].tolist() == stream[both._offsets[0]].astype(int).tolist() and y[0, 1] == y[2, 1] == 100


def test_document_samples_need_a_bos_and_room_for_stream_tokens():
    with pytest.raises(DataError, match=r"data\.samples=document .* has none"):
        sample_prefix("document", None, None)
    with pytest.raises(DataError, match=r"data\.seq_len=2 leaves no stream tokens"):
        Split([documents(10)], 2, (5, 6), "document", EOS)


def test_a_prepared_folder_samples_both_ways(tmp_path):
    out = tmp_path / "data"
    prepare(["chatterbot"], out, progress=False)
    data = TokenData(out)
    bos, eos = data.tokenizer().bos_id, data.meta["eos_id"]
    doc = data.split("train", 64, sample_prefix("document", None, bos), "document")
    x, _ = doc.batch(range(0, doc.n_windows, 97))
    assert (x[:, 0] == bos).all() and (x[:, 1:] != bos).all()  # BOS only in front: prepare writes none
    train = data.stream("train", 1 << 30)
    starts = {0} | {int(i) + 1 for i in np.flatnonzero(train == eos)}
    first_tokens = [int(o) for o in doc._offsets[0][:50]]
    assert any(o in starts for o in first_tokens) and all(
        o in starts or any(0 < o - s < 10_000 and (o - s) % doc.stride == 0 for s in starts) for o in first_tokens)
    crop = data.split("train", 64)
    assert crop.n_windows == (data.meta["splits"]["train"]["tokens"] - 1) // 64


# ---- DeepSpeed runs, checkpoint, export, memory evaluation -------------------------------------------
@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "data"
    prepare(["chatterbot"], out, progress=False)
    return out


MEMORY = ("eval.memory.enabled=true", "eval.memory.window=48", "eval.memory.sinks=2", "eval.memory.length=600",
          "eval.memory.distances=[48, 96]", "eval.memory.trials=4", "eval.memory.reference_tokens=64")


@pytest.fixture(scope="module")
def token_run(chat_data, tmp_path_factory, mlflow_store_template):
    """sink=token on document samples, ZeRO-2, memory evaluation at the end, MLflow in a SQLite file
    (the project's embedded store; MLflow 3 refuses its plain file store)."""
    root = tmp_path_factory.mktemp("token")
    uri = new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    result = train_inprocess(root / "run", chat_data, "model.sink=token", "data.samples=document", "zero.stage=2",
                             "steps=4", "eval.interval=4", "checkpoint.interval=4", *MEMORY,
                             "tracking.enabled=true", f"tracking.uri={uri}", "tracking.log_checkpoint=false")
    return root / "run", result, uri


@pytest.fixture(scope="module")
def learned_run(chat_data, tmp_path_factory):
    """sink=learned on crops, ZeRO-3 (the head sink logits are partitioned like every parameter)."""
    out = tmp_path_factory.mktemp("learned") / "run"
    return out, train_inprocess(out, chat_data, "model.sink=learned", "zero.stage=3", "steps=4",
                                "eval.interval=4", "checkpoint.interval=4")


def _export_verifies(final, out, sinks: int) -> dict:
    from ctxmem.cli import main

    assert main(["export", "--model", str(final), "--out", str(out), "--policy", "sink", "--window", "60",
                 "--sinks", str(sinks), "--tokens", "16"]) == 0
    report = json.loads((out / "verification.json").read_text())
    assert report["status"] == "passed" and report["greedy"]["identical"]
    return report


@pytest.mark.slow
def test_a_token_sink_model_trains_under_zero_saves_and_exports(token_run, chat_data, tmp_path):
    from ctxmem.checkpoint import load_model
    from ctxmem.export.runtime import OrtBackend

    out, result, _ = token_run
    assert result.status == "completed" and result.consolidated_max_abs_diff == 0.0
    assert np.isfinite(result.val_loss)
    model = load_model(out / "final")
    data = TokenData(chat_data)
    assert model.cfg.sink == "token" and model.cfg.sink_token_id == model.cfg.vocab_size - 1 >= data.vocab_size
    _export_verifies(out / "final", tmp_path / "export", sinks=1)
    assert OrtBackend(tmp_path / "export").sink_token_id == model.cfg.sink_token_id


@pytest.mark.slow
def test_a_learned_sink_model_trains_under_zero3_saves_and_exports(learned_run, tmp_path):
    from ctxmem.checkpoint import load_model

    out, result = learned_run
    assert result.status == "completed" and result.consolidated_max_abs_diff == 0.0
    model = load_model(out / "final")
    assert model.cfg.sink == "learned"
    sinks = torch.stack([b.attn.head_sink for b in model.blocks])
    assert sinks.abs().max() > 0  # trained away from their zero start
    _export_verifies(out / "final", tmp_path / "export", sinks=0)


@pytest.mark.slow
def test_the_memory_evaluation_at_the_end_is_saved_and_logged_to_the_run(token_run):
    from mlflow import MlflowClient

    out, result, uri = token_run
    saved = json.loads((out / "memory_eval" / "memory_eval.json").read_text())
    policies = {(r["policy"], r["sinks"], r["chunk"]) for r in saved["streaming"]}
    assert {("sink", 2, None), ("sink", 0, None), ("recompute", 0, 1), ("full", 0, None)} <= policies
    assert {r["distance"] for r in saved["recall"]} == {48, 96}
    assert all(r["window"] == 48 for r in saved["recall"] if r["policy"] != "full")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["memory_eval"]["metrics"] == result.memory_eval["metrics"]
    run = MlflowClient(uri).get_run(result.mlflow["run_id"])
    logged = run.data.metrics
    assert logged["memory.ppl_beyond_10x.sink2"] == pytest.approx(summary["memory_eval"]["metrics"]["memory.ppl_beyond_10x.sink2"])
    assert "memory.recall.window_only.d96" in logged
    assert run.data.tags["memory_eval.window_resolved"] == "48"
    assert "BOS first" in run.data.tags["memory_eval.source"]
    files = {f.path for f in MlflowClient(uri).list_artifacts(run.info.run_id, "memory_eval")}
    assert files == {"memory_eval/memory_eval.json", "memory_eval/memory_eval_streaming.png",
                     "memory_eval/memory_eval_recall.png"}


def test_a_validation_split_too_short_for_the_memory_evaluation_is_refused_before_training(tmp_path, capsys):
    from ctxmem.cli import main
    from helpers_training import write_text_corpus

    data = tmp_path / "data"
    prepare([str(write_text_corpus(tmp_path / "src"))], data, progress=False)
    code = main(["train", "--config", str(TINY), f"data.path={data}", f"out={tmp_path / 'run'}",
                 "eval.memory.enabled=true", "eval.memory.length=100000"])
    assert code != 0
    err = capsys.readouterr().err
    assert "eval.memory needs a validation split of at least 100000 tokens" in err
    assert not (tmp_path / "run").exists()
