"""Session fixtures for the models the tests share: the tiny checkpoint, its export, a cheaply
trained `small` checkpoint with its fp32 and int8 exports. Registered for every test module by
`pytest_plugins` in conftest.py, so each is built at most once per session, and only when a test
asks for it."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers_export import new_sqlite_store, train_small


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised `tiny` model with the byte tokenizer, saved as a ctxmem checkpoint."""
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size))
    out = tmp_path_factory.mktemp("tiny_ckpt")
    save_checkpoint(out, model, tok)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """Built through the CLI, as a user would: sink memory written into the runtime config."""
    from ctxmem.cli import main

    out = tmp_path_factory.mktemp("tiny_export") / "export"
    code = main(["export", "--model", str(tiny_checkpoint), "--out", str(out),
                 "--policy", "sink", "--sinks", "4", "--window", "60"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    # 20 steps of a plain torch loop on a synthetic grammar: loss ~5.6 -> ~2.6, enough to be "trained"
    return train_small(tmp_path_factory.mktemp("small") / "ckpt", steps=20, seq_len=32, batch=4)


@pytest.fixture(scope="session")
def small_export(small_checkpoint, tmp_path_factory) -> Path:
    from ctxmem.export.onnx_export import export_onnx

    return export_onnx(small_checkpoint, tmp_path_factory.mktemp("small_x") / "fp32")


@pytest.fixture(scope="session")
def small_int8(small_export, small_checkpoint, tmp_path_factory) -> Path:
    from ctxmem.export.onnx_export import derive_variant

    # the same step `ctxmem export --int8` runs after tracing and verifying the fp32 graph
    return derive_variant(small_export, tmp_path_factory.mktemp("small_x") / "int8", "int8",
                          eval_data=small_checkpoint.parent / "val.txt")


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with all of MLflow's schema migrations applied, made once per
    session: a fresh store runs ~50 alembic migrations (seconds each time). Tests take a copy of it
    with `new_sqlite_store`; each copy is a store of its own, as MLflow itself would have made it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    MlflowClient(uri, uri).search_experiments()  # creates the tables (tracking and registry share them)
    return path


@pytest.fixture
def sqlite_store(mlflow_store_template, tmp_path) -> str:
    """A fresh MLflow SQLite store for one test (a copy of the session's migrated template): its URI."""
    return new_sqlite_store(mlflow_store_template, tmp_path / "mlflow.db")
