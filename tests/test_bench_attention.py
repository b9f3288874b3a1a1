"""bench/bench_attention.py runs at a small size: the isolated attention table, and the per-op profile
of greedy generates on an export whose graph has the decode branch (the small preset's)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "bench" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_isolated_attention_table_has_a_row_per_cache_length(capsys):
    assert _bench().main(["--batch", "2", "--slots", "8", "24", "--calls", "3", "--rounds", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["8", "24"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)  # both formulations timed


def test_in_situ_profiles_the_greedy_loop_under_sink_and_full(small_export, capsys):
    assert _bench().main(["--in-situ", str(small_export), "--batch", "2", "--window", "24", "--sink-tokens", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    runs = {line.split(":")[0].strip(): line for line in lines[1:]}
    assert list(runs) == ["sink 4+24, 60 tokens", "full, 12 tokens", "full, 24-token prompt + 4 tokens"]
    steps = [int(line.split(": ")[1].split()[0]) for line in runs.values()]
    assert steps[0] > steps[1] > 0  # decode steps ran on the greedy loop's session in each
    assert all("GroupQueryAttention" in line and "MatMul" in line for line in runs.values())
