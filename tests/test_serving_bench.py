"""The serving README's benchmark commands run as written. The `--quick` line runs for real (one Ray
cluster, every phase at a toy size, every table printed); the full runs are checked with `--plan`
(arguments parsed, phases and sizes resolved, nothing started) - running them is the benchmark's job,
not the suite's."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from helpers_serving import REPO

TABLES = ["## Load (completions", "## Where the CPU goes (16 streams", "## The engine's own batched decode",
          "## The same API and engine in one process, no Ray", "## The engine inside the HTTP replica",
          "## Direct ingress (the HTTP replica serves its own port)",
          "## One 3-turn conversation",
          "## Sessions across 2 engine replicas", "-token prompt arrives while 2 streams decode", "## Soak: 8 clients"]


def bench_commands() -> list[str]:
    text = (REPO / "serving" / "README.md").read_text()
    lines = [line.split("  #", 1)[0].strip() for block in text.split("```bash\n")[1:]
             for line in block.split("```", 1)[0].splitlines() if "bench/bench_serving.py" in line]
    assert any("--quick" in line for line in lines), lines
    return lines


def argv_of(command: str, tiny_export) -> list[str]:
    argv = [str(tiny_export) if w == "path/to/export" else w for w in shlex.split(command)]
    assert argv[:2] == [".venv/bin/python", "bench/bench_serving.py"], command
    if not (REPO / argv[0]).exists():  # an environment installed elsewhere: the same interpreter
        argv[0] = sys.executable
    return argv


@pytest.mark.parametrize("command", [c for c in bench_commands() if "--quick" not in c])
def test_a_full_readme_benchmark_command_parses_and_plans(command, tiny_export):
    done = subprocess.run(argv_of(command, tiny_export) + ["--plan"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("# plan: model ") and "phases" in done.stdout


@pytest.mark.slow  # starts a Ray cluster, deploys, reconfigures, 2 replicas for the sessions phase
@pytest.mark.parametrize("command", [c for c in bench_commands() if "--quick" in c])
def test_the_quick_readme_benchmark_runs_every_phase_and_prints_every_table(command, tiny_export):
    done = subprocess.run(argv_of(command, tiny_export), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "RAY_AUTH_MODE": "token"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for table in TABLES:
        assert table in done.stdout, f"{table!r} missing:\n{done.stdout}"
    assert "| on | 1 |" in done.stdout and "| off | 1 |" in done.stdout  # batching on and off, concurrency 1
    assert "| 1 token | " in done.stdout and "A request costs " in done.stdout  # the cost phase's rows and summary
    assert "Adaptive interval (default) against 10 ms per stream: " in done.stdout  # its pacing A/B in one run
    assert "| session affinity |" in done.stdout and "| power of two choices |" in done.stdout
    direct = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| colocated direct one loop | 1 |")]
    assert direct and all(row[5].strip() == "0" for row in direct), direct  # answered on the replica's port, no error
    assert "requests, 0 5xx or connection errors" in done.stdout  # the soak (a short load test) failed nothing
    rows = [line.split("|") for line in done.stdout.splitlines()
            if line.startswith(("| session affinity |", "| power of two choices |"))]
    assert [row[7].strip() for row in rows] == ["0", "0"], rows  # the errors column: no session turn failed
