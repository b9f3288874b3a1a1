"""Session fixtures for the models the tests share: the tiny checkpoint, its export, a cheaply
trained `small` checkpoint with its fp32 and int8 exports. Registered for every test module by
`pytest_plugins` in conftest.py, so each is built at most once per test run, and only when a test
asks for it - once per run also under pytest-xdist (see `built_once`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest

from helpers_export import new_sqlite_store, train_small


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)` (it returns a path inside `folder`), run once per test run. Under pytest-xdist
    (the README's `-n 2`) every worker is a process with a session of its own: the first worker to
    ask builds into a folder of the run that all workers share, under a file lock, and the others
    wait for it and take the same path - instead of spending the same seconds of CPU again. What is
    built is only read afterwards, as with any session fixture."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:  # one process: the session is the run
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "shared"  # pytest-N/, above each worker's popen-gwK/
    shared.mkdir(exist_ok=True)
    folder, done = shared / name, shared / f"{name}.done"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half way
            folder.mkdir()
            done.write_text(str(build(folder)))  # written last: the path, once it is whole
        return Path(done.read_text())


def _tiny_checkpoint(folder: Path) -> Path:
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    save_checkpoint(folder, model, tok)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` model with the byte tokenizer, saved as a ctxmem checkpoint."""
    return built_once(tmp_path_factory, "tiny_ckpt", _tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """Built through the CLI, as a user would: sink memory written into the runtime config."""
    def build(folder: Path) -> Path:
        from ctxmem.cli import main

        code = main(["export", "--model", str(tiny_checkpoint), "--out", str(folder / "export"),
                     "--policy", "sink", "--sinks", "4", "--window", "60"])
        assert code == 0
        return folder / "export"

    return built_once(tmp_path_factory, "tiny_export", build)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    # 20 steps of a plain torch loop on a synthetic grammar: loss ~5.6 -> ~2.6, enough to be "trained"
    return built_once(tmp_path_factory, "small",
                      lambda folder: train_small(folder / "ckpt", steps=20, seq_len=32, batch=4))


@pytest.fixture(scope="session")
def branch_export(tmp_path_factory) -> Path:
    """A tiny model whose head_dim (16) gets the GroupQueryAttention decode branch (tiny's own 24 does
    not), exported without verification (tests/test_export_graphs.py verifies this shape of model)."""
    def build(folder: Path) -> Path:
        import torch

        from ctxmem.checkpoint import save_checkpoint
        from ctxmem.config import preset
        from ctxmem.export.onnx_export import export_onnx
        from ctxmem.model import Transformer
        from ctxmem.tokenizer import ByteTokenizer

        torch.manual_seed(3)
        tok = ByteTokenizer()
        model = Transformer(preset("tiny", vocab_size=tok.vocab_size, n_heads=6, n_kv_heads=2))
        save_checkpoint(folder / "ckpt", model, tok)
        return export_onnx(folder / "ckpt", folder / "export", verify=False)

    return built_once(tmp_path_factory, "branch_export", build)


@pytest.fixture(scope="session")
def small_export(small_checkpoint, tmp_path_factory) -> Path:
    def build(folder: Path) -> Path:
        from ctxmem.export.onnx_export import export_onnx

        return export_onnx(small_checkpoint, folder / "fp32")

    return built_once(tmp_path_factory, "small_x", build)


@pytest.fixture(scope="session")
def small_int8(small_export, small_checkpoint, tmp_path_factory) -> Path:
    def build(folder: Path) -> Path:
        from ctxmem.export.onnx_export import derive_variant

        # the same step `ctxmem export --int8` runs after tracing and verifying the fp32 graph
        return derive_variant(small_export, folder / "int8", "int8", eval_data=small_checkpoint.parent / "val.txt")

    return built_once(tmp_path_factory, "small_int8", build)


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with all of MLflow's schema migrations applied, made once per
    run: a fresh store runs ~50 alembic migrations (seconds each time). Tests take a copy of it
    with `new_sqlite_store`; each copy is a store of its own, as MLflow itself would have made it."""
    def build(folder: Path) -> Path:
        from mlflow import MlflowClient

        uri = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(uri, uri).search_experiments()  # creates the tables (tracking and registry share them)
        return folder / "mlflow.db"

    return built_once(tmp_path_factory, "mlflow_template", build)


@pytest.fixture
def sqlite_store(mlflow_store_template, tmp_path) -> str:
    """A fresh MLflow SQLite store for one test (a copy of the session's migrated template): its URI."""
    return new_sqlite_store(mlflow_store_template, tmp_path / "mlflow.db")
