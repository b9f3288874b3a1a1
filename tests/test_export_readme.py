"""export/README.md and infra/mlflow/README.md tell the truth: every command parses, every file and
name they cite exists, and every command of export/README.md runs, in order, on the layout it names."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
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


def _export_readme_commands() -> list[str]:
    text = (REPO / "export" / "README.md").read_text()
    section = text.split("## Commands\n", 1)[1].split("\n## ", 1)[0]
    return [line.split(".venv/bin/ctxmem ", 1)[1].strip()
            for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
            for line in block.replace("\\\n", " ").splitlines() if line.startswith(".venv/bin/ctxmem ")]


def _training_layout(checkpoint: Path, work: Path) -> Path:
    """What `ctxmem train --config infra/train-tiny.yaml` leaves behind, on the tiny test model: the
    checkpoint in runs/tiny/final, logged to an MLflow run as `checkpoint/` in the default store,
    and that run's id in runs/tiny/final/mlflow_run.json."""
    from mlflow import MlflowClient

    from ctxmem.paths import default_artifact_location, default_tracking_uri

    final = shutil.copytree(checkpoint, work / "runs" / "tiny" / "final")
    uri = default_tracking_uri()
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment("ctxmem-train", default_artifact_location(uri)))
    client.log_artifacts(run.info.run_id, str(final), "checkpoint")
    client.set_terminated(run.info.run_id, "FINISHED")
    (final / "mlflow_run.json").write_text(json.dumps(
        {"run_id": run.info.run_id, "tracking_uri": uri, "experiment": "ctxmem-train"}) + "\n")
    return final


@pytest.mark.slow
def test_every_command_of_the_export_readme_runs_in_order_on_the_layout_it_names(
        tiny_checkpoint, tmp_path, monkeypatch, capsys, mlflow_store_template):
    from helpers_export import new_sqlite_store, synthetic_text

    from ctxmem.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the documented default: ./mlflow.db
    monkeypatch.setenv("CTXMEM_MODEL_CACHE", str(tmp_path / "cache"))
    new_sqlite_store(mlflow_store_template, tmp_path / "mlflow.db")  # the default store, as training left it
    final = _training_layout(tiny_checkpoint, tmp_path)
    (tmp_path / "notes.txt").write_text(synthetic_text(200, seed=3))
    monkeypatch.setenv("RUN_ID", json.loads((final / "mlflow_run.json").read_text())["run_id"])

    commands = _export_readme_commands()
    assert len(commands) >= 15 and any("models:/" in c for c in commands) and any("runs:/" in c for c in commands)
    outputs = []
    for command in commands:
        code = main(shlex.split(os.path.expandvars(command)))
        out, err = capsys.readouterr()
        assert code == 0, f"`ctxmem {command}` failed:\n{err[-3000:]}"
        outputs.append(out)

    for name in ("tiny", "tiny-int8", "tiny-fp16", "again"):
        report = json.loads((tmp_path / "exports" / name / "verification.json").read_text())
        assert report["status"] == "passed", name
    runtime = json.loads((tmp_path / "exports" / "tiny" / "runtime_config.json").read_text())
    assert runtime["memory"] == {"policy": "sink", "window": 124, "sinks": 4, "chunk": 1}
    assert runtime["source"]["run_id"] == os.environ["RUN_ID"]
    listed = outputs[commands.index("registry list --name ctxmem-chat")].splitlines()
    assert [row.split()[:2] for row in listed[1:]] == [["ctxmem-chat", "1"], ["ctxmem-chat", "2"]]
    assert "ctxmem-chat@champion -> version 1 (was version 2)" in outputs[-2]  # the rollback drill
    # the memory evaluation: one made by `eval memory` and recorded from its file, one measured by the
    # registry, on the same text - so the champion gate compared them (and passed version 2)
    recorded = [out for command, out in zip(commands, outputs) if command.startswith("registry evaluate-memory")]
    assert len(recorded) == 2 and all("\nrecorded on ctxmem-chat version" in out for out in recorded)
    from mlflow import MlflowClient

    from ctxmem.paths import default_tracking_uri

    client = MlflowClient(default_tracking_uri(), default_tracking_uri())
    tags = {v: json.loads(client.get_model_version("ctxmem-chat", v).tags["ctxmem.memory_eval"]) for v in "12"}
    assert tags["1"]["text_sha256"] == tags["2"]["text_sha256"] and tags["1"]["window"] == tags["2"]["window"] == 32
    decision = json.loads(client.get_model_version("ctxmem-chat", "2").tags["ctxmem.promotion.champion"])
    assert decision["gate"] == "passed" and decision["memory_gate"] == "passed"
    assert outputs[-1].strip()  # the champion generated text


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
