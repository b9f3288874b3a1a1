"""The fused graph (export/graph_builder.py) against PyTorch on every model part it writes, against
the traced graph, and the int4 variant's accuracy (export/quantize.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest


def _checkpoint(tmp_path, **changes):
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(1)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size).replace(**changes))
    with torch.no_grad():  # a non-zero learned sink and biases, so that a graph ignoring them fails
        for name, p in model.named_parameters():
            if name.endswith(("head_sink", "bias")) and p.dim() == 1:
                p.normal_(0.0, 0.5)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    return tmp_path / "ckpt", model


@pytest.mark.parametrize("changes", [
    # GPT-2-like: LayerNorm, GELU, biases, learned absolute positions - verified under recompute,
    # whose re-prefills make the structured check take 10-70 s here: out of the fast loop
    pytest.param(dict(norm="layernorm", ffn="gelu", bias=True, pos="learned", tie_embeddings=False),
                 id="layernorm-gelu-bias-learned-positions", marks=pytest.mark.slow),
    # gpt-oss-like: a learned sink logit per head, grouped-query attention, ReLU FFN
    pytest.param(dict(sink="learned", n_kv_heads=2, ffn="relu"), id="learned-head-sink-gqa-relu"),
])
def test_fused_graph_passes_verification_for_each_model_part(tmp_path, changes):
    """verify_export's whole structured check (prefill, decode, the sink window slid three times, a
    chunk into the slid cache, the end of the context, greedy tokens) on models with the parts the
    default tiny model lacks."""
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.export.runtime import RuntimeConfig

    ckpt, _ = _checkpoint(tmp_path, **changes)
    out = export_onnx(ckpt, tmp_path / "export", verify_tokens=16)
    report = json.loads((out / "verification.json").read_text())
    assert report["status"] == "passed" and report["greedy"]["identical"]
    assert RuntimeConfig.load(out).optimization["graph"] == "fused"


@pytest.mark.slow  # traces the model with torch.onnx.export (~15 s)
def test_fused_and_traced_graphs_compute_the_same_outputs(tiny_checkpoint, tiny_export, tmp_path):
    """Two independent constructions of contract v2 - written op by op, and traced from PyTorch -
    agree on logits and the whole cache, on a layout that scores sinks apart (a chunk past the window)."""
    from ctxmem.checkpoint import load_model
    from ctxmem.export.contract import ExportContract
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.export.runtime import OrtBackend, RuntimeConfig

    traced = export_onnx(tiny_checkpoint, tmp_path / "traced", graph="traced", verify=False)
    assert RuntimeConfig.load(traced).optimization["graph"] == "traced"
    contract = ExportContract.for_model(load_model(tiny_checkpoint).cfg)
    args = contract.example_inputs(batch=2, new=6, past=9)
    feed = dict(zip(contract.input_names, [a.numpy() for a in args[:6]] + [t.numpy() for kv in args[6] for t in kv]))
    assert feed["sink_keys"].any() and not np.array_equal(feed["sink_positions"], feed["positions"])
    fused_out = OrtBackend(tiny_export).session.run(None, feed)
    traced_out = OrtBackend(traced).session.run(None, feed)
    for name, a, b in zip(contract.output_names, fused_out, traced_out):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.slow  # trains and exports the `small` fixture (~30 s): out of the fast loop
def test_int4_variant_is_measured_like_int8(small_export, small_checkpoint, tmp_path):
    from ctxmem.export.onnx_export import derive_variant
    from ctxmem.export.runtime import RuntimeConfig

    out = derive_variant(small_export, tmp_path / "int4", "int4", eval_data=small_checkpoint.parent / "val.txt")
    report = json.loads((out / "verification.json").read_text())
    acc = report["accuracy"]
    print(f"int4 accuracy: loss {acc['reference_loss']:.4f} -> {acc['loss']:.4f} "
          f"({100 * acc['loss_rel_change']:+.3f}%), top-1 agreement {acc['top1_agreement']:.3f}, "
          f"greedy {report['greedy']['tokens_matched']}/{report['greedy']['tokens_compared']}")
    assert report["status"] == "passed" and report["variant"] == "int4"
    assert abs(acc["loss_rel_change"]) <= 0.02
    assert RuntimeConfig.load(out).optimization["bits"] == 4
    # an eighth of the fp32 weight bytes plus one scale per 32 weights, the fp32 embedding aside
    assert (out / "model.onnx.data").stat().st_size < (small_export / "model.onnx.data").stat().st_size / 2
