"""The README tells the truth: every command in it runs here, as written, in a folder laid out the
way the command expects (the demo's `runs/demo/...`, the repository's `.venv`, `infra/`, `bench/`)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ctxmem.proc import default_sigint

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
VENV = Path(sys.executable).parent.parent  # the environment running the tests is the README's .venv

# Every README command starts with one of these; the test named beside it runs it.
RUN_BY = {
    "bash infra/bootstrap.sh && .venv/bin/ctxmem demo": "test_bootstrap_only_checks_a_ready_venv, "
                                                        "test_the_demo_runs_as_written (slow)",
    "bash infra/bootstrap.sh && .venv/bin/python -m pytest": "test_quick_start_has_exactly_two_commands_and_ci_runs_"
                                                             "the_second (the suite cannot run itself: CI runs it)",
    ".venv/bin/ctxmem generate --model runs/demo": "test_the_memory_policy_example_runs_on_the_demo_layout",
    ".venv/bin/ctxmem generate --model bench/models/recall-small": "test_the_retrieve_example_recalls_the_fact (slow)",
    ".venv/bin/python bench/bench_memory.py": "test_the_memory_benchmark_runs_at_a_small_size",
}


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def readme_commands() -> list[str]:
    return [line.strip() for block in bash_blocks(README) for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.strip().startswith("#")]


def readme_command(start: str) -> str:
    found = [c for c in readme_commands() if c.startswith(start)]
    assert len(found) == 1, f"expected one README command starting with {start!r}, found {found}"
    return found[0]


def run(command: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def folder_like_the_repository(root: Path, *names: str) -> Path:
    """`root` with `.venv` and the named repository entries linked in, so README paths resolve."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".venv").symlink_to(VENV, target_is_directory=True)
    for name in names:
        (root / name).symlink_to(REPO / name)
    return root


def with_demo_training(root: Path, checkpoint: Path) -> Path:
    """What `ctxmem demo` leaves after training: the final checkpoint in runs/demo/train/final. The
    tiny random checkpoint stands in for the trained one (the same `tiny` preset and byte tokenizer;
    the demo's 1000 training steps take minutes)."""
    shutil.copytree(checkpoint, root / "runs" / "demo" / "train" / "final")
    return root


def venv_is_bootstrapped() -> bool:
    """Whether infra/bootstrap.sh would only check: its stamp for this pyproject.toml exists.
    Otherwise it would reinstall the environment the tests are running in."""
    cksum = subprocess.run(["cksum", str(REPO / "pyproject.toml")], capture_output=True, text=True, check=True)
    has_gpu = shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    return (VENV / f".ctxmem-{'gpu' if has_gpu else 'cpu'}-{cksum.stdout.split()[0]}").is_file()


def test_every_readme_command_is_run_by_a_test_here():
    commands = readme_commands()
    assert commands, "no bash blocks found in README.md"
    for command in commands:
        assert command.startswith(tuple(RUN_BY)), f"README command without a test: {command}"


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in bash_blocks(quick)]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("bash infra/bootstrap.sh && ") and commands[0].endswith("ctxmem demo")
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == commands[1]


def test_bootstrap_only_checks_a_ready_venv(tmp_path):
    if not venv_is_bootstrapped():
        pytest.skip("this .venv was bootstrapped from another pyproject.toml: running infra/bootstrap.sh "
                    "would reinstall the environment these tests run in (CI bootstraps first, so it runs there)")
    bootstrap = readme_command("bash infra/bootstrap.sh && .venv/bin/ctxmem demo").split(" && ")[0]
    folder = folder_like_the_repository(tmp_path / "repo", "infra", "pyproject.toml")
    done = run(bootstrap, folder, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "is up to date" in done.stderr


def test_the_memory_policy_example_runs_on_the_demo_layout(tmp_path, tiny_checkpoint):
    command = readme_command(".venv/bin/ctxmem generate --model runs/demo")
    assert "--model runs/demo/train/final" in command  # where `ctxmem demo` writes its checkpoint
    folder = with_demo_training(folder_like_the_repository(tmp_path / "repo"), tiny_checkpoint)
    done = run(command, folder, timeout=300)
    assert done.returncode == 0, done.stderr
    window, sinks = (int(re.search(rf"--{flag} (\d+)", command)[1]) for flag in ("window", "sinks"))
    assert f"policy=sink window={window} sinks={sinks}" in done.stderr
    generated = int(re.search(r"generated (\d+) tokens", done.stderr)[1])
    assert generated > window + sinks, "the example should run past the window, so that the sink cache slides"
    assert done.stdout.strip()


@pytest.mark.slow  # ~600 tokens fed to the small model in pieces of 8 past the window
def test_the_retrieve_example_recalls_the_fact(tmp_path):
    command = readme_command(".venv/bin/ctxmem generate --model bench/models/recall-small")
    folder = folder_like_the_repository(tmp_path / "repo", "bench")
    done = run(command, folder, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" 4812"), done.stdout  # the fact, ~650 tokens back, put back from the store
    sink = run(command.replace("--policy retrieve", "--policy sink"), folder, timeout=600)
    assert sink.returncode == 0 and not sink.stdout.startswith(" 4812"), sink.stdout  # gone from the window


def test_the_memory_benchmark_runs_at_a_small_size(tmp_path):
    # As written it times a 1024-token `small` model over 32x its window (about ten minutes); here the
    # same script runs with its size flags turned down and must still print the whole table.
    command = readme_command(".venv/bin/python bench/bench_memory.py")
    folder = folder_like_the_repository(tmp_path / "repo", "bench")
    done = run(command + " --preset tiny --context 64 --measure 4", folder, timeout=300)
    assert done.returncode == 0, done.stderr
    for row in ("1x", "4x", "16x", "32x", "recompute (chunk=1)", "retrieve (budget=32", "retrieve@8x / sink@1x"):
        assert row in done.stdout, f"{row!r} missing from the benchmark table:\n{done.stdout}"


def _wait_for_chat_page(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """The chat page's URL from the demo's line `chat page: URL/  (serving until Ctrl-C)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"chat page: (http://\S+/) +\(serving until Ctrl-C\)", log.read_text(errors="replace"))
        if found:
            return found[1]
        assert proc.poll() is None, f"the demo exited ({proc.returncode}) before serving:\n{log.read_text()[-4000:]}"
        time.sleep(1)
    raise AssertionError(f"no chat page line from the demo in {timeout}s:\n{log.read_text()[-4000:]}")


@pytest.mark.slow
def test_the_demo_runs_as_written(tmp_path, tiny_checkpoint, mlflow_store_template):
    # The demo's own stages, run as the README says, in a fresh folder; only the training is reused
    # (the demo reuses a finished runs/demo/train/final: a tiny checkpoint stands in for its 1000 steps).
    from helpers_export import new_sqlite_store

    bootstrap, demo = readme_command("bash infra/bootstrap.sh && .venv/bin/ctxmem demo").split(" && ")
    folder = with_demo_training(folder_like_the_repository(tmp_path / "repo", "infra", "pyproject.toml"),
                                tiny_checkpoint)
    # the MLflow store the demo's training step creates (runs/demo/mlflow.db), migrated, still empty
    new_sqlite_store(mlflow_store_template, folder / "runs" / "demo" / "mlflow.db")
    if venv_is_bootstrapped():  # otherwise test_bootstrap_only_checks_a_ready_venv says why it is skipped
        assert run(bootstrap, folder, timeout=60).returncode == 0
    # As written, plus --keep-serving (the README's way to keep the chat page up): the same stages, then
    # the server stays up until Ctrl-C, which must stop it cleanly. One demo run covers both.
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:  # a file, not a pipe: the server writes there too while the test waits
        # SIGINT as a terminal has it: a runner started in the background (`cmd &`) passes it on ignored
        demo_proc = subprocess.Popen(["bash", "-c", demo + " --keep-serving"], cwd=folder, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=default_sigint)
    try:
        url = _wait_for_chat_page(demo_proc, log, timeout=900)
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        models = httpx.get(url + "v1/models", timeout=30)
        assert models.status_code == 200 and "ctxmem-demo" in models.text
        os.killpg(demo_proc.pid, signal.SIGINT)  # Ctrl-C in the demo's terminal
        assert demo_proc.wait(timeout=120) == 0, log.read_text()[-4000:]
    finally:
        if demo_proc.poll() is None:  # the demo's own stop (SIGTERM) also stops its server, in a session of its own
            os.killpg(demo_proc.pid, signal.SIGTERM)
            try:
                demo_proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(demo_proc.pid, signal.SIGKILL)
                demo_proc.wait(timeout=30)
    assert "stopping the server" in log.read_text()
    with pytest.raises(httpx.TransportError):  # the server went down with the demo
        httpx.get(url + "health", timeout=5)
    report = json.loads((folder / "runs" / "demo" / "demo_report.json").read_text())
    assert report["model_uri"] == "models:/ctxmem-demo@champion"
    turns = report["chat"]
    assert [t["turn"] for t in turns] == [1, 2, 3, 4]
    assert all(t["usage"]["completion_tokens"] > 0 for t in turns)
    assert turns[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # the conversation's KV state was reused
    # the memory segment: turn 1's fact, asked for at turn 20 (several windows later), answered under
    # retrieve from the block it put back, and lost under sink; every turn's evictions are in the report
    memory = report["memory"]
    assert [t["turn"] for t in memory["turns"]] == list(range(1, 21))
    assert memory["distance"] > 4 * memory["memory"]["window"]
    assert memory["retrieve"]["recalled"] and not memory["sink"]["recalled"], (memory["retrieve"], memory["sink"])
    assert any(memory["expected"].strip() in part["text"] for part in memory["retrieve"]["put_back"])
    assert memory["retrieve"]["evicted_tokens"] == memory["sink"]["evicted_tokens"] > memory["distance"] - 100
    assert "retrieve answers" in log.read_text() and "sink answers" in log.read_text()
