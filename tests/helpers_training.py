"""Shared pieces of the training tests: tiny corpora, runs in this process or through the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench(name: str):
    """A bench/ script as a module (bench/ is not a package): load_bench("probe_recall")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
TINY = REPO / "infra" / "train-tiny.yaml"


def write_text_corpus(folder: Path) -> Path:
    """A folder with a text file, a markdown file, a JSONL of texts and chats, and a hidden file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "story.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (folder / "notes.md").write_text("# Notes\n\nA sink keeps the first tokens; a window keeps the last.\n" * 20)
    rows = [{"text": f"Line {i}: memory is a window with sinks."} for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} is {2 * i}."}]} for i in range(30)]
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / ".hidden.txt").write_text("never read")
    return folder


def one_thread():
    """In-process runs with one intra-op thread: torch was imported before any OMP_WAIT_POLICY
    could apply, and spinning OpenMP threads crawl on the shared CI cores."""
    from ctxmem.backend import torch_threads

    return torch_threads(1)


def train_inprocess(out: Path, data: Path, *overrides: str, resume: str | None = None, config: Path = TINY):
    """`ctxmem train` with --nproc 1, in this process (DeepSpeed with RANK 0 of 1 on loopback)."""
    from ctxmem.training.config import TrainConfig
    from ctxmem.training.trainer import train

    cfg = TrainConfig.load(config, [f"data.path={data}", f"out={out}", *overrides])
    with one_thread():
        return train(cfg, resume, progress=False)


def ctxmem(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The `ctxmem` CLI in a child process (for --nproc N: torchrun ranks are processes anyway)."""
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ctxmem.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> dict[int, float]:
    """Per-step training loss of a run (step -> loss)."""
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below `folder`: to show that nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}
