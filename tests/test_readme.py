"""The README tells the truth: its two set-up commands are what CI runs, its examples parse."""
import re
import shlex
from pathlib import Path

import pytest

from ctxmem.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [b.strip() for b in bash_blocks(quick)]
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert commands[0].startswith("bash infra/bootstrap.sh && ") and commands[0].endswith("ctxmem demo")
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci[-1] == commands[1]


def readme_ctxmem_examples():
    for block in bash_blocks(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if ".venv/bin/ctxmem " in line and "&&" not in line:
                yield line.split(".venv/bin/ctxmem ", 1)[1]


@pytest.mark.parametrize("example", list(readme_ctxmem_examples()))
def test_every_ctxmem_example_in_the_readme_is_a_valid_command(example):
    args = build_parser().parse_args(shlex.split(example))
    assert callable(args.func)
