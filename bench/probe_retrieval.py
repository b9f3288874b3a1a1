"""Which retrieval brings an evicted fact back? A training-free measurement for issue 14 (memory
beyond the window), on a recall-trained checkpoint:

    .venv/bin/python bench/probe_retrieval.py bench/models/recall-small --data data/stdlib-recall

Trials are the memory evaluation's (ctxmem.memory_eval.RecallBuilder; filler from the data's
validation split, starting with BOS when the split does): a fact, `distance` tokens of filler and
its question. The stream is fed through the sink memory (ContextMemory, `sinks` + `window`) exactly
as `ctxmem eval memory` feeds it; forward hooks record every token's key and query as the stream
computed them (before rotation, so free of position). When the question's last token is reached,
the context splits into

    [sinks][evicted ........................................][window = last `window` tokens]

and each method picks at most `budget` tokens of the evicted part. The model then sees
[sinks][retrieved][window][answer] as one fresh sequence, positions 0..n-1 (compacted), and a
trial counts when every answer token is the argmax given the correct tokens before it (teacher
forcing: greedy-exact, as in the memory evaluation). Methods:

* none      - sinks and window only (the sink policy, re-encoded): near 0 past the window.
* oracle    - the fact's own statement ("The code of the blue door is 4812. "), cut to the budget
              from its start: the upper bound of any retriever at that budget.
* lexical   - passages = the evicted tokens split after '.', '?', '!' and newlines; each scored by
              the distinct words it shares with the question (stop words left out), best first,
              ties to the later one; a passage longer than the budget left is cut from its start.
* infllm-max, infllm-mean, infllm-attn - InfLLM-style (Xiao et al. 2024): the evicted tokens in
              blocks of `block` (the grid shifted per trial, so the trials' values, which all sit at
              one position, do not share one alignment), scored against the queries of the
              question's last `query_tokens` tokens, averaged over layers, query heads and query
              tokens: q.k / sqrt(D) of the block's best key (max) or of its mean key (mean), or the
              softmax attention mass the block would get among all evicted tokens (attn). The best
              block is taken, then the block after it (what followed the match), then the one before
              it, then the next best block ..., while each fits the budget.
* infllm-max@L, infllm-attn@L - the same with layer L's queries and keys alone; L is the layer
              whose infllm-max pick most often holds the whole value on trials of another seed
              (--seed + 1000, d = 4x the window), never on the measured trials.

Each method is scored twice: `text`, the picked tokens re-encoded in the compacted sequence above
(what a text store re-inserts), and `kv`, the stream's own keys and values of the sinks, the picked
tokens and the window put back as the cache at compacted positions, the context's last token and the
answer fed on top (what an InfLLM-style KV store re-inserts; `none` under kv is the sink cache).

Also printed: `sink (stream)`, the same trials scored on the sink memory's own logits (what
`ctxmem eval memory` reports for sink), as a check of the re-encoded `none`. The extra tokens column
is the mean retrieved tokens put in front of the window; the attended-slots ratio,
(sinks + retrieved + window) / (sinks + window), is what per-token attention cost scales with.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

METHODS = ("none", "oracle", "lexical", "infllm-max", "infllm-mean", "infllm-attn")
SELECT_SEED = 1000  # added to --seed for the trials that choose the retrieval layer (never the measured ones)
BOUNDARY = re.compile(r"[.?!\n]")
STOP_WORDS = frozenset({"the", "of", "a", "an", "is", "q"})


# ---- one trial's pieces ----------------------------------------------------------------------------
@dataclass
class Trial:
    """One row of a RecallTrials at its question: context = everything before the answer (C,),
    answer (n,), fact and value = [start, end) of the fact's statement and of its value in the
    context, question: the question's text."""

    context: np.ndarray
    answer: np.ndarray
    fact: tuple[int, int]
    value: tuple[int, int]
    question: str


def split_trials(builder, trials) -> list[Trial]:
    """The Trials of a built distance: the value starts `distance` tokens before the answer."""
    out = []
    T = trials.ids.shape[1]
    for row, answer, parts in zip(trials.ids, trials.answers, builder.parts):
        n = len(answer)
        value = T - n - trials.distance
        start, end = value - len(parts["prefix"]), value + len(parts["value"]) + len(parts["tail"])
        out.append(Trial(row[:T - n], row[T - n:], (start, end), (value, value + len(parts["value"])),
                         builder.tokenizer.decode(parts["question"])))
    return out


def evicted_span(length: int, sinks: int, window: int) -> tuple[int, int]:
    """[start, end) of what the sink memory has evicted from a context of `length` tokens."""
    return sinks, max(sinks, length - window)


def compacted(context: np.ndarray, picked: Sequence[int], sinks: int, window: int) -> np.ndarray:
    """[sinks][context[picked] in stream order][last `window` tokens], as one sequence."""
    start, end = evicted_span(len(context), sinks, window)
    picked = np.asarray(sorted(set(int(i) for i in picked)), dtype=np.int64)
    if len(picked) and (picked[0] < start or picked[-1] >= end):
        raise ValueError(f"picked tokens must lie in the evicted span [{start}, {end})")
    return np.concatenate((context[:min(sinks, len(context))], context[picked], context[end:]))


# ---- the methods: each returns context indices inside the evicted span -----------------------------
def pick_oracle(trial: Trial, span: tuple[int, int], budget: int) -> list[int]:
    start, end = max(trial.fact[0], span[0]), min(trial.fact[1], span[1])
    return list(range(max(start, end - budget), end))


def passages(tokens: Sequence[int], decode: Callable[[list[int]], str], offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) of each passage: a passage ends after a token whose text has '.', '?', '!' or a newline."""
    out, start = [], 0
    for i, t in enumerate(tokens):
        if BOUNDARY.search(decode([int(t)])):
            out.append((offset + start, offset + i + 1))
            start = i + 1
    if start < len(tokens):
        out.append((offset + start, offset + len(tokens)))
    return out


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOP_WORDS


def pick_lexical(trial: Trial, span: tuple[int, int], budget: int, decode) -> list[int]:
    query = words(trial.question)
    scored = []
    for a, b in passages(trial.context[span[0]:span[1]], decode, span[0]):
        score = len(words(decode(trial.context[a:b].tolist())) & query)
        if score:
            scored.append((score, a, b))
    picked: list[int] = []
    for _, a, b in sorted(scored, key=lambda s: (-s[0], -s[1])):
        left = budget - len(picked)
        if left <= 0:
            break
        picked += range(max(a, b - left), b)
    return picked


def block_bounds(span: tuple[int, int], block: int, offset: int = 0) -> list[tuple[int, int]]:
    """[start, end) of the blocks of an evicted span: a first block of `offset` tokens (none when 0),
    then blocks of `block`, the last one possibly shorter. The offset moves the block grid, so that
    trials whose values sit at the same position do not all share one alignment."""
    start, end = span
    cuts = [start] + list(range(start + offset % block if offset % block else start + block, end, block)) + [end]
    cuts = sorted(set(c for c in cuts if start <= c <= end))
    return list(zip(cuts[:-1], cuts[1:]))


def block_scores(q: torch.Tensor, k: torch.Tensor, bounds: list[tuple[int, int]], reduce: str) -> torch.Tensor:
    """q (L, H, Q, D) queries, k (L, Hkv, N, D) the keys of the evicted span, bounds: blocks as
    [start, end) within k -> (len(bounds),) scores, averaged over L, H and Q:
    max  - q.k / sqrt(D) of the block's best-matching key;
    mean - q.k / sqrt(D) with the block's mean key;
    attn - the attention mass q would give the block if it saw the whole evicted span."""
    L, H, Q, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # query head h reads key head h // rep (GQA)
    if reduce == "mean":
        means = torch.stack([k[:, :, a:b].mean(2) for a, b in bounds], dim=2)  # (L, H, nb, D)
        return (torch.einsum("lhqd,lhbd->lhqb", q, means) / D ** 0.5).mean(dim=(0, 1, 2))
    s = torch.einsum("lhqd,lhnd->lhqn", q, k) / D ** 0.5  # (L, H, Q, N)
    if reduce == "attn":
        s = torch.softmax(s, dim=-1)
        return torch.stack([s[..., a:b].sum(-1) for a, b in bounds], dim=-1).mean(dim=(0, 1, 2))
    return torch.stack([s[..., a:b].amax(-1) for a, b in bounds], dim=-1).mean(dim=(0, 1, 2))


def pick_blocks(scores: Sequence[float], bounds: list[tuple[int, int]], budget: int) -> list[int]:
    """Best block, then the block after it (what followed the match), then the one before it, then
    the next best block ..., each whole, while it fits the budget; -> indices."""
    nb = len(bounds)
    chosen: list[int] = []
    used = 0
    for best in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        for b in (int(best), int(best) + 1, int(best) - 1):
            size = bounds[b][1] - bounds[b][0] if 0 <= b < nb else 0
            if 0 <= b < nb and b not in chosen and used + size <= budget:
                chosen.append(b)
                used += size
    return [i for b in sorted(chosen) for i in range(*bounds[b])]


# ---- the stream: keys and queries as the sink memory computed them ---------------------------------
class Recorder:
    """Forward hooks on every layer's key, value and query projections; `take()` gives what was
    recorded since the last take: k, v (B, L, Hkv, T, D) and q (B, L, H, T, D), before rotation."""

    def __init__(self, model):
        cfg = model.cfg
        self.shape = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.k: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.q: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.v: list[list[torch.Tensor]] = [[] for _ in model.blocks]
        self.handles = []
        for i, block in enumerate(model.blocks):
            self.handles.append(block.attn.wk.register_forward_hook(self._hook(self.k[i])))
            self.handles.append(block.attn.wq.register_forward_hook(self._hook(self.q[i])))
            self.handles.append(block.attn.wv.register_forward_hook(self._hook(self.v[i])))

    @staticmethod
    def _hook(store):
        return lambda module, args, out: store.append(out.detach().float())

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, Hkv, D = self.shape
        k, v, q = (torch.stack([torch.cat(parts, 1) for parts in store], 1)  # (B, L, T, heads*D)
                   for store in (self.k, self.v, self.q))
        for parts in self.k + self.v + self.q:
            parts.clear()
        B, L, T, _ = k.shape
        return (k.view(B, L, T, Hkv, D).transpose(2, 3), v.view(B, L, T, Hkv, D).transpose(2, 3),
                q.view(B, L, T, H, D).transpose(2, 3))

    def close(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def stream_pass(model, trials, sinks: int, window: int, batch: int = 16):
    """Feeds every row but its last token through the sink memory in pieces of `window`, as
    `ctxmem eval memory` does. -> (keys and values (B, L, Hkv, T-1, D), queries (B, L, H, T-1, D),
    the sink memory's own exact-answer flags (B,)); keys as the cache holds them (unrotated)."""
    from ctxmem.backend import TorchBackend
    from ctxmem.memory import ContextMemory, MemoryConfig
    from ctxmem.memory_eval import _piece_bounds

    backend = TorchBackend(model)
    ids = trials.ids
    B, T = ids.shape
    n = len(trials.answers[0])
    keys, values, queries, correct = [], [], [], []
    recorder = Recorder(model)
    try:
        for s in range(0, B, batch):
            rows = ids[s:s + batch, :-1]
            memory = ContextMemory(backend, MemoryConfig("sink", window=window, sinks=sinks))
            state = memory.start(len(rows))
            logits = np.concatenate([memory.feed(state, rows[:, a:b], all_logits=True)
                                     for a, b in _piece_bounds(rows.shape[1], [window])], axis=1)
            correct.append((logits[:, -n:].argmax(-1) == ids[s:s + batch, -n:]).all(1))
            k, v, q = recorder.take()
            keys.append(k[..., -(T - 1):, :])  # the last T-1 recorded tokens are the row's (after any stream prefix)
            values.append(v[..., -(T - 1):, :])
            queries.append(q[..., -(T - 1):, :])
    finally:
        recorder.close()
    return torch.cat(keys), torch.cat(values), torch.cat(queries), np.concatenate(correct)


def answer_exact_kv(model, keys: torch.Tensor, values: torch.Tensor, trial: Trial, picked: Sequence[int],
                    sinks: int, window: int) -> bool:
    """The answer scored on re-inserted cache entries instead of re-encoded tokens (InfLLM's way)."""
    predicted = kv_logits(model, keys, values, trial, picked, sinks, window).argmax(-1)
    return bool((predicted == torch.from_numpy(trial.answer)).all())


@torch.inference_mode()
def kv_logits(model, keys: torch.Tensor, values: torch.Tensor, trial: Trial, picked: Sequence[int],
              sinks: int, window: int) -> torch.Tensor:
    """(n, V) logits of the answer's tokens when the stream's own keys and values (L, Hkv, C', D) of
    [sinks][picked][window but its last token] are the past, at compacted positions 0..S-1 (the
    cache stores keys unrotated, so placing a slot is choosing its rank), and the context's last
    token and the answer but its last are fed on top."""
    C = len(trial.context)
    start, end = evicted_span(C, sinks, window)
    slots = torch.as_tensor(list(range(min(sinks, C))) + sorted(set(int(i) for i in picked)) + list(range(end, C - 1)))
    past = [(keys[layer][:, slots][None], values[layer][:, slots][None]) for layer in range(keys.shape[0])]
    new = torch.from_numpy(np.concatenate((trial.context[-1:], trial.answer[:-1])))[None]
    mask = torch.ones(1, len(slots) + new.shape[1], dtype=torch.bool)
    return model(new, past=past, attention_mask=mask)[0]


@torch.inference_mode()
def answers_exact(model, sequences: list[np.ndarray], answers: list[np.ndarray], pad: int = 0) -> np.ndarray:
    """(B,) bool: sequence + answer, one fresh left-padded forward (positions 0..n-1 per row), every
    answer token the argmax given the tokens before it."""
    rows = [np.concatenate((s, a)) for s, a in zip(sequences, answers)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.from_numpy(r)
        mask[i, width - len(r):] = True
    predicted = model(ids[:, :-1], attention_mask=mask[:, :-1]).argmax(-1)  # (B, width-1)
    out = np.empty(len(rows), dtype=bool)
    for i, a in enumerate(answers):
        out[i] = bool((predicted[i, -len(a):] == torch.from_numpy(a)).all())
    return out


# ---- the measurement -------------------------------------------------------------------------------
def pick(method: str, trial: Trial, budget: int, span, *, decode, q=None, k=None, block=16, offset=0) -> list[int]:
    """Context indices `method` retrieves; "infllm-<reduce>@<layer>" scores with one layer only."""
    if method == "none" or span[1] <= span[0]:
        return []
    if method == "oracle":
        return pick_oracle(trial, span, budget)
    if method == "lexical":
        return pick_lexical(trial, span, budget, decode)
    name, _, layer = method.partition("@")
    layers = slice(None) if not layer else slice(int(layer), int(layer) + 1)
    bounds = block_bounds(span, block, offset)
    scores = block_scores(q[layers], k[layers, :, span[0]:span[1]], [(a - span[0], b - span[0]) for a, b in bounds],
                          name.split("-")[1])
    return pick_blocks(scores.tolist(), bounds, budget)


def select_layer(model, builder, distance: int, sinks: int, window: int, block: int, query_tokens: int,
                 budget: int, reduce: str = "max") -> tuple[int, list[float]]:
    """The layer whose queries, alone, most often retrieve the whole value within `budget`, on
    `builder`'s trials (another seed than the measured ones) -> (layer, that share per layer)."""
    built = builder.build(distance)
    rows = split_trials(builder, built)
    keys, _, queries, _ = stream_pass(model, built, sinks, window)
    hits = np.zeros(keys.shape[1])
    for i, trial in enumerate(rows):
        C = len(trial.context)
        span = evicted_span(C, sinks, window)
        for layer in range(len(hits)):
            picked = pick(f"infllm-{reduce}@{layer}", trial, budget, span, decode=None,
                          q=queries[i, :, :, C - query_tokens:C], k=keys[i], block=block, offset=i)
            hits[layer] += set(range(*trial.value)) <= set(picked)
    rates = (hits / len(rows)).tolist()
    return int(np.argmax(rates)), rates


def measure(model, tokenizer, filler: np.ndarray, *, distances: Sequence[int], budgets: Sequence[int],
            sinks: int, window: int, trials: int, seed: int, block: int = 16, query_tokens: int = 12,
            head: Sequence[int] = (), methods: Sequence[str] = METHODS, log=print) -> list[dict]:
    """One record per (method, distance, budget): accuracy, n, mean retrieved tokens and the share
    of trials whose retrieved tokens hold the whole value."""
    from ctxmem.memory_eval import RecallBuilder

    builder = RecallBuilder(tokenizer, filler, trials, seed, lead=max(16, 2 * sinks), head=head)
    records = []
    for d in distances:
        t0 = time.perf_counter()
        built = builder.build(d)
        rows = split_trials(builder, built)
        keys, values, queries, stream_ok = stream_pass(model, built, sinks, window)
        records.append({"method": "sink (stream)", "distance": d, "budget": 0, "reinsert": "-",
                        "accuracy": float(stream_ok.mean()), "n": len(rows), "extra": 0.0, "value_in": float("nan")})
        for method in methods:
            for budget in ([0] if method == "none" else budgets):
                seqs, value_in, extra, kv_ok = [], [], [], []
                for i, trial in enumerate(rows):
                    C = len(trial.context)
                    span = evicted_span(C, sinks, window)
                    q = queries[i, :, :, C - query_tokens:C]  # (L, H, Q, D): the question's last tokens
                    picked = pick(method, trial, budget, span, decode=tokenizer.decode, q=q, k=keys[i], block=block,
                                  offset=i)
                    seqs.append(compacted(trial.context, picked, sinks, window))
                    kv_ok.append(answer_exact_kv(model, keys[i], values[i], trial, picked, sinks, window))
                    value = range(*trial.value)
                    value_in.append(set(value) <= set(picked) or value[0] >= span[1])
                    extra.append(len(picked))
                ok = answers_exact(model, seqs, [t.answer for t in rows])
                for reinsert, flags in (("text", ok), ("kv", np.asarray(kv_ok))):
                    records.append({"method": method, "distance": d, "budget": budget, "reinsert": reinsert,
                                    "accuracy": float(flags.mean()), "n": len(rows), "extra": float(np.mean(extra)),
                                    "value_in": float(np.mean(value_in))})
        log(f"# d={d}: {time.perf_counter() - t0:.1f}s")
    return records


def table(records: list[dict], sinks: int, window: int) -> str:
    distances = sorted({r["distance"] for r in records})
    rows: dict[tuple[str, int, str], dict] = {}
    for r in records:
        rows.setdefault((r["method"], r["budget"], r["reinsert"]), {})[r["distance"]] = r
    n = max(r["n"] for r in records)
    lines = [f"recall accuracy, greedy answer exact ({n} facts per cell); window {window}, {sinks} sinks; "
             f"the value is inside the window when d <= {window}",
             "cells: accuracy (share of trials whose retrieved tokens hold the whole value)"]
    head = f"{'method':<14} {'budget':>6} {'reinsert':>8} " + " ".join(f"{'d=' + str(d):>12}" for d in distances) \
        + f" {'extra tokens':>12} {'attended':>8}"
    lines += [head, "-" * len(head)]
    for (method, budget, reinsert), by_d in rows.items():
        cells = []
        for d in distances:
            r = by_d.get(d)
            if r is None:
                cells.append(f"{'-':>12}")
            elif np.isnan(r["value_in"]):
                cells.append(f"{r['accuracy']:>5.2f}{'':7}")
            else:
                cells.append(f"{r['accuracy']:>5.2f} ({r['value_in']:.2f})")
        far = [r["extra"] for dd, r in by_d.items() if dd > window]
        extra = float(np.mean(far)) if far else 0.0
        ratio = (sinks + extra + window) / (sinks + window)
        lines.append(f"{method:<14} {budget or '-':>6} {reinsert:>8} " + " ".join(cells)
                     + f" {extra:>12.1f} {ratio:>7.2f}x")
    return "\n".join(lines)


def layer_methods(layer: int) -> tuple[str, ...]:
    return (f"infllm-max@{layer}", f"infllm-attn@{layer}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", required=True, help="the prepared data folder the model trained on (tokenizer, filler)")
    p.add_argument("--distances", default="48,256,512,1024", help="recall distances in tokens (comma-separated)")
    p.add_argument("--budgets", default="32,64", help="retrieved tokens at most (comma-separated)")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--block", type=int, default=16, help="InfLLM block size in tokens")
    p.add_argument("--query-tokens", type=int, default=12, help="InfLLM: the question's last tokens whose queries score")
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from ctxmem.checkpoint import load_model
    from ctxmem.memory_eval import RecallBuilder
    from ctxmem.training.data import TokenData

    torch.set_num_threads(args.threads)
    data = TokenData(args.data)
    tokenizer = data.tokenizer()
    model = load_model(args.checkpoint).eval()
    tokens = np.asarray(data.stream("val", 1_000_000), dtype=np.int64)
    bos = getattr(tokenizer, "bos_id", None)
    head = tokens[:1] if bos is not None and len(tokens) and int(tokens[0]) == bos else tokens[:0]
    filler = tokens[len(head):]
    selector = RecallBuilder(tokenizer, filler, args.trials, args.seed + SELECT_SEED, max(16, 2 * args.sinks),
                             head.tolist())
    budgets = [int(x) for x in args.budgets.split(",")]
    layer, rates = select_layer(model, selector, 4 * args.window, args.sinks, args.window, args.block,
                                args.query_tokens, min(budgets))
    print(f"retrieval layer {layer}: per layer, the share of {args.trials} trials (seed {args.seed + SELECT_SEED}, "
          f"d={4 * args.window}) whose infllm-max pick of {min(budgets)} tokens, that layer alone, holds the whole "
          "value: "
          + " ".join(f"{r:.2f}" for r in rates))
    records = measure(model, tokenizer, filler, distances=[int(x) for x in args.distances.split(",")],
                      budgets=budgets, sinks=args.sinks, window=args.window,
                      trials=args.trials, seed=args.seed, block=args.block, query_tokens=args.query_tokens,
                      head=head.tolist(), methods=METHODS + layer_methods(layer))
    print(table(records, args.sinks, args.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
