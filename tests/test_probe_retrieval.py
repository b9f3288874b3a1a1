"""bench/probe_retrieval.py: each method picks from the evicted span only, the oracle picks the
fact's statement, re-insertion keeps the sinks first and the window last, the recorded keys are the
model's own, and the whole probe runs on a checkpoint and a prepared data folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxmem.memory_eval import PolicyRun, RecallBuilder, answer_correct
from ctxmem.recall_facts import FactGenerator
from ctxmem.tokenizer import ByteTokenizer
from ctxmem.training.data import prepare
from helpers_training import load_bench

SINKS, WINDOW = 4, 32


@pytest.fixture(scope="module")
def probe():
    return load_bench("probe_retrieval")


@pytest.fixture(scope="module")
def built(probe):
    tok = ByteTokenizer()
    filler = np.asarray(tok.encode(FactGenerator(5).filler(4000)), dtype=np.int64)
    builder = RecallBuilder(tok, filler, 6, 0, lead=16)
    trials = builder.build(96)
    return tok, builder, trials, probe.split_trials(builder, trials)


def test_the_oracle_picks_the_facts_statement_and_cuts_it_from_its_start(probe, built):
    tok, builder, _, rows = built
    for trial, fact in zip(rows, builder.facts):
        span = probe.evicted_span(len(trial.context), SINKS, WINDOW)
        whole = probe.pick_oracle(trial, span, budget=200)
        assert tok.decode(trial.context[whole].tolist()) == " " + fact.statement + " "
        assert tok.decode(trial.context[range(*trial.value)].tolist()) == fact.answer
        cut = probe.pick_oracle(trial, span, budget=8)
        assert cut == whole[-8:]


def test_reinsertion_keeps_the_sinks_first_the_window_last_and_the_picks_in_stream_order(probe, built):
    _, _, _, rows = built
    context = rows[0].context
    start, end = probe.evicted_span(len(context), SINKS, WINDOW)
    assert (start, end) == (SINKS, len(context) - WINDOW)
    picked = [end - 1, start + 3, start + 2]
    seq = probe.compacted(context, picked, SINKS, WINDOW)
    assert seq.tolist() == (context[:SINKS].tolist() + [context[start + 2], context[start + 3], context[end - 1]]
                            + context[-WINDOW:].tolist())
    assert probe.compacted(context, [], SINKS, WINDOW).tolist() == context[:SINKS].tolist() + context[-WINDOW:].tolist()
    with pytest.raises(ValueError, match="evicted span"):
        probe.compacted(context, [end], SINKS, WINDOW)  # the window's first token is not evicted


def test_lexical_retrieval_finds_the_passage_that_shares_the_questions_words(probe, built):
    tok, builder, _, rows = built
    for trial, fact in zip(rows, builder.facts):
        span = probe.evicted_span(len(trial.context), SINKS, WINDOW)
        picked = probe.pick_lexical(trial, span, 64, tok.decode)
        assert set(range(*trial.value)) <= set(picked)
        assert len(picked) <= 64 and all(span[0] <= i < span[1] for i in picked)
        assert f"{fact.colour} {fact.thing} is{fact.answer}" in tok.decode(trial.context[sorted(picked)].tolist())


def test_blocks_cover_the_span_and_the_best_comes_with_the_block_after_it(probe):
    bounds = probe.block_bounds((4, 60), 16, offset=5)
    assert bounds[0] == (4, 9) and bounds[-1][1] == 60
    assert all(a < b and b - a <= 16 for a, b in bounds)
    assert all(b == a2 for (_, b), (a2, _) in zip(bounds, bounds[1:]))
    assert probe.block_bounds((4, 60), 16) == [(4, 20), (20, 36), (36, 52), (52, 60)]
    grid = probe.block_bounds((0, 64), 16)
    scores = [0.0, 3.0, 1.0, 2.0]
    assert probe.pick_blocks(scores, grid, 32) == list(range(16, 48))  # best (1), then the block after it (2)
    assert probe.pick_blocks(scores, grid, 48) == list(range(0, 48))  # then the one before it (0)
    assert probe.pick_blocks(scores, grid, 15) == []  # no whole block fits


def test_block_scores_rank_the_block_holding_the_querys_own_key_first(probe):
    torch.manual_seed(0)
    L, H, Hkv, D, N = 2, 4, 2, 8, 40
    k = torch.randn(L, Hkv, N, D) * 0.1
    q = torch.randn(L, H, 1, D)
    k[:, :, 23] = q.view(L, Hkv, H // Hkv, D).mean(2) * 10  # a key aligned with every query
    bounds = probe.block_bounds((0, N), 8)
    for reduce in ("max", "mean", "attn"):
        assert int(probe.block_scores(q, k, bounds, reduce).argmax()) == 2, reduce


def test_the_stream_records_the_models_own_keys_and_scores_as_the_memory_eval_does(probe, built, tiny_checkpoint):
    from ctxmem.backend import TorchBackend
    from ctxmem.checkpoint import load_model

    model = load_model(tiny_checkpoint).eval()
    _, _, trials, _ = built
    keys, values, queries, ok = probe.stream_pass(model, trials, SINKS, WINDOW, batch=4)
    B, T = trials.ids.shape
    assert keys.shape[:2] == (B, model.cfg.n_layers) and keys.shape[3] == T - 1
    assert queries.shape[2] == model.cfg.n_heads and values.shape == keys.shape
    # the first window's tokens were computed with nothing evicted: their keys are a plain forward's
    x = torch.from_numpy(trials.ids[:, :WINDOW])
    with torch.inference_mode():
        h = model.tok_emb(x)
        k0 = model.blocks[0].attn.wk(model.blocks[0].attn_norm(h)).view(B, WINDOW, model.cfg.n_kv_heads, -1)
    torch.testing.assert_close(keys[:, 0, :, :WINDOW], k0.transpose(1, 2), rtol=1e-5, atol=1e-5)  # one fp32 path
    expected = answer_correct(TorchBackend(model), trials, PolicyRun("sink", SINKS, WINDOW), piece=WINDOW, batch=4)
    assert ok.tolist() == expected.tolist()


def test_left_padded_answers_score_as_rows_alone(probe, tiny_checkpoint):
    from ctxmem.checkpoint import load_model

    model = load_model(tiny_checkpoint).eval()
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 256, n) for n in (7, 14, 20)]
    answers = []
    with torch.inference_mode():  # each row's own greedy continuation, decoded alone
        for p in prefixes:
            seq = torch.from_numpy(p)[None]
            for _ in range(3):
                seq = torch.cat((seq, model(seq)[:, -1:].argmax(-1)), dim=1)
            answers.append(seq[0, -3:].numpy())
    assert probe.answers_exact(model, prefixes, answers).all()
    wrong = [a.copy() for a in answers]
    wrong[1][2] = (wrong[1][2] + 1) % 256
    assert probe.answers_exact(model, prefixes, wrong).tolist() == [True, False, True]


def test_the_probe_runs_on_a_checkpoint_and_data(probe, tiny_checkpoint, tmp_path, capsys):
    prepare(["recall:40"], tmp_path / "data", progress=False)
    assert probe.main([str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--distances", "48,64",
                       "--window", "16", "--budgets", "16,32", "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "retrieval layer" in out
    for method in probe.METHODS:
        assert f"\n{method} " in out
    assert "infllm-attn@" in out and "d=48" in out and "d=64" in out


def test_kv_reinsertion_of_an_unevicted_context_scores_as_a_plain_forward(probe, tiny_checkpoint):
    from ctxmem.checkpoint import load_model
    from ctxmem.memory_eval import RecallTrials

    model = load_model(tiny_checkpoint).eval()
    rng = np.random.default_rng(1)
    context = rng.integers(0, 256, 40)
    seq = torch.from_numpy(context)[None]
    with torch.inference_mode():  # the model's own greedy continuation: the answer that must pass
        for _ in range(3):
            seq = torch.cat((seq, model(seq)[:, -1:].argmax(-1)), dim=1)
    answer = seq[0, -3:].numpy()
    wrong = answer.copy()
    wrong[1] = (wrong[1] + 1) % 256
    for given, expected in ((answer, True), (wrong, False)):
        ids = np.concatenate((context, given))[None]
        keys, values, _, _ = probe.stream_pass(model, RecallTrials(3, ids, [given.tolist()]), sinks=0, window=64)
        trial = probe.Trial(context, given, (0, 0), (0, 0), "")
        # window 64 > 40 tokens: nothing is evicted, the past is the whole context but its last token
        assert probe.answer_exact_kv(model, keys[0], values[0], trial, [], 0, 64) is expected
        assert probe.answers_exact(model, [context], [given]).tolist() == [expected]
        with torch.inference_mode():
            plain = model(torch.from_numpy(ids[:, :-1]))[0, -3:]
        # the same fp32 computation split into past and new tokens: equal up to summation order
        torch.testing.assert_close(probe.kv_logits(model, keys[0], values[0], trial, [], 0, 64), plain,
                                   rtol=1e-4, atol=1e-4)
