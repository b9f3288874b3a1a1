#!/usr/bin/env python
"""How much training does in-window recall take? One recipe, one device, a plain PyTorch loop.

    python bench/train_recall.py --data data/stdlib-recall --out runs/recall-sweep/a --minutes 5
    python bench/train_recall.py --data data/stdlib-recall --out runs/recall-sweep/b --copy 0.25 --lr 1e-3

A recipe search, not the product's trainer (that is `ctxmem train`, DeepSpeed): it measures how
many steps a recipe needs before a model answers the memory evaluation's recall questions, so the
search can run several recipes at once on one lent GPU (`infra/gpu-check.sh` does) where the
DeepSpeed trainer would spend the minutes on start-up. The model (ctxmem.model.Transformer, a
preset), the data (a `ctxmem data prepare` folder, random crops of `--seq` tokens) and the recall
trials (ctxmem.memory_eval.RecallBuilder: a fact, filler from the validation split, then the
question) are the project's own; the final weights are a ctxmem checkpoint (`--out`/final) that
`ctxmem eval memory --model OUT/final` evaluates like any other.

Every --every steps it prints (and appends to OUT/log.jsonl): the training loss; the copy ratio
(repeat NLL / first-copy NLL of random letter strings repeated once: ~1 = the model cannot copy
from its context, ~0 = it can); and exact recall (every answer token the argmax, teacher-forced,
which equals a greedy answer being exact) at distances inside and beyond the evaluation window.

--copy F replaces a share F of every batch's rows with random tokens repeated with a random period
(8-63 tokens): a pure copying signal, the curriculum idea for making induction heads form early.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # probe_recall beside this script

from ctxmem.checkpoint import save_checkpoint  # noqa: E402
from ctxmem.config import preset  # noqa: E402
from ctxmem.model import Transformer  # noqa: E402
from ctxmem.training.data import TokenData  # noqa: E402
from probe_recall import copy_probe, recall_probe  # noqa: E402

DISTANCES = (48, 64, 96, 160)  # tokens between the fact's value and the question; <= 64 is inside a 64-token window


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `ctxmem data prepare` folder (with a recall corpus in the mix)")
    p.add_argument("--out", required=True, help="folder for log.jsonl and the final checkpoint (OUT/final)")
    p.add_argument("--preset", default="small")
    p.add_argument("--seq", type=int, default=256, help="training context in tokens (default 256)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--copy", type=float, default=0.0, help="share of each batch's rows that are repeated random tokens")
    p.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    p.add_argument("--minutes", type=float, default=5.0, help="stop training after this much wall time")
    p.add_argument("--every", type=int, default=250, help="probe every N steps")
    p.add_argument("--trials", type=int, default=64, help="recall questions per distance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    return p.parse_args(argv)


class Batches:
    """Random crops of the training split kept on the device: (B, seq+1) int64 per call."""

    def __init__(self, tokens: np.ndarray, seq: int, batch: int, copy: float, vocab: int, device: str, seed: int):
        self.tokens = torch.from_numpy(tokens).to(device)
        self.seq, self.batch, self.device = seq, batch, device
        self.n_copy = int(round(copy * batch))
        self.vocab = vocab
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.offsets = torch.arange(seq + 1, device=device)

    def __call__(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.tokens) - self.seq - 1, (self.batch,), device=self.device, generator=self.gen)
        rows = self.tokens[starts[:, None] + self.offsets]  # (B, seq+1)
        if self.n_copy:
            # row r repeats a random segment of period[r] tokens: position i holds segment[i % period]
            period = torch.randint(8, 64, (self.n_copy, 1), device=self.device, generator=self.gen)
            segment = torch.randint(16, self.vocab, (self.n_copy, 64), device=self.device, generator=self.gen)
            rows[:self.n_copy] = torch.gather(segment, 1, self.offsets[None, :] % period)
        return rows


def probe(model, tokenizer, filler: np.ndarray, trials: int) -> dict:
    """The copy ratio and exact recall per distance (bench/probe_recall.py's probes, same trials every call)."""
    model.eval()
    first, repeat = copy_probe(model, tokenizer, rows=16)
    out = {"copy_ratio": round(repeat / first, 4)}
    for d in DISTANCES:
        out[f"recall_d{d}"] = round(recall_probe(model, tokenizer, filler, d, trials, seed=1234)["exact"], 4)
    model.train()
    return out


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = TokenData(args.data)
    tokenizer = data.tokenizer()
    vocab = (data.vocab_size + 7) // 8 * 8
    cfg = preset(args.preset, vocab_size=vocab, max_seq_len=args.seq)
    model = Transformer(cfg).to(args.device)
    cuda = args.device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    batches = Batches(data.stream("train", 1 << 30), args.seq, args.batch, args.copy, data.vocab_size, args.device,
                      args.seed)
    filler = data.stream("val", 1 << 20)  # the recall trials' filler
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "threads")}
    print(f"[{out.name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, recipe {recipe}",
          flush=True)
    log = (out / "log.jsonl").open("w")
    started = time.time()
    deadline = started + 60 * args.minutes
    step = 0
    while step < args.steps and time.time() < deadline:
        step += 1
        # linear warmup, then cosine towards 0.1 x lr over the time budget (steps are not known in advance)
        progress = min(1.0, (time.time() - started) / (deadline - started))
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = batches()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.every == 0:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                record = {"step": step, "seconds": round(time.time() - started, 1), "loss": round(loss.item(), 4),
                          **probe(model, tokenizer, filler, args.trials)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"[{out.name}] " + " ".join(f"{k} {v}" for k, v in record.items()), flush=True)
    final = probe(model.float(), tokenizer, filler, args.trials)  # fp32, as evaluation runs it
    summary = {"recipe": recipe, "steps": step, "seconds": round(time.time() - started, 1),
               "tokens": step * args.batch * args.seq, **final}
    save_checkpoint(out / "final", model, tokenizer)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"[{out.name}] final " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
