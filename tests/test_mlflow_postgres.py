"""MLflow on PostgreSQL, end to end, against a real PostgreSQL server: infra/mlflow/start_server.sh with
its backend store in a fresh database (created for this module, dropped after) and artifacts proxied
into a directory; a tiny training run tracked through that server, its checkpoint exported from
`runs:/RUN/checkpoint`, registered, promoted to champion through the gate, and served by
`ctxmem serve --model models:/NAME@champion`, which answers a completion over HTTP.

The PostgreSQL server: $CTXMEM_TEST_POSTGRES (a libpq URL with rights to create databases), default
postgresql://postgres@127.0.0.1:5432/postgres - the one this project's machines and CI run (trust auth).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_export import MlflowServer
from helpers_serving import wait_healthy
from helpers_training import train_inprocess, write_text_corpus

from ctxmem.proc import default_sigint

ADMIN_URL = os.environ.get("CTXMEM_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
NAME = "ctxmem-pg"


@pytest.fixture(scope="module")
def postgres_database():
    """A fresh, empty database for this module's MLflow store; dropped afterwards (connections too)."""
    import psycopg

    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(f"no PostgreSQL server at {ADMIN_URL} ({err}); start one, or point $CTXMEM_TEST_POSTGRES "
                    "at a server where this user may CREATE DATABASE")
    name = f"ctxmem_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_train_register_promote_and_serve_through_an_mlflow_server_on_postgresql(
        postgres_database, tmp_path, monkeypatch):
    import httpx
    import psycopg

    from ctxmem.cli import main
    from ctxmem.net import free_port
    from ctxmem.training.data import prepare

    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", postgres_database)  # the store URL: environment only
    server = MlflowServer(tmp_path / "server")
    serving = None
    try:
        # while the server migrates its fresh database: the corpus, and the trainer's imports
        data = tmp_path / "data"
        prepare([str(write_text_corpus(tmp_path / "corpus"))], data, progress=False)
        import deepspeed  # noqa: F401

        server.wait()
        assert postgres_database.rsplit("/", 1)[1] in (tmp_path / "server" / "server.log").read_text()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("CTXMEM_MODEL_CACHE", str(tmp_path / "cache"))

        # train: 2 steps of the tiny preset, tracked through the server
        result = train_inprocess(tmp_path / "run", data, "steps=2", "eval.interval=2", "eval.samples=4",
                                 "checkpoint.interval=2", "tracking.enabled=true", f"tracking.uri={server.uri}")
        run_id = json.loads((tmp_path / "run" / "final" / "mlflow_run.json").read_text())["run_id"]
        assert result.mlflow["run_id"] == run_id

        # export the checkpoint as the server holds it, register, promote through the gate
        export = tmp_path / "export"
        assert main(["export", "--model", f"runs:/{run_id}/checkpoint", "--out", str(export),
                     "--policy", "sink", "--sinks", "4", "--window", "60"]) == 0
        assert main(["registry", "register", "--export", str(export), "--name", NAME, "--alias", "challenger"]) == 0
        assert main(["registry", "promote", "--name", NAME, "--from-alias", "challenger", "--alias", "champion",
                     "--no-memory-gate"]) == 0

        # all of it is in PostgreSQL: the run, its metrics, the version and its aliases
        with psycopg.connect(postgres_database) as db:
            (status,) = db.execute("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)).fetchone()
            (n_loss,) = db.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                                   (run_id,)).fetchone()
            aliases = dict(db.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                                      (NAME,)).fetchall())
        assert status == "FINISHED" and n_loss >= 1
        assert aliases == {"challenger": 1, "champion": 1}
        # artifacts went through the server's proxy into its directory
        assert any((tmp_path / "server" / "artifacts").rglob("model.onnx"))

        # serve the champion through the same server; one request answered
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serving = subprocess.Popen(
            [sys.executable, "-m", "ctxmem", "serve", "--model", f"models:/{NAME}@champion", "--host", "127.0.0.1",
             "--port", str(port), "--engine-cpus", "0.5", "--session-store", "memory://"],
            stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=default_sigint)  # stopped with SIGINT below
        wait_healthy(url, timeout=240, proc=serving)
        reply = httpx.post(url + "/v1/completions", timeout=120,
                           json={"model": NAME, "prompt": "Line 3:", "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] > 0
    finally:
        if serving is not None and serving.poll() is None:
            os.killpg(serving.pid, signal.SIGINT)
            try:
                serving.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(serving.pid, signal.SIGKILL)
        server.stop()


def test_the_server_script_takes_the_store_url_from_the_environment_only(tmp_path):
    """The URL is read from $MLFLOW_BACKEND_STORE_URI and handed to mlflow through the environment (argv is
    world-readable through ps); a URL with a password is logged with the password masked."""
    script = Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "start_server.sh"
    text = script.read_text()
    assert "--backend-store-uri" not in text.split("exec ", 1)[1]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": "postgresql://u:hunter2@db:5432/mlflow", "MLFLOW_BIN": "echo",
           "MLFLOW_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "postgresql://u:***@db:5432/mlflow" in done.stderr and "hunter2" not in done.stderr + done.stdout
    bad = subprocess.run(["bash", str(script)], env={**env, "MLFLOW_BACKEND_STORE_URI": "mysql://x@y/z"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "must be postgresql://" in bad.stderr
