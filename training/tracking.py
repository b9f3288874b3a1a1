"""MLflow tracking for rank 0 that never stops training and never loses a record.

Store: `tracking.uri` in the config, else $MLFLOW_TRACKING_URI, else a SQLite file
`mlflow.db` in the working directory (embedded: no server), with artifacts in `mlruns/` beside it.

What a run holds
    params     the full resolved training config (dotted keys), the model config, world size, batch split
    metrics    per step: loss, lr, grad_norm, tokens_per_s; per evaluation: val_loss, val_ppl
    tags       git commit, world size, ZeRO stage, device, precision, launcher
    artifacts  config.yaml, metrics.jsonl, loss_curve.png, checkpoint/ (the final ctxmem checkpoint)

When the store cannot be reached (a server that is down, a network that drops), the failed call
and every later one go to OUT/mlflow_pending.jsonl in order; training goes on, says so once, and
retries the whole journal at most once a minute and at the end. What is still pending then can
be replayed later with `ctxmem train --sync-mlflow OUT [--tracking-uri URI]`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("ctxmem.training")

JOURNAL = "mlflow_pending.jsonl"
RUN_FILE = "mlflow_run.json"
RETRY_SECONDS = 60.0
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


def default_uri(uri: str | None = None) -> str:
    from ctxmem.paths import default_tracking_uri

    return default_tracking_uri(uri)  # the one store default, shared with export and serving


def _artifact_location(uri: str) -> str | None:
    """sqlite stores keep artifacts in mlruns/ beside the database file; servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
    return None


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict, type(None))) else str(value)
    return flat


def git_tags(repo: Path | None = None) -> dict[str, str]:
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"git_commit": commit or "unknown", "git_dirty": str(dirty).lower()}


class Tracker:
    """Rank-0 MLflow logging through `MlflowClient`, journaled when the store is unreachable."""

    def __init__(self, uri: str, experiment: str, out: Path, *, run_name: str, params: dict[str, str],
                 tags: dict[str, str], resume_run_id: str | None = None):
        # An unreachable server should cost seconds, not MLflow's default minutes of retries:
        # we retry ourselves (the journal). A user's own settings win.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow import MlflowClient

        self.uri, self.experiment, self.out = uri, experiment, Path(out)
        self.journal = self.out / JOURNAL
        self.client = MlflowClient(uri)
        self.run_id: str | None = None
        self.offline = False
        self._last_try = 0.0
        self._metrics: list[tuple[str, float, int, int]] = []
        self._apply({"op": "start", "experiment": experiment, "run_name": run_name, "tags": tags,
                     "params": params, "resume_run_id": resume_run_id})

    # ---- public ---------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._metrics.extend((k, float(v), now, step) for k, v in metrics.items() if v is not None)

    def flush(self) -> None:
        if self._metrics:
            batch, self._metrics = self._metrics, []
            self._apply({"op": "batch", "metrics": batch})
        elif self.offline and time.monotonic() - self._last_try > RETRY_SECONDS:
            self._retry()

    def set_tags(self, tags: dict[str, str]) -> None:
        self._apply({"op": "batch", "tags": tags})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._apply({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run; True when everything reached the store (else the journal holds the rest)."""
        self.flush()
        self._apply({"op": "end", "status": status})
        if self.offline:
            self._retry()
        if self.offline:
            log.warning("MLflow at %s is still unreachable: %d record(s) kept in %s; replay them with "
                        "`ctxmem train --sync-mlflow %s --tracking-uri %s`",
                        self.uri, self._journal_len(), self.journal, self.out, self.uri)
        return not self.offline

    def run_info(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment": self.experiment,
                "pending": self.offline}

    # ---- internals ------------------------------------------------------------------------------
    def _apply(self, op: dict[str, Any]) -> None:
        if self.offline:
            self._append(op)
            if time.monotonic() - self._last_try > RETRY_SECONDS:
                self._retry()
            return
        try:
            self.run_id = apply_op(self.client, op, self.run_id)
        except Exception as err:  # noqa: BLE001 - any store failure: keep training, keep the record
            self.offline = True
            self._last_try = time.monotonic()
            logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # one warning is enough
            self._append(op)
            log.warning("MLflow at %s is unreachable (%s: %s); training goes on and tracking records are "
                        "journaled in %s", self.uri, type(err).__name__, str(err).splitlines()[0][:200], self.journal)

    def _append(self, op: dict[str, Any]) -> None:
        if op.get("op") != "start" and self.run_id and not self.journal.exists():
            with open(self.journal, "a") as f:  # the run exists already: the replay continues it
                f.write(json.dumps({"op": "attach", "run_id": self.run_id}) + "\n")
        with open(self.journal, "a") as f:
            f.write(json.dumps(op) + "\n")

    def _journal_len(self) -> int:
        return sum(1 for _ in open(self.journal)) if self.journal.exists() else 0

    def _retry(self) -> None:
        self._last_try = time.monotonic()
        try:
            self.run_id = replay(self.journal, self.client)
        except Exception:  # noqa: BLE001 - still down; the journal stays
            return
        self.offline = False
        log.info("MLflow at %s is reachable again; the journal was replayed into run %s", self.uri, self.run_id)


def apply_op(client, op: dict[str, Any], run_id: str | None) -> str | None:
    """Perform one journal operation against `client`; returns the (possibly new) run id."""
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "attach":
        return op["run_id"]
    if kind == "start":
        if op.get("resume_run_id"):
            run_id = op["resume_run_id"]
            client.update_run(run_id, status="RUNNING")
            existing = client.get_run(run_id).data.params
            params = {k: v for k, v in op["params"].items() if k not in existing}
            changed = sorted(k for k, v in op["params"].items() if k in existing and existing[k] != v)
            tags = dict(op["tags"])
            if changed:  # MLflow params are immutable: record what the resumed segment changed
                tags["resumed_with_changes"] = ",".join(changed)[:4000]
        else:
            exp = client.get_experiment_by_name(op["experiment"])
            exp_id = exp.experiment_id if exp else client.create_experiment(
                op["experiment"], artifact_location=_artifact_location(client.tracking_uri))
            run_id = client.create_run(exp_id, run_name=op["run_name"], tags=op["tags"]).info.run_id
            params, tags = op["params"], {}
        _log_batch(client, run_id, [], [Param(k, v) for k, v in params.items()],
                   [RunTag(k, v) for k, v in tags.items()])
        return run_id
    if run_id is None:
        raise RuntimeError("the journal has no run to log into (no start record)")
    if kind == "batch":
        _log_batch(client, run_id, [Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])], [],
                   [RunTag(k, v) for k, v in (op.get("tags") or {}).items()])
    elif kind == "artifact":
        path = Path(op["path"])
        if not path.exists():
            log.warning("artifact %s no longer exists; skipped", path)
        elif path.is_dir():
            client.log_artifacts(run_id, str(path), op.get("artifact_path"))
        else:
            client.log_artifact(run_id, str(path), op.get("artifact_path"))
    elif kind == "end":
        client.set_terminated(run_id, status=op["status"])
    else:
        raise ValueError(f"unknown journal operation {kind!r}")
    return run_id


def _log_batch(client, run_id: str, metrics: list, params: list, tags: list) -> None:
    while metrics or params or tags:
        client.log_batch(run_id, metrics=metrics[:_MAX_METRICS], params=params[:_MAX_PARAMS], tags=tags[:_MAX_TAGS])
        metrics, params, tags = metrics[_MAX_METRICS:], params[_MAX_PARAMS:], tags[_MAX_TAGS:]


def replay(journal: Path, client) -> str | None:
    """Apply a journal in order; on success delete it and return the run id. Raises on failure,
    leaving the journal as it was (operations applied before the failure are not repeated)."""
    if not journal.exists():
        return None
    ops = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    run_id = None
    for n, op in enumerate(ops):
        try:
            run_id = apply_op(client, op, run_id)
        except Exception:
            rest = ([{"op": "attach", "run_id": run_id}] if run_id else []) + ops[n:]
            tmp = journal.with_name(journal.name + ".tmp")
            tmp.write_text("".join(json.dumps(o) + "\n" for o in rest))
            tmp.replace(journal)
            raise
    journal.unlink()
    return run_id


def sync(out: Path, uri: str | None = None) -> str:
    """`ctxmem train --sync-mlflow OUT`: replay OUT's journal into `uri` and record the run id."""
    from mlflow import MlflowClient

    from .errors import TrainingError

    out = Path(out)
    journal = out / JOURNAL
    if not journal.exists():
        raise TrainingError(f"{out} has no {JOURNAL}: nothing is waiting to be sent to MLflow")
    uri = default_uri(uri)
    try:
        run_id = replay(journal, MlflowClient(uri))
    except Exception as err:  # noqa: BLE001 - report, keep the journal
        raise TrainingError(f"MLflow at {uri} did not take the journal ({type(err).__name__}: {err}); "
                            f"{journal} is kept, try again later") from None
    for path in (out / "final" / RUN_FILE, out / "summary.json"):
        if path.exists():
            data = json.loads(path.read_text())
            target = data if path.name == RUN_FILE else data.setdefault("mlflow", {})
            target.update(run_id=run_id, tracking_uri=uri, pending=False)
            path.write_text(json.dumps(data, indent=2) + "\n")
    return run_id


def plot_losses(metrics_file: Path, png: Path) -> Path | None:
    """Training loss per step and validation loss per evaluation, as a PNG (matplotlib, no display)."""
    if not metrics_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png
