"""One decode step's attention on ONNX Runtime CPU, alone, by cache length: what a longer cache costs.

    .venv/bin/python bench/bench_attention.py [--batch 8] [--slots 72 128 160] [--calls 200] [--rounds 5]

The decode branch of the fused graph attends with `GroupQueryAttention` in place (past and present one
buffer, the new key and value written into it). Beside it, the same attention as plain ops - MatMul,
Softmax, MatMul - with each key/value head's query heads stacked as the rows of one product, on cache
tensors fed whole (what a graph without the shared buffer would compute, less the copy of the cache it
would also pay). The bench's model's sizes: 8 query heads, 4 key/value heads, head size 32. One layer;
CPU time per call, the best of --rounds rounds of --calls calls, 1 intra-op thread.

Inside whole greedy generates, by op: `bench_decode.py --profile` (ONNX Runtime's profiler on the greedy
loop's session under sink far past the window and `full` inside it).

Why: under the sink policy far past its window the cache holds 128-192 slots, `full` inside the window
16-128, and at batch 8 sink's graph steps are slower than full's (bench_decode.py --profile) while its
matrix products are the same; this shows what the attention alone costs by cache length.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

Q_HEADS, KV_HEADS, HEAD = 8, 4, 32
GROUP = Q_HEADS // KV_HEADS


def _session(graph) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _io(name: str, dtype, shape) -> helper.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def gqa_in_place(batch: int, slots: int, capacity: int, rng) -> callable:
    """GroupQueryAttention over `slots` cached slots of a (B, KV_HEADS, capacity, HEAD) buffer that is
    both past and present (the new key/value land in slot `slots`); returns a no-argument call."""
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
                            ["out", "present_k", "present_v"], domain="com.microsoft",
                            num_heads=Q_HEADS, kv_num_heads=KV_HEADS)
    f = TensorProto.FLOAT
    graph = helper.make_graph([node], "gqa", [
        _io("q", f, [batch, 1, Q_HEADS * HEAD]), _io("k", f, [batch, 1, KV_HEADS * HEAD]),
        _io("v", f, [batch, 1, KV_HEADS * HEAD]), _io("past_k", f, [batch, KV_HEADS, capacity, HEAD]),
        _io("past_v", f, [batch, KV_HEADS, capacity, HEAD]), _io("seqlens_k", TensorProto.INT32, [batch]),
        _io("total", TensorProto.INT32, [])], [_io("out", f, None), _io("present_k", f, None), _io("present_v", f, None)])
    session = _session(graph)
    cache = {name: rng.standard_normal((batch, KV_HEADS, capacity, HEAD), dtype=np.float32) for name in ("k", "v")}
    binding = session.io_binding()
    for name, value in {"q": rng.standard_normal((batch, 1, Q_HEADS * HEAD), dtype=np.float32),
                        "k": rng.standard_normal((batch, 1, KV_HEADS * HEAD), dtype=np.float32),
                        "v": rng.standard_normal((batch, 1, KV_HEADS * HEAD), dtype=np.float32),
                        "past_k": cache["k"], "past_v": cache["v"],
                        "seqlens_k": np.full(batch, slots, np.int32),  # cached slots before this token
                        "total": np.array(slots + 1, np.int32)}.items():
        binding.bind_cpu_input(name, value)
    binding.bind_output("out")
    for name in ("k", "v"):  # present written over past: the in-place buffer
        binding.bind_output(f"present_{name}", "cpu", 0, np.float32, list(cache[name].shape), cache[name].ctypes.data)
    return lambda: session.run_with_iobinding(binding)


def plain_ops(batch: int, slots: int, rng) -> callable:
    """MatMul, Softmax, MatMul: q (B, KV_HEADS, GROUP, HEAD) against keys stored transposed
    (B, KV_HEADS, HEAD, slots) and values (B, KV_HEADS, slots, HEAD)."""
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", "v"], ["out"])]
    graph = helper.make_graph(nodes, "plain", [
        _io("q", f, [batch, KV_HEADS, GROUP, HEAD]), _io("k_t", f, [batch, KV_HEADS, HEAD, slots]),
        _io("v", f, [batch, KV_HEADS, slots, HEAD])], [_io("out", f, None)])
    session = _session(graph)
    feed = {"q": rng.standard_normal((batch, KV_HEADS, GROUP, HEAD), dtype=np.float32),
            "k_t": rng.standard_normal((batch, KV_HEADS, HEAD, slots), dtype=np.float32),
            "v": rng.standard_normal((batch, KV_HEADS, slots, HEAD), dtype=np.float32)}
    return lambda: session.run(None, feed)


def cpu_us(call, calls: int, rounds: int) -> float:
    """The best round's CPU time per call, in microseconds (after one warm-up call)."""
    call()
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - start) / calls * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="rows decoding at once")
    parser.add_argument("--slots", type=int, nargs="+", default=[72, 128, 160],
                        help="cached slots (72: full's mean inside a 128 window from a 16-token prompt; "
                             "160: sink 4+124's mean with its 64 slots of slack)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best is reported")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    capacity = max(args.slots) + 1
    print(f"one layer's decode attention, batch {args.batch}, {Q_HEADS} query / {KV_HEADS} key-value heads of "
          f"{HEAD}; CPU us per call, best of {args.rounds} x {args.calls}, 1 thread")
    print(f"{'cached slots':>12}  {'GroupQueryAttention in place':>28}  {'MatMul, Softmax, MatMul':>23}  {'ratio':>5}")
    for slots in args.slots:
        gqa = cpu_us(gqa_in_place(args.batch, slots, capacity, rng), args.calls, args.rounds)
        plain = cpu_us(plain_ops(args.batch, slots, rng), args.calls, args.rounds)
        print(f"{slots:>12}  {gqa:>28.0f}  {plain:>23.0f}  {gqa / plain:>5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
