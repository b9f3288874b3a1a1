"""bench/bench_decode.py runs end to end at a small size (the README's benchmark command, shrunk):
every ctxmem engine and transformers in interleaved rounds, greedy agreement, the targets, and the
per-op profile. The peers (onnxruntime-genai, optimum-onnx) need their own environments: the full
command creates them; here --no-peers, and the targets that need them say "not measured"."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # exports four graphs (one traced) and runs every engine: ~1 minute
def test_the_decode_benchmark_runs_at_a_small_size(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "bench" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CACHE", tmp_path / "decode")
    monkeypatch.setattr(bench, "LLAMA", {**bench.LLAMA, "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
                                         "num_hidden_layers": 2, "num_attention_heads": 4,
                                         "num_key_value_heads": 2, "max_position_embeddings": 64})
    args = ["--tokens", "4", "--prompt", "4", "--batches", "1", "2", "--rounds", "1", "--sink-tokens", "24",
            "--sink-window", "8", "--no-peers", "--no-eager", "--clock", "cpu"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("ctxmem ORT", "transformers eager"))
            and "tokens/s" not in line]
    engines = {" ".join(r[:-4]) for r in rows}
    assert {"ctxmem ORT fp32", "ctxmem ORT fp32 traced", "ctxmem ORT int8", "ctxmem ORT int4",
            "transformers eager"} <= engines
    fp32 = [r for r in rows if r[:-4] == ["ctxmem", "ORT", "fp32"]]
    assert [r[-1] for r in fp32] == ["1/1", "2/2"]  # the fused fp32 graph's greedy tokens are transformers'
    assert "ctxmem fp32 vs genai fp32 at batch 1: not measured" in out
    assert "sink far past the window vs full inside it, batch 2:" in out
    assert bench.main(["--profile", "--batches", "1", "--tokens", "4", "--prompt", "4", "--sink-window", "8",
                       "--sink-tokens", "24"]) == 0
    profile = capsys.readouterr().out
    assert "fp32 graph, batch 1:" in profile and "traced graph, batch 1:" in profile and "session.run" in profile
    assert "graph only, batch 1: ctxmem fp32" in profile and "Python outside the graph, sink 4+8" in profile
    assert "sink / full tokens/s, batch 1:" in profile and "greedy generate, sink 4+8, 24 tokens, batch 1:" in profile
    # under sink and full, which ops the greedy loop's decode steps ran (the small model's head size has the
    # decode branch): a longer run under sink, GroupQueryAttention and MatMul in each
    kernels = [line for line in profile.splitlines() if line.startswith("    its decode steps' kernels")]
    assert len(kernels) == 3, profile
    steps = [int(line.split(": ")[1].split()[0]) for line in kernels]
    assert steps[0] > steps[1] > 0
    assert all("GroupQueryAttention" in line and "MatMul" in line for line in kernels)
