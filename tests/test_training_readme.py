"""training/README.md tells the truth: its commands run here, as written, in a scratch working
folder laid out like a checkout (infra/ beside data/ and runs/).

The one change to the world: infra/train-cpu-demo.yaml is the shipped file shortened from 1000 to
60 steps. Commands that need GPUs, several nodes, Kubernetes or a remote server cannot run on this
machine: they are parsed with the real CLI and the files they name checked; the Ray command runs
in the test named beside it.
"""
from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import test_training_run
from ctxmem.cli import build_parser
from ctxmem.training.cli import _hostfile_slots
from ctxmem.training.config import TrainConfig
from helpers_export import new_sqlite_store
from helpers_training import REPO, metrics, summary

README = REPO / "training" / "README.md"

DEMO = "ctxmem train --config infra/train-cpu-demo.yaml"
DEMO_STEPS = 60
# command -> the test that runs it (with overrides that shorten it)
RUN_ELSEWHERE = {
    "ctxmem train --config infra/train-ray-cpu.yaml --ray --num-workers 2":
        "test_ray_train_with_two_cpu_workers_writes_the_same_checkpoint",
}
# command (prefix) -> why it only parses here
PARSED_ONLY = {
    "ctxmem train --config infra/train-gpu-124m.yaml --hostfile": "ssh to the GPU nodes of the hostfile",
    "torchrun --nnodes 2": "two GPU nodes (the same worker under torchrun runs in test_training_launch.py)",
    "ctxmem train --config infra/train-gpu-124m.yaml --ray": "a Ray cluster with 8 GPUs",
    "kubectl apply": "a Kubernetes cluster with KubeRay",
    "ctxmem train --sync-mlflow": "an MLflow server (the same sync into a local store runs in "
                                  "test_an_unreachable_tracking_server_loses_nothing)",
}


def readme_commands() -> list[str]:
    text = README.read_text()
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
            for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def commands_run_here() -> list[str]:
    return [c for c in readme_commands() if c not in RUN_ELSEWHERE and not c.startswith(tuple(PARSED_ONLY))]


def test_every_readme_command_runs_or_says_why_not():
    commands = readme_commands()
    assert len(commands) >= 10
    for command, test_name in RUN_ELSEWHERE.items():
        assert command in commands and callable(getattr(test_training_run, test_name))
    for prefix in PARSED_ONLY:
        assert any(c.startswith(prefix) for c in commands), f"no README command starts with {prefix!r}"
    assert all(c.startswith("ctxmem ") for c in commands_run_here())


@pytest.mark.parametrize("command", readme_commands())
def test_every_command_in_the_training_readme_is_valid(command):
    words = shlex.split(command)
    for word in words:  # every shipped file it names exists
        path = word.split("=", 1)[-1]
        if path.startswith("infra/"):
            assert (REPO / path).exists(), path
    if words[0] == "kubectl":
        return
    if words[0] == "torchrun":
        from ctxmem.training.worker import main as worker_main  # noqa: F401 - the module it runs exists

        assert words[words.index("-m") + 1] == "ctxmem.training.worker"
        cfg = TrainConfig.load(REPO / words[words.index("--config") + 1])
        nnodes, per_node = int(words[words.index("--nnodes") + 1]), int(words[words.index("--nproc-per-node") + 1])
        cfg.accumulation(nnodes * per_node)
        return
    assert words[0] == "ctxmem"
    args = build_parser().parse_args(words[1:])
    assert callable(args.func)
    if args.command == "train" and args.config and args.config.startswith("infra/"):
        cfg = TrainConfig.load(REPO / args.config, args.overrides)
        world = (_hostfile_slots(str(REPO / args.hostfile)) if args.hostfile
                 else args.num_workers if args.ray else args.nproc)
        cfg.accumulation(world)  # the batch splits over the ranks the command starts


# ---- run as written --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory, mlflow_store_template) -> Path:
    """A working folder with infra/ (the shipped files; the demo config shortened), the corpus
    files the README's own-corpus example names, and the demo's MLflow store (./mlflow.db: its
    config tracks, MLFLOW_TRACKING_URI unset) migrated and still empty - the run would otherwise
    spend its first seconds creating MLflow's tables, before the test can interrupt it."""
    root = tmp_path_factory.mktemp("readme")
    new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    (root / "infra").mkdir()
    for path in (REPO / "infra").iterdir():
        (root / "infra" / path.name).symlink_to(path)
    demo = yaml.safe_load((REPO / "infra" / "train-cpu-demo.yaml").read_text())
    demo.update(steps=DEMO_STEPS, log_interval=10)
    demo["optim"]["warmup_steps"] = 5
    demo["eval"]["interval"] = demo["checkpoint"]["interval"] = 30
    (root / "infra" / "train-cpu-demo.yaml").unlink()
    (root / "infra" / "train-cpu-demo.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    (root / "notes").mkdir()
    (root / "notes" / "memory.md").write_text("# Memory\n\nA sink keeps the first tokens; a window keeps the last.\n" * 40)
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": f"{i} + {i} is {2 * i}."}]} for i in range(60)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def _command(start: str) -> str:
    found = [c for c in commands_run_here() if c.startswith(start)]
    assert len(found) == 1, f"expected one README command starting with {start!r}, found {found}"
    return found[0]


def _popen(command: str, cwd: Path, **kwargs) -> subprocess.Popen:
    words = shlex.split(command)
    assert words[0] == "ctxmem"
    return subprocess.Popen([sys.executable, "-m", "ctxmem.cli", *words[1:]], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _run(command: str, cwd: Path) -> str:
    proc = _popen(command, cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{command}\n{err[-3000:]}"
    return out


@pytest.fixture(scope="module")
def chatterbot(workdir) -> Path:
    _run(_command("ctxmem data prepare --out data/chatterbot"), workdir)
    return workdir / "data" / "chatterbot"


@pytest.mark.slow
def test_the_data_commands_run(workdir, chatterbot):
    assert json.loads((chatterbot / "meta.json").read_text())["tokenizer_kind"] == "byte"
    _run(_command("ctxmem data prepare --corpus chatterbot:english,chinese stdlib"), workdir)
    mixed = json.loads((workdir / "data" / "mixed-bpe" / "meta.json").read_text())
    assert mixed["tokenizer_kind"] == "bpe" and mixed["vocab_size"] == 8192
    _run(_command("ctxmem data prepare --corpus notes/ chats.jsonl"), workdir)
    mine = json.loads((workdir / "data" / "mine" / "meta.json").read_text())
    assert [c["documents"] for c in mine["corpora"]] == [1, 60]  # the notes file and every chat


@pytest.mark.slow
def test_the_train_commands_run(workdir, chatterbot):
    # the demo, interrupted as a user would (SIGTERM after two steps), then resumed by the next command
    demo_out = workdir / "runs" / "cpu-demo"
    proc = _popen(_command(DEMO), workdir)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (demo_out / "metrics.jsonl").exists() and len(metrics(demo_out)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert summary(demo_out)["status"] == "interrupted"
    _run(_command("ctxmem train --config runs/cpu-demo/config.yaml --resume"), workdir)
    assert summary(demo_out)["status"] == "completed" and summary(demo_out)["step"] == DEMO_STEPS
    reply = _run(_command("ctxmem generate --model runs/cpu-demo/final"), workdir)
    # one reply line; after 60 steps the model may well answer with its end-of-turn token at once
    assert reply.endswith("\n")

    _run(_command("ctxmem train --config infra/train-tiny.yaml data.path=data/chatterbot steps=50"), workdir)
    s = summary(workdir / "runs" / "tiny")
    assert s["status"] == "completed" and s["step"] == 50 and s["zero_stage"] == 3
    _run(_command("ctxmem train --config infra/train-tiny.yaml data.path=data/chatterbot out=runs/tiny-2ranks"), workdir)
    s = summary(workdir / "runs" / "tiny-2ranks")
    assert s["status"] == "completed" and s["world_size"] == 2

    # a 1-process ZeRO-3 checkpoint continued on 2 ranks (resharded): the losses of the run it
    # continues, to the 1-vs-N-ranks parity tolerance (the gradient sums run in another order)
    _run(_command("ctxmem train --config runs/tiny/config.yaml out=runs/tiny-on-2-ranks --nproc 2 --resume"), workdir)
    on_two, tiny = workdir / "runs" / "tiny-on-2-ranks", workdir / "runs" / "tiny"
    s = summary(on_two)
    assert s["status"] == "completed" and s["world_size"] == 2 and s["zero_stage"] == 3
    resumed = {r["step"]: r["loss"] for r in metrics(on_two) if "loss" in r}
    assert sorted(resumed) == list(range(45, 51))
    original = {r["step"]: r["loss"] for r in metrics(tiny) if "loss" in r}
    assert max(abs(resumed[k] - original[k]) for k in resumed) <= test_training_run.PARITY_ATOL
