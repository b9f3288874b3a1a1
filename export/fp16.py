"""fp16 conversion that keeps rotary angle math in fp32.

A rotary angle is position * inv_freq: at position 1000 an fp16 product is off by up to ~0.5 rad
(fp16 keeps 11 significant bits), which scrambles attention at the end of the context. Only the
angle math stays fp32: every node from which a Cos or Sin is computed (the int64 positions, their
Cast, the products with inv_freq, the Cos/Sin themselves). Their outputs, in [-1, 1], are cast to
fp16 where they meet the fp16 activations; weights, activations and the cache become fp16.
"""
from __future__ import annotations

from typing import Any

ANGLE_OPS = ("Cos", "Sin")


def rope_angle_nodes(model: Any) -> list[str]:
    """Names of the nodes of an onnx.ModelProto whose outputs feed a Cos or Sin (them included)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    stack = [node for node in graph.node if node.op_type in ANGLE_OPS]
    keep: dict[str, Any] = {}
    while stack:
        node = stack.pop()
        if node.name in keep:
            continue
        keep[node.name] = node
        stack.extend(producer[name] for name in node.input if name in producer)
    return sorted(keep)


def convert_keeping_angles_fp32(model: Any) -> tuple[Any, list[str]]:
    """(the fp16 onnx.ModelProto, the names of the nodes kept fp32); logits stay float32 for the sampler."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = rope_angle_nodes(model)
    if any(not name for name in blocked):
        raise ValueError("an angle node has no name; the float16 converter blocks nodes by name")
    return convert_float_to_float16(model, keep_io_types=["logits"], node_block_list=blocked), blocked
