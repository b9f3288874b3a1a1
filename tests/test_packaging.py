"""Layout rules: the stage folders install under the ctxmem namespace; the core stays torch+numpy."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_CORE = ("deepspeed", "ray", "mlflow", "onnxruntime", "onnx", "transformers")


def test_core_folder_never_imports_the_distribution_or_serving_stack():
    offenders = []
    for path in (REPO / "ctxmem").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN_IN_CORE]
    assert offenders == []


def test_importing_the_core_loads_none_of_the_heavy_stack():
    code = ("import sys, ctxmem.model, ctxmem.memory, ctxmem.generation, ctxmem.tokenizer, ctxmem.cli; "
            "ctxmem.cli.build_parser(); "
            f"print(sorted(m for m in {FORBIDDEN_IN_CORE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_editable_install_maps_stage_packages_onto_the_top_level_folders():
    import ctxmem.export
    import ctxmem.serving
    import ctxmem.training

    assert Path(ctxmem.training.__file__).parent == REPO / "training"
    assert Path(ctxmem.export.__file__).parent == REPO / "export"
    assert Path(ctxmem.serving.__file__).parent == REPO / "serving"


@pytest.mark.slow
def test_regular_install_puts_only_the_ctxmem_namespace_into_site_packages(tmp_path):
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True)
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith((".dist-info", "bin")))
    assert top == ["ctxmem"], top
    code = ("import ctxmem.training, ctxmem.export, ctxmem.serving, ctxmem.model; "
            "print(ctxmem.training.__file__); print(ctxmem.serving.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert all(line.startswith(str(target)) for line in out.stdout.split()), out.stdout
