"""Where the project keeps things by default, shared by every stage (no MLflow import here).

The MLflow store: `ctxmem train` records runs there and `ctxmem registry` / `ctxmem serve` look
models up there, so all stages must agree on one default for lineage to link up.
"""
from __future__ import annotations

import os
from pathlib import Path

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def default_tracking_uri(uri: str | None = None) -> str:
    """`uri` when given, else $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` in the working
    directory (embedded: no server). Absolute, so processes started elsewhere find the same store."""
    return uri or os.environ.get(TRACKING_URI_ENV) or "sqlite:///" + str(Path.cwd() / "mlflow.db")


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: `mlruns/` beside a SQLite store's file; a server
    chooses its own (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return None
