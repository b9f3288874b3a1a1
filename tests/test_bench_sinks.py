"""bench/bench_sinks.py: the three sink variants x two sample regimes, trained and measured side by
side; its --quick mode end to end (tiny preset, a few DeepSpeed steps each)."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from helpers_training import REPO, one_thread


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_sinks", REPO / "bench" / "bench_sinks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_help_teaches_the_variants_columns_and_targets(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in ("SINK/SAMPLES", "recompute(1)", "window-only", "sink(1)", "recall<=W", "--quick",
                   "--checkpoint", "<= 1.10", "data.samples", "model.sink"):
        assert needle in text, needle


def test_a_bad_variant_or_checkpoint_flag_is_refused_naming_it(capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "token/shuffled"])
    assert "variant 'token/shuffled': expected SINK/SAMPLES" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--checkpoint", "runs/x/final"])
    assert "expected VARIANT=PATH" in capsys.readouterr().err


def test_the_memory_config_is_the_small_preset_at_context_256_with_the_memory_evaluation():
    from ctxmem.training.config import TrainConfig

    cfg = TrainConfig.load(REPO / "infra" / "train-cpu-memory.yaml")
    model = cfg.model.build(263)
    assert cfg.model.preset == "small" and model.max_seq_len == cfg.seq_len == 256
    assert cfg.eval.memory.enabled and cfg.eval.memory.window + cfg.eval.memory.sinks <= 256
    assert cfg.device == "cpu" and cfg.zero.stage >= 1


@pytest.mark.slow
def test_quick_mode_trains_and_measures_all_six_variants(tmp_path, capsys):
    bench = load_bench()
    results = tmp_path / "sinks.txt"
    with one_thread():
        assert bench.main(["--quick", "--out", str(tmp_path / "bench"), "--results", str(results)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("$ bench/bench_sinks.py --quick"):]  # DeepSpeed prints its own lines before
    assert results.read_text().strip() == table.strip()
    rows = {line.split()[0]: line for line in table.splitlines() if re.match(r"^(none|token|learned)/", line)}
    assert set(rows) == set(bench.ALL_VARIANTS)
    number = r"\d+\.\d+"
    for variant, line in rows.items():
        cells = line.split()
        # val ppl, recompute(1), sink(4), /rc, window-only, /rc measured for every variant
        assert all(re.fullmatch(number, c) for c in cells[1:7]), line
        assert (re.fullmatch(number, cells[7]) is not None) == variant.startswith("token/")  # sink(1)
        assert "sink(4) " in line and ("sink(1) " in line) == variant.startswith("token/")
        saved = json.loads((tmp_path / "bench" / variant.replace("/", "-") / "memory_eval" / "memory_eval.json").read_text())
        assert {r["distance"] for r in saved["recall"]} == {48, 96}
    from ctxmem.checkpoint import load_model

    assert load_model(tmp_path / "bench" / "token-document" / "final").cfg.sink == "token"
    assert load_model(tmp_path / "bench" / "learned-crop" / "final").cfg.sink == "learned"
    # measured again from the checkpoints, without training: the same numbers
    with one_thread():
        assert bench.main(["--quick", "--out", str(tmp_path / "bench"), "--reuse", "--variants", "token/document"]) == 0
    again = capsys.readouterr().out
    row = next(line for line in again.splitlines() if line.startswith("token/document"))
    assert row.split()[:9] == rows["token/document"].split()[:9]
