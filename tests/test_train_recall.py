"""bench/train_recall.py, the recall recipe search that infra/gpu-check.sh runs on a lent GPU: a few
CPU steps of the tiny preset write its probe log, its summary and a checkpoint ctxmem loads, and the
copying curriculum's rows are the periodic repeats it promises."""
from __future__ import annotations

import json

import numpy as np
import torch

from ctxmem.checkpoint import load_model
from ctxmem.training.data import prepare
from helpers_training import load_bench


def test_copy_rows_repeat_a_segment_with_their_period_and_the_rest_are_crops():
    bench = load_bench("train_recall")
    tokens = np.arange(10_000, dtype=np.int64) % 250
    batches = bench.Batches(tokens, seq=128, batch=8, copy=0.5, vocab=263, device="cpu", seed=0)
    rows = batches()
    assert rows.shape == (8, 129)
    for row in rows[:4]:  # copy rows: some period p in 8..63 with row[i] == row[i - p] everywhere
        assert any(torch.equal(row[p:], row[:-p]) for p in range(8, 64))
    for row in rows[4:]:  # crops: consecutive tokens of the stream
        assert torch.equal(torch.diff(row) % 250, torch.ones(128, dtype=torch.int64))


def test_a_short_run_writes_its_log_summary_and_a_loadable_checkpoint(tmp_path):
    bench = load_bench("train_recall")
    prepare(["recall:60"], tmp_path / "data", progress=False)
    out = tmp_path / "run"
    assert bench.main(["--data", str(tmp_path / "data"), "--out", str(out), "--preset", "tiny", "--seq", "128",
                       "--batch", "4", "--steps", "4", "--every", "2", "--trials", "4", "--copy", "0.25",
                       "--device", "cpu"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    for record in log:
        assert 0.0 < record["copy_ratio"] < 2.0 and np.isfinite(record["loss"])
        assert all(0.0 <= record[f"recall_d{d}"] <= 1.0 for d in bench.DISTANCES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 4 * 128 and summary["recipe"]["copy"] == 0.25
    model = load_model(out / "final")
    assert model.cfg.max_seq_len == 128 and model.cfg.preset == "tiny"
