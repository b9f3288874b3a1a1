"""Can a ctxmem model learn to use its context during training? (issue 8: recall stayed at 0%.)

Recall needs copying: find the fact earlier in the context and copy its value. These tests guard
the training forward against anything that would keep a target from reading its whole sample (a
band/window mask, wrong positions, a sink path that hides keys): every position's loss reaches
back to the sample's first token under each model.sink variant, and a 2-layer model trained with
that forward learns a copy task (random strings each repeated once: the repeat's loss must fall
far below the first copy's, which no amount of training can predict)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctxmem.config import preset
from ctxmem.model import Transformer


@pytest.mark.parametrize("sink", ["none", "token", "learned"])
def test_every_target_of_a_training_sample_reads_back_to_its_first_token(sink):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64, max_seq_len=128, sink=sink)).train()
    x = torch.randint(0, 60, (2, 128))
    emb = model.tok_emb(x).detach().requires_grad_(True)
    # the trainer's forward is model(x): patch the embedding lookup to return our leaf tensor
    model.tok_emb.forward = lambda ids: emb
    logits = model(x)  # (2, 128, V), as the trainer calls it (no layout: causal over the sample)
    logits[:, -1].logsumexp(-1).sum().backward()
    reach = emb.grad.abs().sum(-1)  # (2, 128): how much the last target depends on each input
    assert (reach > 0).all(), f"the last target cannot see inputs {torch.nonzero(reach[0] == 0).flatten().tolist()}"


def _copy_batch(rng: np.random.Generator, rows: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of [0] s [1] s ... packed to seq + 1 tokens, s random strings of 4-8 ids from 2..vocab-1;
    -> ids (rows, seq + 1), repeat (rows, seq + 1) bool: the tokens of a second copy after its first."""
    ids = np.zeros((rows, seq + 1), dtype=np.int64)
    repeat = np.zeros((rows, seq + 1), dtype=bool)
    for r in range(rows):
        pos = 0
        while pos <= seq:
            n = int(rng.integers(4, 9))
            s = rng.integers(2, vocab, n)
            seg = np.concatenate([[0], s, [1], s])
            mark = np.zeros(len(seg), dtype=bool)
            mark[n + 3:] = True  # the second copy less its first token
            k = min(len(seg), seq + 1 - pos)
            ids[r, pos:pos + k], repeat[r, pos:pos + k] = seg[:k], mark[:k]
            pos += k
    return torch.from_numpy(ids), torch.from_numpy(repeat)


@pytest.mark.slow
def test_a_two_layer_model_learns_to_copy_from_its_context():
    torch.manual_seed(0)
    vocab, seq = 16, 48
    model = Transformer(preset("tiny", vocab_size=vocab, d_model=64, d_ff=128, max_seq_len=64)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(350):
        x, _ = _copy_batch(rng, 32, seq, vocab)
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, repeat = _copy_batch(np.random.default_rng(99), 32, seq, vocab)
    with torch.no_grad():
        nll = F.cross_entropy(model.eval()(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    first, second = nll[~repeat[:, 1:]].mean().item(), nll[repeat[:, 1:]].mean().item()
    assert second < 0.5 * first, f"no copying: repeat NLL {second:.3f} vs first copy {first:.3f}"
