"""The memory evaluation (ctxmem/memory_eval.py): schema, coverage, errors, plots, and that what it
computes in pieces is what each policy computes token by token, on PyTorch and ONNX Runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ctxmem.backend import TorchBackend
from ctxmem.checkpoint import load_model
from ctxmem.config import preset
from ctxmem.memory import ContextMemory
from ctxmem.memory_eval import (BEYOND_WINDOWS, MemoryEvalError, MemoryEvalResult, PolicyRun, RecallBuilder,
                                RecallTrials, answer_correct, evaluate_memory, streaming_nll, text_sha256, token_nll)
from ctxmem.model import Transformer
from ctxmem.recall_facts import FactGenerator
from ctxmem.tokenizer import ByteTokenizer

STREAM_KEYS = {"policy", "sinks", "window", "chunk", "start", "end", "ppl"}
RECALL_KEYS = {"policy", "sinks", "window", "distance", "accuracy", "n"}
WINDOW, SINKS = 16, 2


@pytest.fixture(scope="module")
def backend():
    torch.manual_seed(0)
    return TorchBackend(Transformer(preset("tiny", vocab_size=ByteTokenizer().vocab_size)))


@pytest.fixture(scope="module")
def text() -> str:
    return FactGenerator(seed=5).filler(3000)


@pytest.fixture(scope="module")
def result(backend, text) -> MemoryEvalResult:
    tok = ByteTokenizer()
    with torch_one_thread():
        return evaluate_memory(backend, tok.encode(text), tok, text_hash=text_sha256(text), window=WINDOW,
                               sinks=SINKS, distances=[48, 80], trials=3, reference_tokens=64)


def torch_one_thread():
    from ctxmem.backend import torch_threads

    return torch_threads(1)


def test_json_schema_is_exact(result, text):
    saved = json.loads(result.to_json())
    assert set(saved) == {"text_sha256", "streaming", "recall"}
    assert saved["text_sha256"] == text_sha256(text)
    assert saved["streaming"] and saved["recall"]
    for record in saved["streaming"]:  # retrieve records also name their budget
        assert set(record) == STREAM_KEYS | ({"budget"} if record["policy"] == "retrieve" else set())
        assert 0 < record["ppl"] < float("inf")
    for record in saved["recall"]:
        assert set(record) == RECALL_KEYS | ({"budget"} if record["policy"] == "retrieve" else set())
        assert 0.0 <= record["accuracy"] <= 1.0
    assert MemoryEvalResult.from_json(result.to_json()).to_dict() == saved


def test_every_policy_covers_the_stream_in_window_buckets(result):
    length = 20 * WINDOW  # the default stream: 20x the window
    assert result.length == length and result.window == WINDOW
    runs = {(r["policy"], r["sinks"], r["chunk"]) for r in result.streaming}
    assert runs == {("full", 0, None), ("sink", SINKS, None), ("sink", 0, None), ("retrieve", SINKS, None),
                    ("recompute", 0, 1), ("recompute", 0, WINDOW // 4)}
    for (policy, sinks, chunk) in runs:
        records = [r for r in result.streaming if (r["policy"], r["sinks"], r["chunk"]) == (policy, sinks, chunk)]
        buckets = [r for r in records if not result.is_beyond(r)]
        assert [(r["start"], r["end"]) for r in buckets] == \
            [(max(1, a), a + WINDOW) for a in range(0, length, WINDOW)]
        beyond = result.beyond(policy, sinks, chunk)
        assert beyond is not None and (beyond["start"], beyond["end"]) == (BEYOND_WINDOWS * WINDOW, length)
    # window-only and sink are measured apart: different memories, different numbers
    assert result.beyond("sink", SINKS)["ppl"] != result.beyond("sink", 0)["ppl"]
    table = result.table()
    for label in ("full (context 128)", f"sink ({SINKS} sinks)", "window-only", "recompute (chunk=1)",
                  f"recompute (chunk={WINDOW // 4})", "d=48", "d=80"):
        assert label in table


def test_recall_records_cover_the_asked_distances(result):
    cells = {(r["policy"], r["sinks"], r["distance"]): r["n"] for r in result.recall}
    assert cells == {(p, s, d): 3 for (p, s) in (("full", 0), ("sink", SINKS), ("sink", 0), ("retrieve", SINKS),
                                                  ("recompute", 0)) for d in (48, 80)}


def test_too_short_text_says_how_long_it_must_be(backend):
    tok = ByteTokenizer()
    with pytest.raises(MemoryEvalError, match=r"has 100 tokens; this run needs at least 320"):
        evaluate_memory(backend, list(range(100)), tok, text_hash="x", window=WINDOW, sinks=SINKS)
    with pytest.raises(MemoryEvalError, match="window 200 with 2 sinks"):
        evaluate_memory(backend, list(range(5000)), tok, text_hash="x", window=200, sinks=SINKS)


def test_a_model_with_learned_positions_is_measured_without_the_sink_policy(text):
    torch.manual_seed(0)
    tok = ByteTokenizer()
    learned = TorchBackend(Transformer(preset("tiny", vocab_size=tok.vocab_size, pos="learned")))
    with torch_one_thread():
        result = evaluate_memory(learned, tok.encode(text), tok, text_hash="x", window=WINDOW, sinks=SINKS,
                                 distances=[48], trials=1, reference_tokens=16)
    assert {r["policy"] for r in result.streaming} == {"full", "recompute"}
    assert {r["policy"] for r in result.recall} == {"full", "recompute"}


def test_plots_are_written(result, tmp_path):
    paths = result.save(tmp_path)
    assert json.loads(paths["json"].read_text()) == result.to_dict()
    for name in ("streaming_png", "recall_png"):
        data = paths[name].read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


@pytest.mark.parametrize("run", [PolicyRun("sink", SINKS, WINDOW), PolicyRun("sink", 0, WINDOW),
                                 PolicyRun("recompute", 0, WINDOW, WINDOW // 4), PolicyRun("recompute", 0, WINDOW, 1)],
                         ids=lambda r: r.label)
def test_pieces_compute_what_the_policy_computes_token_by_token(backend, run):
    stream = np.random.default_rng(0).integers(0, backend.vocab_size, 5 * WINDOW + 3)
    with torch_one_thread():
        got = streaming_nll(backend, stream, run, piece=WINDOW, reference_tokens=None)
        memory = ContextMemory(backend, run.memory_config())
        state = memory.start(1)
        want = [np.nan] + [token_nll(memory.feed(state, stream[None, j:j + 1])[0], stream[j + 1])
                           for j in range(len(stream) - 1)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_full_policy_is_strided_over_the_context(backend):
    """Blocks of L tokens every L/2; a token is scored in the first block giving it >= L/2 tokens before it."""
    L = backend.max_seq_len
    stream = np.random.default_rng(1).integers(0, backend.vocab_size, 3 * L)
    with torch_one_thread():
        got = streaming_nll(backend, stream, PolicyRun("full", 0, L), piece=WINDOW)
        # stream position 300 (input column 299) is scored in the block of input columns [192, 192 + L)
        memory = ContextMemory(backend, PolicyRun("full", 0, L).memory_config())
        logits = memory.feed(memory.start(1), stream[None, 192:192 + L], all_logits=True)
    assert np.isnan(got[0]) and not np.isnan(got[1:]).any()
    assert got[300] == pytest.approx(token_nll(logits[0, 299 - 192], stream[300]), abs=1e-6)


def test_the_chunk1_reference_is_sampled_before_10x_the_window_and_complete_beyond(backend):
    stream = np.random.default_rng(4).integers(0, backend.vocab_size, 12 * WINDOW)
    with torch_one_thread():
        nll = streaming_nll(backend, stream, PolicyRun("recompute", 0, WINDOW, 1), piece=WINDOW, reference_tokens=8)
    far = BEYOND_WINDOWS * WINDOW
    assert (~np.isnan(nll[1:far])).sum() == 8
    assert not np.isnan(nll[far:]).any()


def test_recall_trial_places_the_value_at_the_distance():
    tok = ByteTokenizer()
    filler = np.asarray(tok.encode(FactGenerator(seed=3).filler(2000)), dtype=np.int64)
    builder = RecallBuilder(tok, filler, trials=5, seed=0, lead=16)
    trials = builder.build(60)
    assert trials.ids.shape[0] == 5
    for row, fact, answer in zip(trials.ids, builder.facts, trials.answers):
        value = tok.encode(fact.answer)
        answer_start = len(row) - len(answer)
        assert row[answer_start - 60: answer_start - 60 + len(value)].tolist() == value == answer
        assert tok.decode(row[answer_start - len(tok.encode(" " + fact.question)): answer_start]) == " " + fact.question
    with pytest.raises(MemoryEvalError, match="use distances >= "):
        builder.build(10)


def test_a_stream_that_starts_with_bos_starts_every_recall_trial_with_it(backend, monkeypatch):
    """A document-trained model saw BOS at position 0 of every sample (its evaluated stream starts
    with BOS): its recall trials do too, and the filler never holds that BOS."""
    import ctxmem.memory_eval as memory_eval

    tok = ByteTokenizer()
    text = tok.encode(FactGenerator(seed=3).filler(2000))
    built = []
    original = memory_eval.RecallBuilder.build
    monkeypatch.setattr(memory_eval.RecallBuilder, "build", lambda self, d: built.append(original(self, d)) or built[-1])
    with torch_one_thread():
        for stream in (text, [tok.bos_id] + text):
            memory_eval.recall_by_distance(backend, np.asarray(stream), tok, window=WINDOW, sinks=SINKS,
                                           distances=[48], trials=3)
    plain, with_bos = built[-2].ids, built[-1].ids  # the last distance built for each stream
    assert (with_bos[:, 0] == tok.bos_id).all() and (with_bos[:, 1:] != tok.bos_id).all()
    assert (plain != tok.bos_id).all()
    assert with_bos.shape[1] == plain.shape[1] + 1


@pytest.mark.parametrize("run", [PolicyRun("sink", SINKS, WINDOW), PolicyRun("full", 0, 128),
                                 PolicyRun("recompute", 0, WINDOW, 1)], ids=lambda r: r.label)
def test_answer_correct_matches_greedy_decoding(backend, run):
    """Answers set to what the model decodes greedily under the policy are all judged correct; a
    changed answer token is not."""
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, backend.vocab_size, (3, 3 * WINDOW))
    rows, answers = [], []
    with torch_one_thread():
        for prompt in prompts:
            memory = ContextMemory(backend, run.memory_config())
            state = memory.start(1)
            logits = memory.feed(state, prompt[None])
            answer = []
            for _ in range(3):
                answer.append(int(logits[0].argmax()))
                logits = memory.feed(state, np.asarray([[answer[-1]]]))
            rows.append(prompt.tolist() + answer)
            answers.append(answer)
        trial = RecallTrials(0, np.asarray(rows), answers)
        assert answer_correct(backend, trial, run, piece=WINDOW, batch=2).all()
        rows[1][-2] = (rows[1][-2] + 1) % backend.vocab_size
        answers[1][-2] = rows[1][-2]
        wrong = answer_correct(backend, RecallTrials(0, np.asarray(rows), answers), run, piece=WINDOW, batch=2)
    assert wrong.tolist() == [True, False, True]


@pytest.mark.slow  # builds the ONNX export of the tiny model
def test_checkpoint_and_onnx_export_agree(tiny_checkpoint, tiny_export, text, tmp_path, capsys):
    from ctxmem.export.runtime import OrtBackend

    tok = ByteTokenizer()
    ids = tok.encode(text)
    kwargs = dict(text_hash=text_sha256(text), window=WINDOW, sinks=SINKS, distances=[48], trials=2,
                  reference_tokens=32)
    with torch_one_thread():
        torch_result = evaluate_memory(TorchBackend(load_model(tiny_checkpoint)), ids, tok, **kwargs)
    onnx_result = evaluate_memory(OrtBackend(tiny_export), ids, tok, **kwargs)
    assert len(torch_result.streaming) == len(onnx_result.streaming)
    for a, b in zip(torch_result.streaming, onnx_result.streaming):
        assert {k: v for k, v in a.items() if k != "ppl"} == {k: v for k, v in b.items() if k != "ppl"}
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-3)
    assert torch_result.recall == onnx_result.recall
    # and through the command line, as a user runs it on an export
    from ctxmem.cli import main

    (tmp_path / "text.txt").write_text(text)
    assert main(["eval", "memory", "--model", str(tiny_export), "--text", str(tmp_path / "text.txt"),
                 *EVAL_ARGS[:-1], "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == onnx_result.to_dict()


# ---- the command line: `ctxmem eval memory` -----------------------------------------------------------
EVAL_ARGS = ["--window", str(WINDOW), "--sinks", str(SINKS), "--distances", "48", "--trials", "2",
             "--reference-tokens", "16"]


def test_cli_eval_memory_prints_saves_and_logs_to_mlflow(tiny_checkpoint, text, tmp_path, capsys, sqlite_store):
    from mlflow import MlflowClient

    from ctxmem.cli import main

    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    uri = sqlite_store
    assert main(["eval", "memory", "--model", str(tiny_checkpoint), "--text", str(text_file), *EVAL_ARGS,
                 "--out", str(tmp_path / "out"), "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "streaming perplexity" in printed and "window-only" in printed and "d=48" in printed
    saved = MemoryEvalResult.from_json((tmp_path / "out" / "memory_eval.json").read_text())
    assert saved.text_sha256 == text_sha256(text) and saved.length == 20 * WINDOW
    assert (tmp_path / "out" / "memory_eval_streaming.png").stat().st_size > 0
    assert (tmp_path / "out" / "memory_eval_recall.png").stat().st_size > 0

    client = MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("ctxmem-eval").experiment_id])
    assert run.data.params["text_sha256"] == saved.text_sha256 and run.data.params["backend"] == "torch"
    assert run.data.metrics["memory.ppl_beyond_10x.sink2"] == pytest.approx(saved.beyond("sink", SINKS)["ppl"])
    assert run.data.metrics["memory.recall.window_only.d48"] == \
        next(r["accuracy"] for r in saved.recall if r["policy"] == "sink" and r["sinks"] == 0)
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "memory_eval")}
    assert logged == {"memory_eval/memory_eval.json", "memory_eval/memory_eval_streaming.png",
                      "memory_eval/memory_eval_recall.png"}


def test_cli_eval_memory_on_a_prepared_folder_and_eval_perplexity_as_before(tiny_checkpoint, text, tmp_path,
                                                                            capsys):
    import hashlib

    from ctxmem.cli import main
    from ctxmem.training.data import TokenData, prepare

    (tmp_path / "corpus.txt").write_text(text)
    prepare([str(tmp_path / "corpus.txt")], tmp_path / "data", val_fraction=0.3, progress=False)
    assert main(["eval", "memory", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "data"),
                 *EVAL_ARGS, "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    val = np.concatenate([np.asarray(a, dtype="<i8") for a in TokenData(tmp_path / "data").split("val", 1).arrays])
    assert saved["text_sha256"] == hashlib.sha256(val.tobytes()).hexdigest()
    assert {r["distance"] for r in saved["recall"]} == {48}
    # `ctxmem eval --model X --data Y` keeps meaning validation perplexity
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "corpus.txt")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_eval_memory_errors_are_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    from ctxmem.cli import main

    short = tmp_path / "short.txt"
    short.write_text("too short " * 10)
    assert main(["eval", "memory", "--model", str(tiny_checkpoint), "--text", str(short), *EVAL_ARGS]) == 1
    assert "has 100 tokens; this run needs at least 320" in capsys.readouterr().err
    assert main(["eval", "memory", "--model", str(tiny_checkpoint)]) == 1
    assert "exactly one of --text FILE or --data DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # perplexity (the default) still needs --data
        main(["eval", "--model", str(tiny_checkpoint)])
    assert "--data" in capsys.readouterr().err
