"""The serving README's benchmark commands run as written, bounded: the flags added only shrink the
load (one concurrency level, a few tokens, a two-turn conversation), so each run starts its own Ray,
deploys, reconfigures and prints both tables in about a minute instead of a quarter of an hour."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from helpers_serving import REPO

pytestmark = pytest.mark.slow  # each command starts a Ray cluster of its own
BOUNDED = ["--levels", "1", "--rounds", "1", "--seconds", "10", "--max-tokens", "2", "--turns", "2",
           "--turn-tokens", "2", "--engine-cpus", "0.5"]


def bench_commands() -> list[str]:
    text = (REPO / "serving" / "README.md").read_text()
    lines = [line.split("  #", 1)[0].strip() for block in text.split("```bash\n")[1:]
             for line in block.split("```", 1)[0].splitlines() if "bench/bench_serving.py" in line]
    assert len(lines) == 3, lines
    return lines


@pytest.mark.parametrize("command", bench_commands())
def test_a_readme_benchmark_command_runs_and_prints_both_tables(command, tiny_export):
    argv = [str(tiny_export) if w == "path/to/export" else w for w in shlex.split(command)]
    assert argv[:2] == [".venv/bin/python", "bench/bench_serving.py"], command
    if not (REPO / argv[0]).exists():  # an environment installed elsewhere: the same interpreter
        argv[0] = sys.executable
    done = subprocess.run(argv + BOUNDED, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "## Load (completions" in done.stdout and "## One 2-turn conversation" in done.stdout
    assert "| on | 1 |" in done.stdout and "| off | 1 |" in done.stdout  # batching on and off, concurrency 1
