"""infra/README.md tells the truth: it names every file in infra/, every path and test it cites exists, the
commands it gives run here where they can (the render check), and the GPU-check scripts refer to files that
exist and carry the DeepSpeed the images pin."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
README = (INFRA / "README.md").read_text()


def _commands() -> list[str]:
    """Commands in the tables' `command` column (the third), split where a cell holds more than one."""
    found = []
    for row in README.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")] if row.startswith("| `") else []
        if len(cells) >= 3:
            found += re.findall(r"`([^`]+)`", cells[2].split("(`", 1)[0])
    return found


def test_every_file_in_infra_is_named_with_its_job():
    files = [p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.name != "README.md"]
    for name in files:
        folder = name.split("/")[0] + "/" if "/" in name else None
        assert f"`{name}`" in README or (name.startswith("kuberay/crd/") and "`kuberay/crd/`" in README), \
            f"infra/README.md does not name infra/{name}" + (f" (nor its folder {folder})" if folder else "")


def test_every_path_and_test_it_cites_exists():
    cited = set(re.findall(r"`((?:infra|tests|bench)/[\w./-]+)`", README))
    cited |= {c for c in re.findall(r"(?:^|\s)((?:infra|tests|bench)/[\w./-]*\w)", README)}
    assert len(cited) > 20
    for path in cited:
        assert (REPO / path).exists() or (INFRA / path).exists(), f"infra/README.md cites {path}: no such path"
    for command in _commands():
        words = shlex.split(command.replace("\\|", "|"))
        for word in words:
            if word.startswith("infra/") and "=" not in word:
                assert (REPO / word).exists(), f"{command!r}: {word} does not exist"


def test_the_render_check_runs_as_written():
    (command,) = [c for c in _commands() if "render_rayservice.py --check" in c]
    argv = shlex.split(command)
    assert argv[0] == "python"
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "up to date" in done.stdout, done.stdout + done.stderr


def test_the_gpu_check_refers_to_what_exists_and_carries_the_pinned_deepspeed():
    check = (INFRA / "gpu-check.sh").read_text()
    wheels = (INFRA / "gpu-wheels.sh").read_text()
    for path in re.findall(r"\b((?:bench|tests|infra)/[\w./-]+\.(?:py|sh))\b", check + wheels):
        assert (REPO / path).exists(), path
    assert "--no-index" in check  # the GPU machine has no network
    pinned = re.search(r"^deepspeed==(\S+)", (INFRA / "docker" / "constraints.txt").read_text(), flags=re.M)[1]
    assert f'"deepspeed=={pinned}"' in wheels
    # the gpu tests it runs exist and carry the marker it selects
    assert "pytest.mark.gpu" in (REPO / "tests" / "test_infra_gpu.py").read_text()
    assert "has not run on a GPU" in README or "GPU check, measured" in README
