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
    # head_dim 16: the graph gets the GroupQueryAttention decode branch (tiny's 24 does not)
    pytest.param(dict(n_heads=6, n_kv_heads=2), id="decode-branch-head-dim-16"),
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


def _decode_feeds(cfg, rng) -> dict[str, dict[str, np.ndarray]]:
    """Contract v3 feeds over a rotated cache of 9 slots, 2 rows (row 1 left-padded, 3 slots masked):
    a decode step (one token, sink query = ordinary query), a step whose sinks are scored apart, and
    a two-token chunk."""
    B, P, Hkv, D = 2, 9, cfg.n_kv_heads, cfg.head_dim
    cache = {f"past_{kind}_{i}": rng.standard_normal((B, Hkv, P, D)).astype(np.float32)
             for i in range(cfg.n_layers) for kind in ("key", "value")}
    feeds = {}
    for name, T, apart in (("decode", 1, False), ("sinks apart", 1, True), ("chunk", 2, False)):
        allowed = np.ones((B, T, P + T), bool)
        allowed[1, :, :3] = False
        allowed[:, 0, P + 1:] = False  # causal inside the chunk
        positions = np.array([[9 + t for t in range(T)], [6 + t for t in range(T)]], np.int64)
        sink_keys = np.zeros((B, P + T), bool)
        sink_keys[0, :2] = sink_keys[1, 3:5] = True
        feeds[name] = {"input_ids": rng.integers(0, cfg.vocab_size, (B, T)), "positions": positions,
                       "allowed": allowed, "sink_positions": positions - 3 * apart, "sink_keys": sink_keys, **cache}
    return feeds


def test_the_decode_branch_is_one_group_query_attention_per_layer_and_computes_the_general_path(tmp_path):
    """A decode step (one token per row, no sink scored apart) runs the If's GroupQueryAttention
    branch, every other call the general path; both give the general path's logits and cache (fp32
    summation order aside), and without_decode_branch (what the float16 converter gets) is the
    general path alone."""
    import onnxruntime as ort

    from ctxmem.export.graph_builder import build_fused_graph, has_decode_branch, without_decode_branch

    _, model = _checkpoint(tmp_path, n_heads=6, n_kv_heads=2)
    assert has_decode_branch(model.cfg) and not has_decode_branch(model.cfg.replace(n_heads=4))
    branched, general = build_fused_graph(model), build_fused_graph(model, decode_branch=False)
    (if_node,) = [n for n in branched.graph.node if n.op_type == "If"]
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert sum(n.op_type == "GroupQueryAttention" for n in then.node) == model.cfg.n_layers
    assert not [n for n in without_decode_branch(branched).graph.node if n.op_type == "If"]

    def session(proto, profile=False):
        options = ort.SessionOptions()
        options.enable_profiling = profile
        options.profile_file_prefix = str(tmp_path / "profile")
        return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])

    sessions = [session(branched, profile=True), session(general), session(without_decode_branch(branched))]
    ran_gqa = {}
    for name, feed in _decode_feeds(model.cfg, np.random.default_rng(0)).items():
        outs = [s.run(None, feed) for s in sessions]
        for got in outs[0], outs[2]:
            for a, b in zip(got, outs[1]):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)
        events = json.loads(open(sessions[0].end_profiling()).read())
        ran_gqa[name] = any(e.get("args", {}).get("op_name") == "GroupQueryAttention" for e in events)
        sessions[0] = session(branched, profile=True)
    assert ran_gqa == {"decode": True, "sinks apart": False, "chunk": False}


@pytest.mark.slow  # traces the model with torch.onnx.export (~15 s)
def test_fused_and_traced_graphs_compute_the_same_outputs(tiny_checkpoint, tiny_export, tmp_path):
    """Two independent constructions of the model - written op by op under contract v3 (keys cached
    rotated, in a frame per row) and traced from PyTorch under v2 (keys cached before rotation) -
    agree on the logits of every feed of a sink stream (prefill, decode past the window, a chunk that
    scores sinks apart), and on the cache: the same values, and the fused graph's keys are the traced
    graph's rotated at the positions the runtime keeps them at."""
    from ctxmem.export.runtime import OrtBackend, rotate
    from ctxmem.memory import ContextMemory, MemoryConfig

    traced = export_onnx_traced(tiny_checkpoint, tmp_path)
    backends = OrtBackend(tiny_export), OrtBackend(traced)
    assert backends[0].contract.version == 4 and backends[1].contract.version == 2
    mems = [ContextMemory(b, MemoryConfig("sink", window=12, sinks=4)) for b in backends]
    states = [m.start(2) for m in mems]
    rng = np.random.default_rng(0)
    feeds = [[rng.integers(0, 256, 9).tolist(), rng.integers(0, 256, 3).tolist()]]
    feeds += [rng.integers(0, 256, (2, 1)) for _ in range(40)] + [rng.integers(0, 256, (2, 7))]
    for ids in feeds:
        fused, traced_logits = (m.feed(s, ids, all_logits=True) for m, s in zip(mems, states))
        np.testing.assert_allclose(fused, traced_logits, atol=1e-5, rtol=1e-5)
    (f, t), mem = states, mems[0]
    assert np.array_equal(f.mask, t.mask) and f.past.frame.shape == (2,)
    stream = mem._stream_positions(f.mask, f.seen)
    where = np.where(f.mask & (stream < 4), stream, stream - f.past.frame[:, None])  # (B, S) as the runtime keeps them
    valid = f.mask[:, None, :, None]
    for (fk, fv), (tk, tv) in zip(f.past, t.past):
        np.testing.assert_allclose(fv, tv, atol=1e-5, rtol=1e-5)
        rotated = rotate(tk, where, backends[0].head_dim, backends[0].rope_theta)
        np.testing.assert_allclose(np.where(valid, fk, 0), np.where(valid, rotated, 0), atol=1e-5, rtol=1e-5)


def export_onnx_traced(checkpoint, tmp_path):
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.export.runtime import RuntimeConfig

    traced = export_onnx(checkpoint, tmp_path / "traced", graph="traced", verify=False)
    assert RuntimeConfig.load(traced).optimization["graph"] == "traced"
    return traced


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
