"""`ctxmem train --nproc N` on torchrun: what the launcher must do for the ranks it starts.

A signal reaches every rank exactly once (twice would abort a rank without saving), so both
ranks write their checkpoint partition; a rank that dies takes the others down instead of leaving
them blocked in a collective.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ctxmem.training.data import prepare
from helpers_training import REPO, metrics, summary

pytestmark = pytest.mark.slow  # two DeepSpeed ranks per test


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "data"
    prepare(["chatterbot"], out, progress=False)
    return out


def _start_endless_two_rank_run(chat_data, out) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ctxmem.cli", "train", "--config", "infra/train-tiny.yaml", "--nproc", "2",
           f"data.path={chat_data}", f"out={out}", "steps=100000", "checkpoint.interval=100000",
           "eval.interval=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    return proc


def _ranks(proc: subprocess.Popen) -> dict[int, psutil.Process]:
    """The rank processes torchrun started (children of the `ctxmem train` process), by RANK."""
    workers = [p for p in psutil.Process(proc.pid).children()
               if "ctxmem.training.worker" in " ".join(p.cmdline())]
    return {int(p.environ()["RANK"]): p for p in workers}


def test_sigterm_reaches_each_of_two_ranks_once_and_both_save(chat_data, tmp_path):
    out = tmp_path / "run"
    proc = _start_endless_two_rank_run(chat_data, out)
    ranks = _ranks(proc)
    assert sorted(ranks) == [0, 1]
    # each rank in its own session: a terminal's Ctrl-C reaches `ctxmem train` only, which passes it on once
    assert all(os.getsid(p.pid) != os.getsid(proc.pid) for p in ranks.values())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.count("SIGTERM received: finishing this step") == 1  # printed by rank 0 only
    s = summary(out)
    assert s["status"] == "interrupted" and s["world_size"] == 2 and s["step"] >= 2
    tag = out / "checkpoints" / f"step_{s['step']:07d}"
    assert (tag / "ctxmem_state.json").exists()
    assert len(list(tag.glob("*optim_states.pt"))) == 2  # each rank saved its ZeRO partition
    assert f"resume with: ctxmem train --config {out / 'config.yaml'} --resume --nproc 2" in err


def test_a_rank_that_dies_stops_the_other(chat_data, tmp_path):
    out = tmp_path / "run"
    proc = _start_endless_two_rank_run(chat_data, out)
    ranks = _ranks(proc)
    ranks[1].kill()  # e.g. the kernel's OOM killer
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, err[-3000:]
    assert not ranks[0].is_running() or ranks[0].status() == psutil.STATUS_ZOMBIE
    assert "torchrun stopped the other ranks" in err
