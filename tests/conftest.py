"""Shared test set-up: everything on loopback, caches in one reusable folder, tiny models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

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
