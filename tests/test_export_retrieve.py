"""The retrieve memory policy (ctxmem.retrieval) on ONNX Runtime: contract v4's query outputs, the
frame cache's export/splice, parity with PyTorch over a long stream, and old exports refusing it.

Tolerance 1e-4 absolute on fp32 logits, as tests/test_memory_retrieve.py and export/verify.py:
ONNX Runtime (MLAS) and PyTorch sum in different orders, and the runtime's keys go through its
per-row frame (rotated by the graph's fp32 table, rotated back to the store and rotated again at
their compacted position in numpy's float64 angles) where PyTorch caches them before rotation:
~1e-6 measured here; a wrong block, slot or rotation moves logits by > 1e-2.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ATOL = 1e-4
CONTEXT = 64  # short, so that the runtime's key frame moves within the stream (at stream index 2 * 64)
LAYER = 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny model with head_dim 16 (the graph gets its GroupQueryAttention decode branch),
    saved and exported with the fused graph (fp32; verification has its own test below)."""
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(3)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_heads=6, n_kv_heads=2,
                               max_seq_len=CONTEXT)).eval()
    root = tmp_path_factory.mktemp("retrieve_export")
    save_checkpoint(root / "ckpt", model, tok)
    return model, export_onnx(root / "ckpt", root / "export", verify=False)


def retrieve(**kw):
    from ctxmem.memory import MemoryConfig

    base = dict(window=12, sinks=2, budget=8, block=4, queries=3, store=32, layer=LAYER, every=1)
    return MemoryConfig("retrieve", **{**base, **kw})


@pytest.fixture(autouse=True)
def one_torch_thread():
    from ctxmem.backend import torch_threads

    with torch_threads(1):  # decode-sized matmuls: a second thread only spins on a shared machine
        yield


def test_retrieve_on_onnx_runtime_is_pytorchs_at_every_step(exported):
    """Two left-padded rows through ContextMemory(retrieve) on both backends: a prompt, single
    tokens and chunks far past the window (the runtime's key frame moves while put-back slots are
    in the cache): logits within ATOL at every step and the same blocks chosen, a choice that keeps
    changing as the store fills and drops its oldest blocks."""
    from ctxmem.backend import TorchBackend
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.memory import ContextMemory

    model, export = exported
    ort = OrtBackend(export)
    assert ort.gives_queries and ort.contract.version == 4 and ort.n_layers == model.cfg.n_layers
    mems = [ContextMemory(TorchBackend(model), retrieve()), ContextMemory(ort, retrieve())]
    states = [m.start(2) for m in mems]
    rng = np.random.default_rng(0)
    feeds = [[rng.integers(0, 256, 30).tolist(), rng.integers(0, 256, 7).tolist()]]
    feeds += [rng.integers(0, 256, (2, 3 if i % 25 == 0 else 1)) for i in range(150)]
    choices, moves_with_put_back, worst = [], 0, 0.0
    for ids in feeds:
        frame = states[1].past.frame.copy() if states[1].past is not None else None
        pinned = states[1].pinned is not None and (states[1].pinned >= 0).any()
        got = [m.feed(s, ids, all_logits=True) for m, s in zip(mems, states)]
        worst = max(worst, float(np.abs(got[0] - got[1]).max()))
        np.testing.assert_allclose(got[1], got[0], atol=ATOL)
        if frame is not None and pinned and (states[1].past.frame != frame).any():
            moves_with_put_back += 1
        if states[0].stores is not None:
            chosen = [s.chosen if s is not None else () for s in states[0].stores]
            assert chosen == [s.chosen if s is not None else () for s in states[1].stores]
            choices.append(chosen[0])
    print(f"retrieve ORT vs PyTorch: max |logit diff| {worst:.2e} over {len(feeds)} feeds")
    assert moves_with_put_back >= 1  # the frame moved (keys re-rotated) with put-back slots held apart
    assert sum(a != b for a, b in zip(choices, choices[1:])) > 20 and len(set(choices)) > 10
    assert max(sum(n for _, n in c) for c in choices) == 8  # the whole budget was put back
    assert states[0].stores[0].lo > 2  # the store (32 tokens) dropped its oldest blocks


def test_query_outputs_of_both_branches_are_pytorchs_queries_before_rotation(exported, tmp_path):
    """query_<i> is layer i's q projection: on a prefill (the general path) and on a decode step
    (the GroupQueryAttention branch, checked by ONNX Runtime's profiler), for every layer."""
    import onnx
    import onnxruntime as ort_lib

    from ctxmem.backend import TorchBackend
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.layout import build_layout

    model, export = exported
    graph = onnx.load(str(export / "model.onnx"), load_external_data=False).graph
    names = [o.name for o in graph.output]
    assert names[-model.cfg.n_layers:] == [f"query_{i}" for i in range(model.cfg.n_layers)]
    (branch,) = [n for n in graph.node if n.op_type == "If"]
    assert all(len(a.g.output) == len(names) for a in branch.attribute)  # both branches give every output
    torch_backend, ort = TorchBackend(model), OrtBackend(export)
    options = ort_lib.SessionOptions()
    options.enable_profiling, options.profile_file_prefix = True, str(tmp_path / "profile")
    ort.session = ort_lib.InferenceSession(str(export / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (2, 6))
    valid = np.ones((2, 6), bool)
    stream = np.broadcast_to(np.arange(6), (2, 6))
    past_t = past_o = None
    for step, (new_ids, layout) in enumerate([(ids, build_layout(stream, valid, 6)),
                                              (ids[:, :1], build_layout(np.broadcast_to(np.arange(7), (2, 7)),
                                                                        np.ones((2, 7), bool), 1))]):
        for layer in range(model.cfg.n_layers):
            want, _, q_t = torch_backend.forward_with_queries(new_ids, layout, past_t, False, layer)
            got, present, q_o = ort.forward_with_queries(new_ids, layout, past_o, False, layer)
            assert q_o.dtype == np.float32 and q_o.shape == (2, model.cfg.n_heads, new_ids.shape[1], 16)
            np.testing.assert_allclose(q_o, q_t, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(got, want, atol=ATOL)
        _, past_t = torch_backend.forward(new_ids, layout, past_t, False)
        past_o = present
    events = json.loads(open(ort.session.end_profiling()).read())
    assert any(e.get("args", {}).get("op_name") == "GroupQueryAttention" for e in events)


def test_frame_cache_export_rotates_back_and_splice_rotates_at_the_given_positions():
    """export: a key of stream index n, stored rotated at n - frame[row], comes out before rotation;
    splice: keys given before rotation land rotated at the given positions, the other slots taken."""
    from ctxmem.export.runtime import FrameCache, FrameCacheOps, rotate

    rng = np.random.default_rng(2)
    B, Hkv, S, D, L, theta = 2, 2, 9, 8, 3, 10000.0
    frame = np.array([0, 300])
    stream = np.stack([np.arange(S) + 40, np.arange(S) + 700])  # (B, S) ordinary slots
    plain = [(rng.standard_normal((B, Hkv, S, D)).astype(np.float32),
              rng.standard_normal((B, Hkv, S, D)).astype(np.float32)) for _ in range(L)]
    cache = FrameCache([(rotate(k, stream - frame[:, None], D, theta), v) for k, v in plain], frame)
    ops = FrameCacheOps((D, theta))
    idx = np.array([[1, 4, 5], [0, 2, 8]])
    k, v = ops.export(cache, idx, np.take_along_axis(stream, idx, axis=1))
    assert k.shape == v.shape == (B, 3, L, Hkv, D)
    for i, (pk, pv) in enumerate(plain):
        for r in range(B):
            np.testing.assert_allclose(k[r, :, i], pk[r][:, idx[r]].transpose(1, 0, 2), atol=1e-5)
            np.testing.assert_array_equal(v[r, :, i], pv[r][:, idx[r]].transpose(1, 0, 2))
    keep = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    new_k, new_v = rng.standard_normal((2, B, 2, L, Hkv, D)).astype(np.float32)
    positions = np.array([[2, 3], [2, 3]])
    out = ops.splice(cache, keep, 1, new_k, new_v, positions)
    assert isinstance(out, FrameCache) and np.array_equal(out.frame, frame)
    for i, ((ck, cv), (ok, ov)) in enumerate(zip(cache, out)):
        want = rotate(new_k[:, :, i].transpose(0, 2, 1, 3), positions, D, theta)  # (B, Hkv, 2, D)
        np.testing.assert_allclose(ok[:, :, 1:3], want, atol=1e-6)
        np.testing.assert_array_equal(ov[:, :, 1:3], new_v[:, :, i].transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(ok[:, :, [0, 3, 4, 5]], ck[:, :, [0, 3, 4, 5]])
    unrotated = FrameCacheOps(None)  # learned positions: keys never rotated, nothing to undo
    np.testing.assert_array_equal(unrotated.export(cache, idx, stream[:, :3])[0][0, :, 0],
                                  cache[0][0][0][:, idx[0]].transpose(1, 0, 2))


def _as_contract_v3(export, out):
    """The same export as a ctxmem before contract v4 wrote it: no query outputs declared or given."""
    import onnx

    from ctxmem.export.contract import ExportContract

    shutil.copytree(export, out)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)  # weights stay in model.onnx.data
    kept = [o for o in proto.graph.output if not o.name.startswith("query_")]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save_model(proto, str(out / "model.onnx"))
    config = json.loads((out / "runtime_config.json").read_text())
    contract = ExportContract.from_dict(config["contract"])
    old = ExportContract(contract.n_layers, contract.n_kv_heads, contract.head_dim, contract.vocab_size,
                         version=3).to_dict()
    assert "n_heads" not in old and [o.name for o in kept] == [t["name"] for t in old["outputs"]]
    config["contract"] = old
    (out / "runtime_config.json").write_text(json.dumps(config))
    return out


def test_an_export_of_contract_v3_runs_sink_and_refuses_retrieve_naming_the_reexport_command(exported, tmp_path):
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError

    _, export = exported
    old = OrtBackend(_as_contract_v3(export, tmp_path / "v3"))
    assert old.contract.version == 3 and not old.gives_queries
    with pytest.raises(MemoryConfigError, match=r"re-export it with `ctxmem export"):
        ContextMemory(old, retrieve())
    with pytest.raises(MemoryConfigError, match=r"contract v3.*`ctxmem export --model CHECKPOINT --out DIR`"):
        old.forward_with_queries(np.zeros((1, 1), np.int64), None, None, True, LAYER)
    sink = MemoryConfig("sink", window=12, sinks=2)  # every other policy runs as before, the same logits
    ids = np.random.default_rng(4).integers(0, 256, (1, 40))
    got = []
    for backend in (old, OrtBackend(export)):
        memory = ContextMemory(backend, sink)
        state = memory.start(1)
        got.append(np.concatenate([memory.feed(state, ids[:, i:i + 1]) for i in range(40)]))
    np.testing.assert_array_equal(got[0], got[1])


def test_verification_runs_the_retrieve_stage_and_catches_a_wrong_rotation(exported, monkeypatch):
    """ctxmem export's verification has a retrieve stage (logits, cache, queries and the store's
    copies against PyTorch, the choice changing); a runtime that put keys back unrotated fails it."""
    from ctxmem.export import verify
    from ctxmem.export.errors import AtolError
    from ctxmem.export.runtime import FrameCacheOps, OrtBackend

    model, export = exported
    ort = OrtBackend(export)
    stage = verify._retrieve_run(model, ort, gate_values=True)
    assert stage["calls"] > verify.RETRIEVE_STEPS and stage["max_abs_diff"] < ATOL
    assert stage["queries_max_abs_diff"] < ATOL and stage["choice_changes"] > 10 and stage["dropped_from_store"] > 0
    monkeypatch.setattr(FrameCacheOps, "_rotated", lambda self, k, positions: k)  # export and splice skip rotation
    with pytest.raises(AtolError) as err:
        verify._retrieve_run(model, OrtBackend(export), gate_values=True)
    assert err.value.stage == "retrieve" and err.value.tensor in ("store_key", "logits")
