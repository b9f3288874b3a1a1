"""Per-token decode latency of the memory policies as the stream grows past the window.

    .venv/bin/python bench/bench_memory.py [--preset small] [--context 1024] [--window W] [--sinks 4]

Prints one table, all from one run: the sink policy's latency at stream lengths 1x, 4x, 16x and
32x the window (it should stay flat), and the recompute baselines (chunk=1 = StreamingLLM's
"sliding window with re-computation", chunk=window/4) on the same model. Ratios, not absolute
times, are the result: machines are shared and noisy.
Then the cost of exactness: prefilling a 4x-window prompt under `sink` with the exact banded
layout (any piece size gives token-by-token results) beside the earlier inexact prefill, which fed
window-sized pieces and evicted down to the sinks at each piece boundary (re-implemented here as the
baseline), interleaved rounds, medians.
The retrieve policy (sink + evicted blocks put back, ctxmem.retrieval) at 1x, 4x and 8x the window,
each beside a fresh sink@1x: its store fills to its bound (2,048 tokens by default) by 4x, so 8x
shows whether the cost stays flat once the store drops blocks.
Targets: sink@32x <= 1.15 x sink@1x; sink >= 10x faster per token than recompute chunk=1;
exact prefill <= 1.3x the piecewise prefill; retrieve <= 1.5x sink per token, flat past 4x.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ctxmem.backend import TorchBackend
from ctxmem.config import preset
from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.model import Transformer

CLOCK = time.thread_time


def per_token_ms(memory: ContextMemory, state, tokens: list[int], repeats: int, reduce=statistics.median) -> float:
    """Median (or ``reduce``) over `repeats` single-token feeds (each a decode step plus any eviction)."""
    times = []
    for t in tokens[:repeats]:
        start = CLOCK()
        memory.feed(state, np.array([[t]]))
        times.append(CLOCK() - start)
    return 1000 * reduce(times)


@torch.inference_mode()
def piecewise_prefill(model, tokens: list[int], sinks: int, window: int) -> None:
    """The inexact prefill this project had before: window-sized pieces, each fed after evicting the
    cache down to the sinks (so a token's context depended on where the pieces fell)."""
    past = None
    for start in range(0, len(tokens), window):
        piece = torch.tensor([tokens[start:start + window]])
        if past is not None:
            past = [(k[:, :, :sinks], v[:, :, :sinks]) for k, v in past]
        P = past[0][0].shape[2] if past else 0
        _, past = model(piece, attention_mask=torch.ones(1, P + piece.shape[1], dtype=torch.bool), past=past,
                        use_cache=True)


def prefill_rows(backend, model, window: int, sinks: int, rounds: int, rng) -> list[tuple]:
    tokens = rng.integers(0, 512, 4 * window).tolist()
    exact = ContextMemory(backend, MemoryConfig("sink", window=window, sinks=sinks))
    timings: dict[str, list[float]] = {"exact": [], "piecewise": []}
    for _ in range(rounds):  # interleaved, so drift hits both alike
        start = CLOCK()
        exact.feed(exact.start(1), [tokens])
        timings["exact"].append(CLOCK() - start)
        start = CLOCK()
        piecewise_prefill(model, tokens, sinks, window)
        timings["piecewise"].append(CLOCK() - start)
    base = statistics.median(timings["piecewise"])
    return [(name, 1000 * statistics.median(t), statistics.median(t) / base) for name, t in timings.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="model preset (random weights: latency does not depend on them)")
    parser.add_argument("--context", type=int, default=1024,
                        help="model context (max_seq_len) override: StreamingLLM's regime is windows of 1k-4k tokens")
    parser.add_argument("--window", type=int, default=None, help="recent tokens kept (default: context - sinks)")
    parser.add_argument("--sinks", type=int, default=4, help="attention-sink tokens")
    parser.add_argument("--measure", type=int, default=48, help="tokens timed at each stream length")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = least noise)")
    parser.add_argument("--prefill-rounds", type=int, default=3, help="interleaved rounds of the prefill comparison")
    parser.add_argument("--budget", type=int, default=32, help="retrieve: tokens put back (0 = no retrieve rows)")
    parser.add_argument("--retrieve-multiples", type=int, nargs="*", default=[1, 4, 8],
                        help="stream lengths, in windows, where retrieve is timed (fed token by token past the "
                             "window, as its meaning asks: the longest dominates the bench's time)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, vocab_size=512, max_seq_len=args.context)).eval()
    backend = TorchBackend(model)
    window = args.window or model.cfg.max_seq_len - args.sinks
    rng = np.random.default_rng(0)
    rows = []

    sink = ContextMemory(backend, MemoryConfig("sink", window=window, sinks=args.sinks))
    state = sink.start(1)
    fed = 0

    def fresh_1x_ms() -> float:
        """A new stream measured at 1x, right beside each long-stream measurement: a long run drifts
        (allocator, clock, neighbours) by more than the effect measured, so each ratio compares
        two measurements taken moments apart."""
        ref = sink.start(1)
        sink.feed(ref, [rng.integers(0, 512, window - args.measure).tolist()])
        return per_token_ms(sink, ref, rng.integers(0, 512, args.measure).tolist(), args.measure)

    for multiple in (1, 4, 16, 32):
        target = multiple * window
        while fed < target - args.measure:  # stream up to just before the measuring point
            n = min(window, target - args.measure - fed)
            sink.feed(state, [rng.integers(0, 512, n).tolist()])
            fed += n
        reference = fresh_1x_ms()
        ms = per_token_ms(sink, state, rng.integers(0, 512, args.measure).tolist(), args.measure)
        fed += args.measure
        rows.append((f"sink (sinks={args.sinks}, window={window})", f"{multiple}x", ms, ms / reference,
                     int(state.evicted[0])))

    recompute_ms = {}
    for chunk in (1, max(1, window // 4)):
        reference = fresh_1x_ms()
        memory = ContextMemory(backend, MemoryConfig("recompute", window=window, chunk=chunk))
        st = memory.start(1)
        memory.feed(st, [rng.integers(0, 512, window).tolist()])  # window full: steady state from here
        # chunk>1 re-prefills once every `chunk` tokens: time whole cycles so the mean is honest
        n = args.measure if chunk == 1 else chunk * max(1, args.measure // chunk)
        start = CLOCK()
        for t in rng.integers(0, 512, n).tolist():
            memory.feed(st, np.array([[t]]))
        ms = 1000 * (CLOCK() - start) / n
        recompute_ms[chunk] = ms / reference
        rows.append((f"recompute (chunk={chunk})", "steady", ms, ms / reference, int(st.evicted[0])))

    retrieve_ratio = {}
    if args.budget:
        r_window = min(window, model.cfg.max_seq_len - args.sinks - args.budget)  # sink's window where it fits
        retrieve = ContextMemory(backend, MemoryConfig("retrieve", window=r_window, sinks=args.sinks, budget=args.budget))
        r_state, r_fed = retrieve.start(1), 0
        for multiple in args.retrieve_multiples:
            target = multiple * r_window
            while r_fed < target - args.measure:
                n = min(r_window, target - args.measure - r_fed)
                retrieve.feed(r_state, [rng.integers(0, 512, n).tolist()])
                r_fed += n
            reference = fresh_1x_ms()
            # the mean, not the median: one token in `every` pays for scoring the store and any put-back
            ms = per_token_ms(retrieve, r_state, rng.integers(0, 512, args.measure).tolist(), args.measure,
                              reduce=statistics.mean)
            r_fed += args.measure
            retrieve_ratio[multiple] = ms / reference
            store = r_state.stores[0]
            rows.append((f"retrieve (budget={args.budget}, window={r_window}, mean)", f"{multiple}x", ms, ms / reference,
                         int(r_state.evicted[0])))
            if store is not None:
                rows[-1] = rows[-1] + (f"store {store.tokens} tokens, {store.nbytes / 2**20:.1f} MiB",)

    print(f"\nper-token decode latency, preset={args.preset} ({model.cfg.num_params() / 1e6:.1f}M params), "
          f"context={model.cfg.max_seq_len}, torch threads={args.threads}, thread CPU time")
    print(f"{'policy':38s} {'stream':>7s} {'ms/token':>9s} {'vs sink@1x':>11s} {'evicted':>8s}   (ratio vs a fresh 1x stream timed just before)")
    for name, length, ms, ratio, evicted, *extra in rows:
        print(f"{name:38s} {length:>7s} {ms:9.2f} {ratio:10.2f}x {evicted:8d}   {' '.join(extra)}")
    print(f"\nsink@32x / sink@1x = {rows[3][3]:.2f} (target <= 1.15)")
    print(f"recompute(chunk=1) / sink = {recompute_ms[1]:.1f}x slower per token (target >= 10x)")
    print(f"recompute(chunk={max(1, window // 4)}) / sink = {recompute_ms[max(1, window // 4)]:.1f}x")
    if retrieve_ratio:
        longest = max(retrieve_ratio)
        print(f"retrieve@{longest}x / sink@1x = {retrieve_ratio[longest]:.2f} (target <= 1.5); "
              + ", ".join(f"@{m}x {r:.2f}" for m, r in sorted(retrieve_ratio.items())) + " (flat once the store is full)")

    prefill = prefill_rows(backend, model, window, args.sinks, args.prefill_rounds, rng)
    print(f"\nprefill of a {4 * window}-token prompt (4x the window) under sink, median of {args.prefill_rounds} "
          "interleaved rounds")
    print(f"{'prefill':38s} {'ms':>9s} {'vs piecewise':>13s}")
    labels = {"exact": "exact banded layout (any piece size)", "piecewise": "piecewise, evict at boundaries (old)"}
    for name, ms, ratio in prefill:
        print(f"{labels[name]:38s} {ms:9.1f} {ratio:12.2f}x")
    print(f"exact / piecewise = {prefill[0][2]:.2f} (target <= 1.3)")

if __name__ == "__main__":
    main()
