"""Export -> verify -> run through ONNX Runtime, on a random `tiny` and a trained `small`."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ctxmem.cli import main
from ctxmem.memory import MemoryConfig

# fp32 parity tolerance (see export/verify.py): summation order differs between MLAS and PyTorch.
ATOL = 1e-4


def _report(export: Path) -> dict:
    return json.loads((export / "verification.json").read_text())


def test_export_writes_graph_weights_tokenizer_runtime_config_and_report(tiny_export, tiny_checkpoint):
    from ctxmem.export.runtime import RuntimeConfig

    names = {p.name for p in tiny_export.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "runtime_config.json", "verification.json"} <= names
    config = RuntimeConfig.load(tiny_export)
    assert config.memory == {"policy": "sink", "window": 60, "sinks": 4, "chunk": 1}
    assert config.opset == 18 and config.variant == "fp32"
    assert config.special_tokens["eos_id"] == 258 and 262 in config.special_tokens["stop_ids"]
    assert config.chat_template["style"] == "special-tokens"
    assert config.source["checkpoint"] == str(tiny_checkpoint.resolve())
    assert config.contract["version"] == 4 and config.contract["keys_before_rotation"] is False
    assert config.optimization["graph"] == "fused"  # export/graph_builder.py, the default


def test_verification_passes_at_prefill_decode_and_after_three_window_slides(tiny_export):
    report = _report(tiny_export)
    assert report["status"] == "passed"
    assert report["checks"] == {"names": "passed", "shapes": "passed", "values": "passed", "greedy": "passed"}
    stages = report["stages"]
    assert stages["prefill"]["calls"] >= 1 and stages["decode"]["calls"] >= 3
    assert stages["after_slide"]["window_turns"] >= 3 and report["memory"]["policy"] == "sink"
    assert max(s["max_abs_diff"] for s in stages.values()) < ATOL
    greedy = report["greedy"]
    assert greedy["identical"] and greedy["tokens"] == 64 and greedy["tokens_matched"] == greedy["tokens_compared"] == 128
    assert min(greedy["evicted"]) > 0  # the 64 greedy tokens ran past the verification window


def test_one_graph_serves_prefill_from_empty_past_and_decode_at_any_batch(tiny_export, tiny_checkpoint):
    from ctxmem.checkpoint import load_model
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.layout import build_layout

    model, ort = load_model(tiny_checkpoint), OrtBackend(tiny_export)
    rng = np.random.default_rng(0)
    past_t = past_o = None
    for batch_new in ((3, 5), (3, 1), (3, 2)):  # prefill (past 0), decode, a 2-token chunk
        B, T = batch_new
        P = 0 if past_t is None else past_t[0][0].shape[2]
        ids = rng.integers(0, 256, (B, T))
        positions = np.broadcast_to(np.arange(P, P + T), (B, T)).copy()
        mask = np.ones((B, P + T), bool)
        with torch.no_grad():
            logits, past_t = model(torch.from_numpy(ids), positions=torch.from_numpy(positions),
                                   attention_mask=torch.from_numpy(mask), past=past_t, use_cache=True)
        # the model's own mask path (positions = rank) against the graph fed the equivalent layout
        got, past_o = ort.forward(ids, build_layout(np.broadcast_to(np.arange(P + T), (B, P + T)).copy(), mask, T),
                                  past_o, last_only=False)
        assert got.shape == (B, T, 263) and past_o[0][0].shape == (B, 2, P + T, 24)
        np.testing.assert_allclose(got, logits.numpy(), atol=ATOL, rtol=ATOL)


def test_the_key_frame_moves_far_past_the_window_and_the_logits_stay_pytorchs(tiny_export, tiny_checkpoint):
    """Contract v3 keeps keys rotated at their stream index minus a per-row frame offset; past twice
    the context (the rotation table's end) the runtime moves a row's offset and rotates its cached
    ordinary keys back, once. Two rows at different stream lengths, 1,000+ tokens of a sink stream
    (the frame moves 4+ times per row), single tokens and chunks: every logit within the fp32
    tolerance of the PyTorch engine fed the same tokens through the same memory."""
    from ctxmem.backend import TorchBackend
    from ctxmem.checkpoint import load_model
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.memory import ContextMemory

    ort = OrtBackend(tiny_export)
    torch_backend = TorchBackend(load_model(tiny_checkpoint))
    mems = [ContextMemory(b, MemoryConfig("sink", window=28, sinks=4)) for b in (torch_backend, ort)]
    states = [m.start(2) for m in mems]
    rng = np.random.default_rng(1)
    feeds = [[rng.integers(0, 256, 40).tolist(), rng.integers(0, 256, 7).tolist()]]
    feeds += [rng.integers(0, 256, (2, 9 if step % 40 == 0 else 1)) for step in range(1, 700)]
    frames = set()
    for ids in feeds:
        want, got = (m.feed(s, ids, all_logits=True) for m, s in zip(mems, states))
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=ATOL)
        frames.add(tuple(states[1].past.frame))
    high = 2 * ort.max_seq_len
    assert states[1].seen.min() > 4 * high // 2 + 100 and len({f[0] for f in frames}) >= 4
    assert len({f[1] for f in frames}) >= 4  # the second row's frame moved on its own, at its own times


def test_onnx_generator_matches_torch_generator_token_for_token_under_sinks(tiny_export, tiny_checkpoint, caplog):
    from ctxmem.generation import load_generator
    from ctxmem.sampling import GenerationConfig
    from ctxmem.export.runtime import load_onnx_generator

    with caplog.at_level(logging.INFO, logger="ctxmem.export.runtime"):
        onnx_gen = load_onnx_generator(tiny_export)  # memory from runtime_config.json: sink 4 + 60
    assert "CPUExecutionProvider" in caplog.text  # the provider that actually runs is logged
    assert onnx_gen.memory_config == MemoryConfig("sink", window=60, sinks=4)
    torch_gen = load_generator(tiny_checkpoint, memory=onnx_gen.memory_config)
    config = GenerationConfig(max_new_tokens=90, stop_token_ids=[])
    prompts = ["attention sinks", "a much longer prompt than the other one"]
    a, b = torch_gen.generate(prompts, config), onnx_gen.generate(prompts, config)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert min(c.evicted for c in b) > 0  # 90 new tokens overflow the 64-slot cache


@pytest.mark.slow  # trains and exports the `small` fixture (~30 s): out of the fast loop
def test_trained_small_export_passes_verification_and_keeps_training_lineage(small_export, small_checkpoint):
    from ctxmem.export.runtime import RuntimeConfig

    report = _report(small_export)
    assert report["status"] == "passed", report.get("error")
    assert report["greedy"]["identical"] and report["stages"]["after_slide"]["window_turns"] >= 3
    run = json.loads((small_checkpoint / "mlflow_run.json").read_text())
    source = RuntimeConfig.load(small_export).source
    assert source["run_id"] == run["run_id"] and source["val_ppl"] == pytest.approx(run["val_ppl"])


@pytest.mark.slow  # trains and exports the `small` fixture (~30 s): out of the fast loop
def test_int8_variant_keeps_validation_loss_within_two_percent_of_fp32(small_int8, small_export):
    from ctxmem.export.runtime import RuntimeConfig

    report = _report(small_int8)
    assert report["status"] == "passed" and report["variant"] == "int8"
    acc = report["accuracy"]
    print(f"int8 accuracy: loss {acc['reference_loss']:.4f} -> {acc['loss']:.4f} "
          f"({100 * acc['loss_rel_change']:+.3f}%), top-1 agreement {acc['top1_agreement']:.3f}, "
          f"greedy {report['greedy']['tokens_matched']}/{report['greedy']['tokens_compared']}")
    assert abs(acc["loss_rel_change"]) <= 0.02  # issue #4: int8 within 2% of fp32
    assert acc["data"].endswith("val.txt")
    optimization = RuntimeConfig.load(small_int8).optimization
    assert optimization["bits"] == 8 and optimization["quantized_nodes"] > 0  # MatMulNBits weights
    assert (small_int8 / "model.onnx.data").stat().st_size < (small_export / "model.onnx.data").stat().st_size / 2


@pytest.mark.slow  # trains and exports the `small` fixture (~30 s): out of the fast loop
def test_eval_gives_the_same_loss_for_the_checkpoint_and_its_export(small_checkpoint, small_export, capsys):
    data = str(small_checkpoint.parent / "val.txt")
    results = []
    for model in (small_checkpoint, small_export):
        assert main(["eval", "--model", str(model), "--data", data, "--block", "64", "--max-windows", "24", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    torch_loss, onnx_loss = results[0]["loss"], results[1]["loss"]
    assert torch_loss == pytest.approx(onnx_loss, rel=1e-5)  # fp32 parity, averaged over every token
    assert results[0]["ppl"] < 30  # trained: far below the byte vocabulary's 263


def test_fp16_variant_keeps_a_half_precision_cache_and_the_loss(tiny_export, tmp_path):
    from ctxmem.export.onnx_export import derive_variant
    from ctxmem.export.runtime import OrtBackend

    out = derive_variant(tiny_export, tmp_path / "fp16", "fp16")
    report = _report(out)
    assert report["status"] == "passed" and report["checks"]["accuracy"] == "passed"
    assert abs(report["accuracy"]["loss_rel_change"]) <= 0.02
    backend = OrtBackend(out)
    assert backend.contract.cache_dtype == "float16"
    from ctxmem.layout import build_layout

    layout = build_layout(np.array([[0, 1, 2]]), np.ones((1, 3), bool), 3)
    logits, past = backend.forward(np.array([[1, 2, 3]]), layout, None)
    assert logits.dtype == np.float32 and past[0][0].dtype == np.float16
    # rotary angles are computed in fp32 (an fp16 angle at position ~1000 is off by up to 0.5 rad): the
    # fused graph takes cos/sin from a table PyTorch computed in fp32 at export, so the graph holds no
    # angle arithmetic at all, and each fp16 entry is the fp32 value rounded once
    import onnx
    from onnx import numpy_helper

    from ctxmem.config import ModelConfig
    from ctxmem.export.contract import rotation_span
    from ctxmem.export.graph_builder import rope_table

    graph = onnx.load(str(out / "model.onnx")).graph
    assert not [n for n in graph.node if n.op_type in ("Cos", "Sin")]
    table = {t.name: numpy_helper.to_array(t) for t in graph.initializer}["cos_table"]
    cfg = ModelConfig.from_dict(backend.config.model)
    assert table.dtype == np.float16
    low, high = rotation_span(cfg.max_seq_len)
    np.testing.assert_array_equal(table, rope_table(cfg, -low, high)[0].astype(np.float16))
    # ... and verification compared the end of the context, where they are largest
    assert report["stages"]["end_of_context"]["last_position"] >= 127 + 4


def test_int8_export_verifies_fp32_first_then_writes_only_the_variant(tiny_checkpoint, tmp_path):
    from ctxmem.export import onnx_export

    out = onnx_export.export_onnx(tiny_checkpoint, tmp_path / "int8", int8=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data", "runtime_config.json",
                                                     "tokenizer.json", "verification.json"]
    report = _report(out)
    assert report["variant"] == "int8" and report["status"] == "passed"
    assert report["fp32_reference"]["status"] == "passed" and report["fp32_reference"]["greedy"]["identical"]
    assert report["export"] == str(out.resolve())
