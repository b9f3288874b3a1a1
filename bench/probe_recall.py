"""Why does a model not recall? Two cheap probes of a checkpoint, one forward each:

    .venv/bin/python bench/probe_recall.py runs/cpu-memory/final --data data/stdlib-recall
    .venv/bin/python bench/probe_recall.py runs/cpu-memory/checkpoints/step_0000150 --data data/stdlib-recall

* copy: a random string of lowercase letters repeated once; the mean NLL of the repeat next to the
  first copy's. A model with an induction (copy) head predicts the repeat almost perfectly
  (ratio near 0); ratio ~1 means it cannot copy from its context at all, and recall (finding the
  fact's value and copying it) cannot work either.
* recall: the memory evaluation's trials (ctxmem.memory_eval.RecallBuilder, fillers from the data's
  validation split) under the full context, teacher-forced: the mean NLL of the value's digits
  (ln 10 = 2.30 is chance), digit accuracy, and exact recall (every answer token the argmax) per
  distance, with a few greedy answers.

A checkpoint is a final folder (ctxmem.checkpoint) or a training step folder (checkpoints/step_N).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def load(path: Path):
    from ctxmem.checkpoint import load_model
    from ctxmem.config import ModelConfig
    from ctxmem.model import Transformer

    state = path / "ctxmem_state.json"
    if not state.exists():
        return load_model(path).eval()
    # a DeepSpeed step folder: the model config is in ctxmem_state.json, the full weights in the
    # rank-0 model states (ZeRO-1/2 keep them whole there)
    model = Transformer(ModelConfig(**json.loads(state.read_text())["model_config"]))
    weights = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    model.load_state_dict(weights)
    return model.eval()


def _device(model) -> torch.device:
    """Where the model's weights are (a model without any, like a test's rule-based one: the CPU)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.inference_mode()
def copy_probe(model, tokenizer, rows: int = 8, length: int = 100, seed: int = 0) -> tuple[float, float]:
    """(first copy NLL, repeat NLL) of `rows` random letter strings of `length` tokens, each repeated once."""
    letters = np.asarray(tokenizer.encode("abcdefghijklmnopqrstuvwxyz"))
    ids = np.random.default_rng(seed).choice(letters, (rows, length))
    x = torch.from_numpy(np.concatenate([ids, ids], axis=1)).to(_device(model))
    logits = model(x[:, :-1]).float()  # float: under autocast the logits may be bf16
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
    skip = 10  # the first few tokens of each copy have little context either way
    return nll[:, skip:length - 1].mean().item(), nll[:, length + skip:].mean().item()


@torch.inference_mode()
def recall_probe(model, tokenizer, filler: np.ndarray, distance: int, trials: int, seed: int) -> dict:
    from ctxmem.memory_eval import RecallBuilder

    trial = RecallBuilder(tokenizer, filler, trials, seed, lead=16).build(distance)
    n = len(trial.answers[0])  # every value has the same number of digits
    ids = trial.ids[:, -model.cfg.max_seq_len - 1:]  # as much as the context holds, answer included
    ids = torch.from_numpy(ids).to(_device(model))
    logits = model(ids[:, :-1])[:, -n:].float()  # (B, n, V): the predictions of the answer tokens
    target = ids[:, -n:]
    predicted = logits.argmax(-1)
    digits = 4 if n >= 4 else n  # the value's digits are its last tokens (byte or digit-split BPE)
    nll = torch.nn.functional.cross_entropy(logits[:, -digits:].transpose(1, 2), target[:, -digits:])
    return {"distance": distance, "digit_nll": nll.item(),
            "digit_accuracy": (predicted[:, -digits:] == target[:, -digits:]).float().mean().item(),
            "exact": (predicted == target).all(1).float().mean().item(),
            "examples": [f"{tokenizer.decode(target[r].tolist())!r}->{tokenizer.decode(predicted[r].tolist())!r}"
                         for r in range(min(3, len(ids)))]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", required=True, help="the prepared data folder the model trained on (tokenizer, filler)")
    p.add_argument("--distances", default="48,96,160", help="recall distances in tokens (comma-separated)")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    from ctxmem.training.data import TokenData

    data = TokenData(args.data)
    tokenizer = data.tokenizer()
    model = load(args.checkpoint)
    first, repeat = copy_probe(model, tokenizer)
    print(f"copy: first copy NLL {first:.3f}, repeat NLL {repeat:.3f}, ratio {repeat / first:.3f} "
          f"(a copying model: near 0)")
    filler = np.asarray(data.stream("val", 200_000), dtype=np.int64)
    print("recall (full context, teacher-forced; chance digit NLL = ln 10 = 2.303)")
    for d in (int(x) for x in args.distances.split(",")):
        r = recall_probe(model, tokenizer, filler, d, args.trials, args.seed)
        print(f"  d={d:<4} digit NLL {r['digit_nll']:.3f}  digit accuracy {r['digit_accuracy']:.2f}  "
              f"exact {r['exact']:.2f}  e.g. {', '.join(r['examples'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
