"""The fused decode graph: the export contract (export/contract.py) written node by node with ONNX
Runtime's contrib ops, from the checkpoint's weights, instead of traced from PyTorch.

Why: the traced graph spends a decode step in ~350 small nodes (rotary angles recomputed per call,
masks built from comparisons, RMSNorm as Pow/ReduceMean/Sqrt/Reciprocal/Mul, GQA as Expand), so at
decode sizes ONNX Runtime's per-node cost dominated (see export/README.md, "Where decode time goes").
This graph does the same arithmetic in ~30 nodes per layer:

    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   (RMSNorm, residual add fused)
    one MatMul for q|k|v and one for gate|up (weights concatenated), Split
    RotaryEmbedding with a cos/sin table (positions and key positions index it)
    FusedMatMul (Q Kᵀ with the 1/sqrt(D) scale), Add of the layout's bias, Softmax, MatMul with V

It writes contract v4 (export/contract.py): each new key is rotated once, at its position in its
row's frame, before it is cached, so a decode step rotates T keys instead of the whole cache
(contract v2 re-rotated every cached key at every step); the runtime keeps the frame
(export/runtime.py) and the memory policies, serving and verification see the same layout as
before (ctxmem.layout), so the sink window keeps its per-token meaning. Each layer's queries before
rotation are outputs too (query_<i>: the q part of the projection, which both paths compute anyway),
for the retrieve policy, which scores its store of evicted tokens with one layer's queries. Grouped-query attention never copies the cache: the H query heads are reshaped
to (Hkv, rep * T) rows, so each key/value head is read once by the rep query heads that share it.

Shapes: B batch, T new tokens, P past slots, M = P + T, H heads, Hkv kv heads, rep = H / Hkv,
D head_dim, d model width, V vocab.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np

from .contract import (ALLOWED, INPUT_IDS, LOGITS, POSITIONS, SINK_KEYS, SINK_POSITIONS, ExportContract,
                       rotation_span)

MS = "com.microsoft"
TENSOR_INT32 = 6  # onnx.TensorProto.INT32
GRAPH_KIND = "fused"  # runtime_config optimization.graph: "fused" (this module) or "traced" (torch.onnx.export)


class UnsupportedModelError(ValueError):
    """The model has a part this builder does not write (the traced graph serves it instead)."""


def rope_table(cfg, offset: int, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (offset + end, D/2) float32: row r holds position r - offset (end defaults to
    offset). Computed with the core's own ctxmem.model.rope_cos_sin, so every entry is bit-identical
    to what PyTorch uses at that position. The offset lets prefill pieces of the sink layout, whose
    earliest keys may sit at negative positions (rank semantics, ctxmem/layout.py), index the table
    too; the end leaves a v3 row's key frame room to drift (contract.rotation_span)."""
    import torch

    from ctxmem.model import rope_cos_sin

    positions = torch.arange(-offset, offset if end is None else end, dtype=torch.int64)[None]
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # (1, 1, 2*offset, D), halves repeat
    half = cfg.head_dim // 2
    return cos[0, 0, :, :half].numpy().copy(), sin[0, 0, :, :half].numpy().copy()


class _Graph:
    """A tiny node/initializer collector over onnx.helper. A branch (``parent`` given) has its own
    nodes, prefixed names, and shares its parent's initializers (each written once)."""

    def __init__(self, parent: "_Graph | None" = None, prefix: str = ""):
        self.nodes, self.prefix = [], prefix
        self.inits = parent.inits if parent else []
        self.names = parent.names if parent else set()
        self.counter = parent.counter if parent else [0]

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.names:
            self.names.add(name)
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str = "", **attrs):
        from onnx import helper

        self.counter[0] += 1
        base = self.prefix + (name or f"{op_type}_{self.counter[0]}")
        outs = [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def has_decode_branch(cfg) -> bool:
    """Whether build_fused_graph writes the GroupQueryAttention decode branch for this model: rotary
    positions, no learned head sink, a head_dim ONNX Runtime's CPU kernel takes (a multiple of 16);
    the general path serves the rest."""
    return cfg.pos == "rope" and cfg.sink != "learned" and cfg.head_dim % 16 == 0


def build_fused_graph(model, opset: int = 18, decode_branch: bool = True):
    """onnx.ModelProto of ``model`` (a ctxmem Transformer, eval) under contract v4. Raises
    UnsupportedModelError for a part it does not write.

    With ``decode_branch`` (and a model has_decode_branch accepts) the graph is one If over two
    copies of the layer stack sharing every weight: a decode step - one new token per row, a
    cache, every row's sink query position equal to its ordinary one (no sink scored apart), so one
    scoring is exact - runs each layer's attention as one GroupQueryAttention (rotary on q and the
    new key, the cache concatenation, grouped scores with the layout's mask as a bias, softmax, V);
    any other call runs the general path. The general path alone otherwise."""
    from onnx import TensorProto, helper

    cfg = model.cfg
    if cfg.pos != "rope" and cfg.pos != "learned":
        raise UnsupportedModelError(f"positions {cfg.pos!r}")
    contract = ExportContract.for_model(cfg)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    g = _Graph()
    outputs = contract.output_names
    if not (decode_branch and has_decode_branch(cfg)):
        logits, presents, queries = _stack(_Graph(g), cfg, sd, decode=False, into=g)
        _rename(g.nodes, dict(zip([logits, *presents, *queries], outputs)))
    else:
        general, decode = _Graph(g, "general/"), _Graph(g, "decode/")
        branches = {}
        for name, branch, is_decode in (("general", general, False), ("decode", decode, True)):
            logits, presents, queries = _stack(branch, cfg, sd, decode=is_decode, into=branch)
            outs = [helper.make_tensor_value_info(v, TensorProto.FLOAT, None) for v in [logits, *presents, *queries]]
            branches[name] = helper.make_graph(branch.nodes, name, [], outs)
        g.nodes.append(helper.make_node("If", [_decode_condition(g)], outputs, name="decode_or_general",
                                        then_branch=branches["decode"], else_branch=branches["general"]))

    def vi(decl):
        elem = {"int64": TensorProto.INT64, "bool": TensorProto.BOOL, "float32": TensorProto.FLOAT,
                "float16": TensorProto.FLOAT16}[decl.dtype]
        return helper.make_tensor_value_info(decl.name, elem, list(decl.dims))

    graph = helper.make_graph(g.nodes, "ctxmem_fused", [vi(t) for t in contract.inputs()],
                              [vi(t) for t in contract.outputs()], initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                              producer_name="ctxmem.export.graph_builder")
    proto.ir_version = min(proto.ir_version, 10)
    return proto


def _decode_condition(g: _Graph) -> str:
    """bool scalar: one new token per row, a cache, no row scoring its sinks apart (sink_positions
    equal to positions), positions >= 0 (GroupQueryAttention's table starts at 0)."""
    i64 = lambda name, values: g.const(name, np.asarray(values, dtype=np.int64))  # noqa: E731
    one_token = g.op("Equal", [g.op("Gather", [g.op("Shape", [INPUT_IDS]), i64("c.one", 1)], axis=0), i64("c.one", 1)])
    cached = g.op("Greater", [g.op("Gather", [g.op("Shape", ["past_key_0"]), i64("c.two", 2)], axis=0),
                              i64("c.zero", 0)])
    apart = g.op("ReduceMax", [g.op("Cast", [g.op("Not", [g.op("Equal", [POSITIONS, SINK_POSITIONS])])],
                                    to=7)], keepdims=0)  # 1 when some query scores sinks apart
    together = g.op("Equal", [apart, i64("c.zero", 0)])
    nonneg = g.op("GreaterOrEqual", [g.op("ReduceMin", [POSITIONS], keepdims=0), i64("c.zero", 0)])
    return g.op("And", [g.op("And", [one_token, cached]), g.op("And", [together, nonneg])], name="decode_condition")


def _stack(g: _Graph, cfg, sd: dict, decode: bool, into: _Graph) -> tuple[str, list[str], list[str]]:
    """The model from ids to logits in ``g``: (the logits value, the present values in contract
    order, each layer's queries before rotation (B, T, H*D)). ``decode``: each layer's attention as
    one GroupQueryAttention (see build_fused_graph)."""
    H, Hkv, D, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
    rep = H // Hkv
    i64 = lambda name, values: g.const(name, np.asarray(values, dtype=np.int64))  # noqa: E731
    f32 = lambda name, value: g.const(name, np.asarray(value, dtype=np.float32))  # noqa: E731
    linear = lambda key: sd[f"{key}.weight"].T  # torch Linear (out, in) -> MatMul weight (in, out)  # noqa: E731

    x = g.op("Gather", [g.const("tok_emb", sd["tok_emb.weight"]), INPUT_IDS], name="embed")  # (B, T, d)
    if cfg.pos == "learned":
        x = g.op("Add", [x, g.op("Gather", [g.const("pos_emb", sd["pos_emb.weight"]), POSITIONS])])
    rope = cfg.pos == "rope"
    low, high = rotation_span(cfg.max_seq_len)
    scale = 1.0 / math.sqrt(D)
    if decode:
        # allowed (B, 1, M) -> additive bias (B, 1, 1, M); every row's new token at slot M - 1
        bias = g.op("Unsqueeze", [g.op("Where", [ALLOWED, f32("zero", 0.0), f32("neg_inf", -np.inf)]),
                                  i64("axis1", [1])], name="bias")
        shape = g.op("Shape", [ALLOWED])
        total = g.op("Gather", [shape, i64("c.two", 2)], axis=0)  # M
        seqlens = g.op("Cast", [g.op("Expand", [g.op("Sub", [total, i64("c.one", 1)]),
                                                g.op("Slice", [shape, i64("c.zeros1", [0]), i64("c.ones1", [1])])])],
                       to=TENSOR_INT32)  # (B,) M - 1
        total = g.op("Cast", [total], to=TENSOR_INT32)
        cos, sin = rope_table(cfg, 0, high)  # GroupQueryAttention's table starts at position 0
        dcos, dsin = g.const("decode_cos_table", cos), g.const("decode_sin_table", sin)
    else:
        # allowed (B, T, M) -> additive bias, tiled to the (rep * T) rows of a kv group: (B, 1, rep*T, M)
        bias = g.op("Where", [ALLOWED, f32("zero", 0.0), f32("neg_inf", -np.inf)])
        bias = g.op("Tile", [g.op("Unsqueeze", [bias, i64("axis1", [1])]), i64("tile_rep", [1, 1, rep, 1])],
                    name="bias_tiled")
        if rope:
            cos, sin = rope_table(cfg, -low, high)
            cos, sin = g.const("cos_table", cos), g.const("sin_table", sin)
            shift = i64("rope_offset", -low)
            q_pos = g.op("Add", [POSITIONS, shift], name="q_pos")  # the new tokens' queries and keys
            s_pos = g.op("Add", [SINK_POSITIONS, shift], name="s_pos")
            sink_mask = g.op("Unsqueeze", [SINK_KEYS, i64("axes12", [1, 2])], name="sink_mask")  # (B, 1, 1, M)
    q_group_shape = i64("q_group_shape", [0, 0, Hkv, rep, D])
    kv_shape = i64("kv_shape", [0, 0, Hkv, D])
    rows_shape = i64("rows_shape", [0, 0, -1, D])
    back_shape = i64("back_shape", [0, 0, rep, -1, D])
    out_shape = i64("out_shape", [0, 0, d])

    def norm(name: str, inp: str, skip: str | None, extra_bias: str | None):
        """(normed, residual sum): the block's norm, fused with the residual add when skip is given."""
        gamma = g.const(f"{name}.weight", sd[f"{name}.weight"])
        if cfg.norm == "rmsnorm":
            if skip is None:
                return g.op("SimplifiedLayerNormalization", [inp, gamma], epsilon=cfg.norm_eps, axis=-1,
                            stash_type=1, name=name), inp
            ins = [inp, skip, gamma] + ([extra_bias] if extra_bias else [])
            out, *_, total = g.op("SkipSimplifiedLayerNormalization", ins, n_out=4, domain=MS,
                                  epsilon=cfg.norm_eps, name=name)
            return out, total
        beta = g.const(f"{name}.bias", sd[f"{name}.bias"])
        if skip is None:
            return g.op("LayerNormalization", [inp, gamma, beta], epsilon=cfg.norm_eps, axis=-1, name=name), inp
        ins = [inp, skip, gamma, beta] + ([extra_bias] if extra_bias else [])
        out, *_, total = g.op("SkipLayerNormalization", ins, n_out=4, domain=MS, epsilon=cfg.norm_eps, name=name)
        return out, total

    def matmul(name: str, inp: str, weight: np.ndarray, bias_vec: np.ndarray | None = None) -> str:
        out = g.op("MatMul", [inp, g.const(f"{name}.weight", weight)], name=name)
        return out if bias_vec is None else g.op("Add", [out, g.const(f"{name}.bias", bias_vec)])

    def grouped_rows(q: str, positions: str) -> str:
        """q (B, T, H*D) rotated at positions -> (B, Hkv, rep*T, D): the rows of one kv group."""
        if rope:
            q = g.op("RotaryEmbedding", [q, positions, cos, sin], domain=MS)
        q = g.op("Transpose", [g.op("Reshape", [q, q_group_shape])], perm=[0, 2, 3, 1, 4])  # (B, Hkv, rep, T, D)
        return g.op("Reshape", [q, rows_shape])

    presents, queries = [], []
    residual, pending, pending_bias = x, None, None
    for i in range(cfg.n_layers):
        p = f"blocks.{i}"
        h, residual = norm(f"{p}.attn_norm", residual, pending, pending_bias)
        bq = (np.concatenate([sd[f"{p}.attn.w{n}.bias"] for n in "qkv"]) if cfg.bias else None)
        qkv = matmul(f"{p}.attn.wqkv", h, np.concatenate([linear(f"{p}.attn.w{n}") for n in "qkv"], axis=1), bq)
        if decode:  # q|k|v packed (B, 1, (H + 2 Hkv) D) -> (B, 1, H*D); present (B, Hkv, M, D) rotated
            att, keys, present_v = g.op("GroupQueryAttention", [qkv, "", "", f"past_key_{i}", f"past_value_{i}",
                                                                 seqlens, total, dcos, dsin, POSITIONS, bias],
                                        n_out=3, domain=MS, num_heads=H, kv_num_heads=Hkv, do_rotary=1,
                                        scale=scale, name=f"{p}.attn.gqa")
            # the query output (contract v4): the q part of the packed projection, (B, 1, H*D), a
            # copy of H*D floats per row and layer (GroupQueryAttention rotates its own copy)
            queries.append(g.op("Slice", [qkv, i64("c.zeros1", [0]), i64("q_width", [d]), i64("c.last1", [-1])],
                                name=f"{p}.attn.query"))
        else:
            q, k, v = g.op("Split", [qkv, i64(f"{p}.split", [d, Hkv * D, Hkv * D])], n_out=3, axis=-1)
            queries.append(q)  # before rotation (B, T, H*D): the query output (contract v4)
            if rope:  # each new key rotated once, at its own position in the row's frame (contract v3)
                k = g.op("RotaryEmbedding", [k, q_pos, cos, sin], domain=MS)  # (B, T, Hkv*D)
            k = g.op("Transpose", [g.op("Reshape", [k, kv_shape])], perm=[0, 2, 1, 3])  # (B, Hkv, T, D)
            v = g.op("Transpose", [g.op("Reshape", [v, kv_shape])], perm=[0, 2, 1, 3])
            keys = g.op("Concat", [f"past_key_{i}", k], axis=2, name=f"present_key_{i}")  # rotated (B, Hkv, M, D)
            present_v = g.op("Concat", [f"past_value_{i}", v], axis=2, name=f"present_value_{i}")
            scores = g.op("FusedMatMul", [grouped_rows(q, q_pos if rope else None), keys], domain=MS, transA=0,
                          transB=1, alpha=scale)  # (B, Hkv, rep*T, M)
            if rope:  # sink slots are scored with the query rotated at sink_positions (ctxmem/layout.py)
                to_sinks = g.op("FusedMatMul", [grouped_rows(q, s_pos), keys], domain=MS, transA=0, transB=1,
                                alpha=scale)
                scores = g.op("Where", [sink_mask, to_sinks, scores])
            scores = g.op("Add", [scores, bias])
            if cfg.sink == "learned":  # one more softmax column per head, its value zero (gpt-oss)
                weights = _softmax_with_head_sink(g, scores, sd[f"{p}.attn.head_sink"], Hkv, rep, i64, i)
            else:
                weights = g.op("Softmax", [scores], axis=-1)
            att = g.op("MatMul", [weights, present_v])  # (B, Hkv, rep*T, D)
            att = g.op("Transpose", [g.op("Reshape", [att, back_shape])], perm=[0, 3, 1, 2, 4])  # (B, T, Hkv, rep, D)
            att = g.op("Reshape", [att, out_shape])
        presents += [keys, present_v]
        att = matmul(f"{p}.attn.wo", att, linear(f"{p}.attn.wo"))
        wo_bias = g.const(f"{p}.attn.wo.bias", sd[f"{p}.attn.wo.bias"]) if cfg.bias else None
        h, residual = norm(f"{p}.ffn_norm", residual, att, wo_bias)
        if cfg.ffn == "swiglu":
            gu_bias = np.concatenate([sd[f"{p}.ffn.w_gate.bias"], sd[f"{p}.ffn.w_up.bias"]]) if cfg.bias else None
            gu = matmul(f"{p}.ffn.w_gate_up", h, np.concatenate([linear(f"{p}.ffn.w_gate"), linear(f"{p}.ffn.w_up")],
                                                                axis=1), gu_bias)
            gate, up = g.op("Split", [gu, i64(f"{p}.ffn.split", [cfg.d_ff, cfg.d_ff])], n_out=2, axis=-1)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # silu(gate) * up
        else:
            up = matmul(f"{p}.ffn.w_up", h, linear(f"{p}.ffn.w_up"), sd.get(f"{p}.ffn.w_up.bias"))
            act = g.op("Relu", [up]) if cfg.ffn == "relu" else g.op("Gelu", [up], domain=MS)  # exact (erf) GELU
        pending = matmul(f"{p}.ffn.w_down", act, linear(f"{p}.ffn.w_down"))
        pending_bias = g.const(f"{p}.ffn.w_down.bias", sd[f"{p}.ffn.w_down.bias"]) if cfg.bias else None
    h, _ = norm("norm", residual, pending, pending_bias)
    logits = g.op("MatMul", [h, g.const("lm_head.weight", np.ascontiguousarray(sd["lm_head.weight"].T))], name="lm_head")
    if into is not g:
        into.nodes.extend(g.nodes)
    return logits, presents, queries


def _softmax_with_head_sink(g: _Graph, scores: str, head_sink: np.ndarray, Hkv: int, rep: int, i64, layer: int) -> str:
    """softmax over [scores, s_h] without the last column: scores (B, Hkv, rep*T, M); s_h the learned
    sink logit of head h = kv * rep + r, laid along the rows (r, t)."""
    sink = g.const(f"blocks.{layer}.attn.head_sink", head_sink.reshape(1, Hkv, rep, 1).astype(np.float32))
    shape = g.op("Shape", [scores])  # (4,): B, Hkv, rep*T, M
    rows = g.op("Slice", [shape, i64(f"l{layer}.s2", [2]), i64(f"l{layer}.e3", [3])])
    t = g.op("Div", [rows, i64(f"l{layer}.rep", [rep])])
    column = g.op("Expand", [sink, g.op("Concat", [i64(f"l{layer}.one3", [1, Hkv, rep]), t], axis=0)])
    column = g.op("Reshape", [column, i64(f"l{layer}.colshape", [1, Hkv, -1, 1])])  # (1, Hkv, rep*T, 1)
    full = g.op("Concat", [g.op("Slice", [shape, i64(f"l{layer}.s0", [0]), i64(f"l{layer}.e3b", [3])]),
                           i64(f"l{layer}.one", [1])], axis=0)
    column = g.op("Expand", [column, full])  # (B, Hkv, rep*T, 1)
    weights = g.op("Softmax", [g.op("Concat", [scores, column], axis=-1)], axis=-1)
    return g.op("Slice", [weights, i64(f"l{layer}.z", [0]), i64(f"l{layer}.m1", [-1]), i64(f"l{layer}.ax", [-1])])


def _rename(nodes: list, renamed: dict[str, str]) -> None:
    """Values renamed after creation (logits, present_*: the contract's names): their producers and
    consumers point at the new names."""
    for node in nodes:
        for j, name in enumerate(node.output):
            if name in renamed:
                node.output[j] = renamed[name]
        for j, name in enumerate(node.input):
            if name in renamed:
                node.input[j] = renamed[name]


def without_decode_branch(proto):
    """The same graph with the general path only (the If replaced by its else branch): for converters
    that do not follow If branches (the float16 converter). Works on a build_fused_graph proto, with or
    without the branch; returns it unchanged when there is none."""
    from onnx import helper

    graph = proto.graph
    branch = next((n for n in graph.node if n.op_type == "If" and n.name == "decode_or_general"), None)
    if branch is None:
        return proto
    general = next(a.g for a in branch.attribute if a.name == "else_branch")
    nodes = [copy.deepcopy(node) for node in general.node]  # renamed below: the given proto stays as it is
    _rename(nodes, {out.name: name for out, name in zip(general.output, branch.output)})
    used = {name for node in nodes for name in node.input}
    inits = [t for t in graph.initializer if t.name in used]
    new = helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output), initializer=inits)
    out = helper.make_model(new, opset_imports=list(proto.opset_import), producer_name=proto.producer_name)
    out.ir_version = proto.ir_version
    return out


def write_fused_graph(model, out_dir: Path, opset: int, model_file: str, data_file: str) -> Path:
    """The fused graph of ``model`` saved as out_dir/model_file with its weights in data_file."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / model_file
    onnx.save_model(build_fused_graph(model, opset), str(path), save_as_external_data=True, location=data_file,
                    size_threshold=1024)
    return path


__all__ = ["build_fused_graph", "write_fused_graph", "rope_table", "has_decode_branch", "without_decode_branch",
           "UnsupportedModelError",
           "GRAPH_KIND"]
