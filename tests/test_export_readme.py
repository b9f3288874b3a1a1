"""export/README.md and infra/mlflow/README.md tell the truth: every command parses, every file and
name they cite exists."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ctxmem.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "export" / "README.md", REPO / "infra" / "mlflow" / "README.md"]


def _examples():
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if ".venv/bin/ctxmem " in line:
                    yield line.split(".venv/bin/ctxmem ", 1)[1].strip()


@pytest.mark.parametrize("example", list(_examples()))
def test_every_ctxmem_example_in_the_export_docs_is_a_valid_command(example):
    args = build_parser().parse_args(shlex.split(example))
    assert callable(args.func)


def test_runtime_config_fields_in_the_readme_are_the_dataclass_fields():
    import dataclasses

    from ctxmem.export.runtime import RuntimeConfig

    text = (REPO / "export" / "README.md").read_text()
    section = text.split("## The runtime config", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)`", section, flags=re.M))
    documented |= set(re.findall(r"^\| `[a-z_]+`, `([a-z_]+)`", section, flags=re.M))
    assert documented == {f.name for f in dataclasses.fields(RuntimeConfig)}


def test_the_documented_python_api_imports():
    text = (REPO / "export" / "README.md").read_text()
    block = text.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "export/README.md", "exec"), {})


def test_the_mlflow_server_script_the_docs_name_exists_and_binds_loopback_by_default():
    script = (REPO / "infra" / "mlflow" / "start_server.sh").read_text()
    assert "MLFLOW_HOST:-127.0.0.1" in script and "--serve-artifacts" in script
