"""Weight-only quantisation of an export's MatMul weights into ONNX Runtime's MatMulNBits (int8, int4).

Each weight matrix (K in, N out) is cut into blocks of BLOCK_SIZE along K with one fp32 scale per
block (symmetric: no zero points); activations stay float32 and, with accuracy_level 4, MLAS
quantises them to int8 per block inside the kernel, so a decode step reads a quarter (int8) or an
eighth (int4) of the fp32 weight bytes. The embedding lookup, the rotary tables, the norms and the
cache stay fp32: the contract's cache layout does not change. Measured faster than
quantize_dynamic's MatMulInteger + DynamicQuantizeLinear pair at decode sizes (export/README.md),
and the one op onnxruntime-genai's builder also uses for int8 and int4.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

BLOCK_SIZE = 32  # the block along K; 32 keeps int4 within the accuracy gate on the tests' trained model
ACCURACY_LEVEL = 4  # int8 activations inside MatMulNBits (MLAS's fastest CPU path)


def quantize_weights(src: Path, dst: Path, bits: int) -> dict[str, Any]:
    """Quantise every MatMul with a constant weight of the graph at ``src`` into MatMulNBits of ``bits``
    (8 or 4) and save it at ``dst`` (weights external). Returns what runtime_config records."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    # the quantizer logs every node at INFO (and its module sets up a root handler): keep it to warnings
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    settings = dict(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, **settings,
                                     algo_config=DefaultWeightOnlyQuantConfig(bits=bits, **settings))
    quantizer.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    quantized = sum(node.op_type == "MatMulNBits" for node in _nodes(onnx.load(str(dst), load_external_data=False).graph))
    return {"quantization": f"weight-only int{bits} (onnxruntime MatMulNBits)", "bits": bits,
            "block_size": BLOCK_SIZE, "symmetric": True, "accuracy_level": ACCURACY_LEVEL,
            "quantized_ops": ["MatMul"], "quantized_nodes": quantized}


def _nodes(graph):
    """Every node of a graph and of its subgraphs (the fused graph's If branches share the weights)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield from _nodes(attr.g)


__all__ = ["quantize_weights", "BLOCK_SIZE", "ACCURACY_LEVEL"]
