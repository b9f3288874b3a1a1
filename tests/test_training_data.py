"""`ctxmem data prepare`: corpora in, memory-mapped shards + tokenizer out; batches every rank reads."""
from __future__ import annotations

import json

import numpy as np
import pytest

from ctxmem.cli import main
from ctxmem.training import corpora
from ctxmem.training.data import BatchPlan, TokenData, eval_plan, prepare
from ctxmem.training.errors import DataError
from helpers_training import tree_state, write_text_corpus


def test_files_folders_and_jsonl_become_shards_a_tokenizer_and_a_split(tmp_path):
    src = write_text_corpus(tmp_path / "src")
    out = tmp_path / "data"
    result = prepare([str(src)], out, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["tokenizer_kind"] == "byte"
    assert meta["corpora"][0]["files"] == 3  # the hidden file is skipped
    # 1 txt + 1 md + 30 texts + 30 chats
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 62
    assert meta["splits"]["val"]["tokens"] > 0 and "tokens" in result.summary()
    data = TokenData(out)
    tok = data.tokenizer()
    stream = np.concatenate([np.memmap(out / s["file"], dtype=np.uint16, mode="r")
                             for s in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]])
    text = tok.decode(stream.tolist(), skip_special=False)
    assert "quick brown fox" in text and "memory is a window" in text
    # conversations are rendered with the core chat template, each document ends with EOS
    assert "<|user|>What is 3 + 3?<|end|><|assistant|>3 + 3 is 6.<|end|><|eos|>" in text
    assert int(np.sum(stream == tok.eos_id)) == 62


def test_the_embedded_corpora_install_offline():
    chat = corpora.resolve("chatterbot")
    assert chat.files and all(f.suffix == ".yml" for f in chat.files) and "BSD" in chat.license
    zh = corpora.resolve("chatterbot:chinese")
    first = next(corpora.read_file(zh.files[0], conversations_only=True))
    assert first[0]["role"] == "user" and first[1]["role"] == "assistant"
    assert any("\u4e00" <= ch <= "\u9fff" for m in first for ch in m["content"])
    stdlib = corpora.resolve("stdlib")
    assert len(stdlib.files) > 100 and any(f.name == "argparse.py" for f in stdlib.files)


def test_data_prepare_cli_writes_the_default_chat_corpus_and_a_bpe_variant(tmp_path, capsys):
    assert main(["data", "prepare", "--out", str(tmp_path / "chat"), "--no-progress"]) == 0
    assert "byte tokenizer" in capsys.readouterr().out
    meta = json.loads((tmp_path / "chat" / "meta.json").read_text())
    assert meta["corpora"][0]["spec"] == "chatterbot" and meta["splits"]["train"]["tokens"] > 100_000
    assert main(["data", "prepare", "--corpus", "chatterbot:english,chinese", "--tokenizer", "bpe",
                 "--vocab-size", "600", "--out", str(tmp_path / "bpe"), "--no-progress"]) == 0
    data = TokenData(tmp_path / "bpe")
    assert data.vocab_size == 600 and data.meta["tokenizer_kind"] == "bpe"
    assert data.tokenizer().decode(data.tokenizer().encode("你好 hello")) == "你好 hello"


def test_a_missing_corpus_path_is_a_clear_error_and_nothing_is_written(tmp_path, capsys):
    assert main(["data", "prepare", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "nope.txt" in err and "neither an existing file" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


def test_an_empty_corpus_is_refused_and_the_previous_data_is_kept(tmp_path, capsys):
    out = tmp_path / "data"
    prepare([str(write_text_corpus(tmp_path / "src"))], out, progress=False)
    before = tree_state(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    assert main(["data", "prepare", "--corpus", str(empty), "--out", str(out), "--no-progress"]) == 1
    assert "is empty" in capsys.readouterr().err
    assert tree_state(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "src"]  # no temporary left


def test_bad_jsonl_and_a_foreign_out_folder_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        prepare([str(bad)], tmp_path / "d", progress=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a prepared data folder"):
        prepare([str(write_text_corpus(tmp_path / "src"))], mine, progress=False)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_a_step_reads_the_same_samples_whatever_the_world_size():
    plan = BatchPlan(n_windows=37, global_batch=8, seed=5)
    for step in (0, 4, 9):  # step 4 and 9 cross epoch boundaries (37 windows)
        whole = plan.step_indices(step)
        one = np.concatenate([plan.micro_indices(step, m, 0, 1, 2) for m in range(4)])
        two = np.concatenate([plan.micro_indices(step, m, r, 2, 2) for m in range(2) for r in range(2)])
        assert (one == whole).all() and (two == whole).all()
    first_epoch = np.concatenate([plan.step_indices(s) for s in range(5)])[:37]
    assert sorted(first_epoch.tolist()) == list(range(37))  # an epoch is a permutation


def test_every_rank_runs_the_same_number_of_eval_batches():
    # ZeRO-3 gathers parameters in each forward: unequal counts would hang
    plans = [eval_plan(n_windows=11, samples=64, rank=r, world=3, micro_batch=2) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    real = sorted(i for p in plans for idx, w in p for i, wt in zip(idx, w) if wt)
    assert real == list(range(11))
