"""Shared test set-up: everything on loopback, caches in one reusable folder, tiny models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"

# Local Ray binds 127.0.0.1 only; test traffic never leaves loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed JIT-builds ops (shm_comm) once; CI and tests reuse the build. One folder per Python
# (torch adds no pyXY level when the variable is set): a 3.12 run's build does not load in 3.11.
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(CACHE / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads spin while waiting by default; on a shared 2-core machine that starves the other
# processes (a tiny training step went from 0.05 s to 3 s). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own store

# Shared model fixtures (tiny checkpoint and export, trained `small` and its exports).
pytest_plugins = ["fixtures_models"]

# Under `-n 2` (the README's test command, pytest-xdist) whole modules go to whichever worker is
# free, so module fixtures (a Ray cluster, trained runs) are built once. They go out longest first,
# in this order, so that one worker does not start a 2-minute module while the other has run out
# of work. Measured with `pytest -n 2 --durations=0` on the 2-core machine with nothing else running
# (2026-12-01), each module's tests summed; unlisted modules (each under 7 s) follow in their usual
# order. Only the order changes: every test still runs.
LONGEST_FIRST = [
    "test_serving_bench.py",  # 139 s: bench_serving.py --quick (a Ray cluster of its own, every phase)
    "test_training_readme.py",  # 108 s: the README's trainings, 2-rank DeepSpeed runs among them
    "test_training_run.py",  # 94 s: ZeRO parity on 2 ranks, Ray Train
    "test_readme.py",  # 93 s: `ctxmem demo`
    "test_serving_ray.py",  # 91 s: `serve run` on the shipped YAML, the README's `ctxmem serve` lines
    "test_serving_direct_ingress.py",  # 37 s: `ctxmem serve --direct-ingress` and a local Ray Serve app
    "test_mlflow_postgres.py",  # 34 s: an MLflow server on PostgreSQL, `ctxmem serve`
    "test_training_launch.py",  # 31 s
    "test_export_graphs.py",  # 27 s
    "test_recall_model.py",  # 23 s
    "test_serving_replicas.py",  # 22 s: a Ray cluster with two engine replicas
    "test_export_bench_decode.py",  # 21 s
    "test_serving_colocated.py",  # 18 s: a Ray cluster with two colocated replicas
    "test_export_registry.py",  # 17 s: a real `mlflow server`
    "test_chat_page.py",  # 17 s: chromium, recall-small's 20 turns
    "test_bench_sinks.py",  # 15 s
    "test_training_copy.py",  # 15 s
    "test_export_readme.py",  # 13 s
    "test_export_onnx.py",  # 12 s
    "test_registry_memory_gate.py",  # 9 s
    "test_registry_integrity.py",  # 7 s
    "test_training_sinks.py",  # 7 s
    "test_packaging.py",  # 7 s
]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), order[id(item)]))


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent without it (infra/gpu-check.sh's pytest)
def pytest_xdist_make_scheduler(config, log):
    """One module at a time per worker (xdist's `--dist loadfile`), in collection order (the order
    above), not xdist's default of the modules with the most tests first."""
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
