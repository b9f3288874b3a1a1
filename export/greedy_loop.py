"""Greedy decoding inside ONNX Runtime: the next K decode steps of a batch in one Loop call.

A decode step of the fused graph costs about what onnxruntime-genai's does, but each step also
pays the Python around it (the memory's bookkeeping, the backend, the sampler: ~130 us a token at
batch 1, export/README.md) where genai's loop is C++. When every row of a batch decodes greedily,
the next K steps need no sampler: the Loop's body is the decode branch plus an ArgMax, step i + 1
fed step i's pick, the cache carried from step to step (GroupQueryAttention appends a slot). One
`session.run` gives the K picks and the cache after them; ContextMemory.feed_greedy books the K
tokens at once and ctxmem.generation hands them to the rows one step at a time.

Exact: the body is the decode branch's own nodes, so each step's logits are those of a plain decode
step bit for bit and the picks numpy's argmax of them (tests/test_export_greedy_loop.py). A pick
whose logit is not finite (where the sampler's guarded path would decide) gives the run back to the
step-by-step loop. The Loop's session is made on first use: its own copy of the weights."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .contract import ALLOWED, INPUT_IDS, LOGITS, POSITIONS

STEPS = "greedy_steps"  # int64 scalar: decode steps the Loop runs
LOGITS_AT = "logits_at_step"  # (K, B, 1, V): step i's logits
PICKS_AT = "pick_at_step"  # (K, B, 1) int64: step i's argmax, fed to step i + 1


def greedy_loop_model(decode_model):
    """The Loop model over ``decode_model`` (the decode branch as a model of its own:
    runtime.decode_branch_model). Inputs: STEPS, then the decode branch's own (input_ids (B, 1),
    positions (B, 1), allowed (B, 1, M), the pasts (B, Hkv, M-1, D)). Outputs: the presents after
    the last step (B, Hkv, M-1+K, D), LOGITS_AT and PICKS_AT. The body is the branch's nodes as
    they are, plus: pick = ArgMax(logits) (the first of equal maxima, as numpy's argmax), positions
    + 1, allowed with its last column repeated (the slot just written is visible to the next query).
    The pasts are carried as the branch's presents: GroupQueryAttention appends one slot a step."""
    from onnx import TensorProto, helper

    graph = decode_model.graph
    inputs = [i.name for i in graph.input]
    pasts = [n for n in inputs if n.startswith("past_")]
    presents = [o.name for o in graph.output if o.name.startswith("present_")]
    ids, positions, allowed = INPUT_IDS, POSITIONS, ALLOWED
    assert set(inputs) == {ids, positions, allowed, *pasts}, inputs
    declared = {i.name: i for i in graph.input}
    elem = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}  # the cache's: float or half

    def const(name: str, values) -> Any:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(
            name + "_value", TensorProto.INT64, [len(values)], values))

    body_nodes = list(graph.node) + [
        helper.make_node("ArgMax", [LOGITS], ["pick"], axis=2, keepdims=0),  # (B, 1, V) -> (B, 1)
        const("one", [1]), const("last", [-1]), const("end", [2**62]), const("axis2", [2]),
        helper.make_node("Add", [positions, "one"], ["next_positions"]),
        helper.make_node("Slice", [allowed, "last", "end", "axis2"], ["newest_column"]),  # (B, 1, 1)
        helper.make_node("Concat", [allowed, "newest_column"], ["next_allowed"], axis=2),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Identity", [LOGITS], ["logits_out"]),
        helper.make_node("Identity", ["pick"], ["pick_out"]),
    ]
    any_shape = lambda name, elem: helper.make_tensor_value_info(name, elem, None)  # noqa: E731
    body = helper.make_graph(
        body_nodes, "greedy_step",
        [helper.make_tensor_value_info("step", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         any_shape(ids, TensorProto.INT64), any_shape(positions, TensorProto.INT64), any_shape(allowed, TensorProto.BOOL),
         *(any_shape(p, elem[p]) for p in pasts)],
        [any_shape("cond_out", TensorProto.BOOL), any_shape("pick", TensorProto.INT64),
         any_shape("next_positions", TensorProto.INT64), any_shape("next_allowed", TensorProto.BOOL),
         *(any_shape(p, elem[p]) for p in presents),
         any_shape("logits_out", elem[LOGITS]), any_shape("pick_out", TensorProto.INT64)])
    loop = helper.make_node(
        "Loop", [STEPS, "keep_going", ids, positions, allowed, *pasts],
        ["last_pick", "last_positions", "last_allowed", *presents, LOGITS_AT, PICKS_AT], body=body, name="greedy_steps")
    outer = helper.make_graph(
        [helper.make_node("Constant", [], ["keep_going"], value=helper.make_tensor("true", TensorProto.BOOL, [], [True])),
         loop],
        graph.name + "_greedy_loop",
        [helper.make_tensor_value_info(STEPS, TensorProto.INT64, []), *(declared[n] for n in inputs)],
        [*(o for o in graph.output if o.name in presents), any_shape(LOGITS_AT, elem[LOGITS]),
         any_shape(PICKS_AT, TensorProto.INT64)],
        initializer=list(graph.initializer))
    model = helper.make_model(outer, opset_imports=list(decode_model.opset_import),
                              producer_name=decode_model.producer_name)
    model.ir_version = decode_model.ir_version
    return model


class GreedyLoop:
    """The greedy Loop of one OrtBackend: ``make_session()`` builds its InferenceSession (on first use),
    ``past_names`` / ``present_names`` name the graph's cache inputs and outputs in order."""

    def __init__(self, make_session: Callable[[], Any], past_names: list[str], present_names: list[str]):
        self._make_session = make_session
        self._session = None
        self._past_names, self._present_names = past_names, present_names

    def run(self, ids: np.ndarray, allowed: np.ndarray, positions: np.ndarray, past, steps: int):
        """``steps`` greedy decode steps from ids, positions (B, 1) (frame-relative), allowed (B, 1, P+1)
        and past (per layer (k, v), (B, Hkv, P, D)): (picks (B, steps) int64, the presents after the
        last step per layer (k, v) (B, Hkv, P + steps, D), the logits (steps, B, V) float32)."""
        if self._session is None:
            self._session = self._make_session()
        feed = {STEPS: np.array(steps, np.int64), INPUT_IDS: np.ascontiguousarray(ids, np.int64),
                POSITIONS: np.ascontiguousarray(positions, np.int64), ALLOWED: np.ascontiguousarray(allowed)}
        feed.update(zip(self._past_names, (np.ascontiguousarray(a) for kv in past for a in kv)))
        outs = self._session.run([*self._present_names, LOGITS_AT, PICKS_AT], feed)
        n = len(self._present_names)
        picks = outs[n + 1][:, :, 0].T  # (K, B, 1) -> (B, K)
        return picks, list(zip(outs[0:n:2], outs[1:n:2])), outs[n][:, :, 0]
