"""bench/bench_attention.py runs at a small size: one row per cache length, both formulations timed."""
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

