"""bench/probe_recall.py: the copy probe tells a copying model from one that cannot copy, and the
whole probe runs on a checkpoint and a prepared data folder."""
from __future__ import annotations

import sys

import torch

from ctxmem.tokenizer import ByteTokenizer
from ctxmem.training.data import prepare
from helpers_training import load_bench


class Copier(torch.nn.Module):
    """Predicts token t + 1 as the token `period - 1` places before t: a perfect copy of a repeat."""

    def __init__(self, vocab: int, period: int):
        super().__init__()
        self.vocab, self.period = vocab, period

    def forward(self, ids):  # (B, T) -> (B, T, V)
        logits = torch.zeros(*ids.shape, self.vocab)
        source = torch.arange(ids.shape[1]) + 1 - self.period
        seen = source >= 0
        logits[:, seen] = 20.0 * torch.nn.functional.one_hot(ids[:, source[seen]], self.vocab).float()
        return logits


def test_the_copy_probe_separates_a_copying_model_from_a_random_one(tiny_checkpoint):
    probe = load_bench("probe_recall")
    tok = ByteTokenizer()
    first, repeat = probe.copy_probe(Copier(tok.vocab_size, 100), tok, length=100)
    assert repeat / first < 0.01
    first, repeat = probe.copy_probe(probe.load(tiny_checkpoint), tok, length=100)
    assert repeat / first > 0.8  # an untrained model cannot copy


def test_the_probe_runs_on_a_checkpoint_and_data(tiny_checkpoint, tmp_path, capsys):
    probe = load_bench("probe_recall")
    prepare(["recall:40"], tmp_path / "data", progress=False)
    assert probe.main([str(tiny_checkpoint), "--data", str(tmp_path / "data"), "--distances", "48,60",
                       "--trials", "4"]) == 0
    out = capsys.readouterr().out
    assert "copy: first copy NLL" in out and "d=48" in out and "d=60" in out
