"""MLflow model registry: register -> promote (gated aliases) -> load by models:/NAME@champion ->
generate, on the embedded SQLite store and on a real `mlflow server`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_export import MlflowServer, copy_export, new_sqlite_store, tamper_weights

from ctxmem.cli import main
from ctxmem.export.errors import AliasNotFoundError, PromotionRefusedError, RegistryError


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store_template) -> str:
    """One SQLite store for this module (creating its tables costs seconds), found the default way
    ($MLFLOW_TRACKING_URI); each test uses its own registered model names."""
    root = tmp_path_factory.mktemp("sqlite_store")
    uri = new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CTXMEM_MODEL_CACHE", str(root / "cache"))
        mp.chdir(root)
        yield uri


def _text(tmp_path: Path) -> Path:
    from helpers_export import synthetic_text

    path = tmp_path / "eval.txt"
    path.write_text(synthetic_text(60, seed=3))
    return path


def _aliases(uri: str, name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {a: str(v) for a, v in MlflowClient(uri, uri).get_registered_model(name).aliases.items()}


def test_challenger_to_champion_then_a_tampered_version_is_refused_and_champion_loads(
        store, tiny_export, tmp_path, capsys):
    text = _text(tmp_path)
    assert main(["registry", "register", "--export", str(tiny_export), "--name", "ctx",
                 "--eval-data", str(text), "--alias", "challenger"]) == 0
    out = capsys.readouterr().out
    assert "registered ctx version 1 (verification passed, val_ppl" in out and "ctx@challenger -> version 1" in out
    # the memory gate (tests/test_registry_memory_gate.py) is skipped here, and the decision says so
    assert main(["registry", "promote", "--name", "ctx", "--from-alias", "challenger", "--alias", "champion",
                 "--no-memory-gate"]) == 0
    assert "ctx@champion -> version 1 (memory gate skipped: --no-memory-gate)" in capsys.readouterr().out
    assert _aliases(store, "ctx") == {"challenger": "1", "champion": "1"}

    # a tampered export is refused: its files no longer match the report's hashes, and re-verified
    # against the checkpoint its values differ ...
    bad = copy_export(tiny_export, tmp_path / "bad")
    tamper_weights(bad)
    capsys.readouterr()
    assert main(["registry", "register", "--export", str(bad), "--name", "ctx"]) == 1
    assert "changed after verification" in capsys.readouterr().err
    assert main(["registry", "register", "--export", str(bad), "--name", "ctx", "--reverify"]) == 1
    assert "differs from PyTorch by up to" in capsys.readouterr().err
    # ... registered anyway for inspection, the promotion gate refuses it and champion stays
    from ctxmem.export.registry import promote, register_export

    result = register_export(bad, "ctx", allow_unverified=True)
    assert (result["version"], result["verification"]) == ("2", "failed")
    assert main(["registry", "promote", "--name", "ctx", "--version", "2", "--alias", "champion"]) == 1
    err = capsys.readouterr().err
    assert "refused to point ctx@champion at version 2" in err and "stays on version 1" in err
    with pytest.raises(PromotionRefusedError, match="verification failed"):
        promote("ctx", "challenger", version="2")
    assert _aliases(store, "ctx") == {"challenger": "1", "champion": "1"}

    assert main(["registry", "list", "--name", "ctx"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["name", "version", "aliases", "verification", "variant"]
    assert table[1].split()[:4] == ["ctx", "1", "@challenger,@champion", "passed"]
    assert table[2].split()[:4] == ["ctx", "2", "-", "failed"]

    # serving side: the champion by alias, through the ONNX engine and through the pyfunc
    from ctxmem.export.resolve import open_onnx_generator, resolve_model
    from ctxmem.export.runtime import load_onnx_generator
    from ctxmem.sampling import GenerationConfig

    with pytest.raises(AliasNotFoundError, match=r"its aliases: @challenger -> v1, @champion -> v1"):
        resolve_model("models:/ctx@production")
    with pytest.raises(RegistryError, match="no registered model 'nope'.*\\['ctx'\\]"):
        resolve_model("models:/nope@champion")
    local = resolve_model("models:/ctx@champion")
    assert json.loads((local / "verification.json").read_text())["status"] == "passed"
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    served = open_onnx_generator("models:/ctx@champion").generate(["sink"], config)[0]
    assert served.token_ids == load_onnx_generator(tiny_export).generate(["sink"], config)[0].token_ids

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model("models:/ctx@champion")
    texts = model.predict(np.array(["sink", "window"]), params={"max_new_tokens": 5})["text"]
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    inputs = model.metadata.get_input_schema().inputs[0]
    assert inputs.name == "prompt" and inputs.shape == (-1,)


def test_champion_gate_compares_perplexity_and_a_forced_promotion_is_recorded(
        store, small_export, small_checkpoint, tiny_export, tmp_path):
    from mlflow import MlflowClient

    from ctxmem.export.registry import list_versions, promote, register_export
    from ctxmem.export.runtime import RuntimeConfig

    # lineage: the training run lives in this store; its id is what the export carries
    client = MlflowClient(store, store)
    run = client.create_run(client.create_experiment("ctxmem-train"))
    client.log_metric(run.info.run_id, "val_ppl", 14.0)
    client.set_terminated(run.info.run_id)
    trained = copy_export(small_export, tmp_path / "trained")
    config = RuntimeConfig.load(trained)
    config.source["run_id"] = run.info.run_id
    config.save(trained)

    data = small_checkpoint.parent / "val.txt"
    good = register_export(trained, "gate", eval_data=data)
    assert good["val_ppl"] < 30 and good["verification"] == "passed"
    reg_run = client.get_run(good["run_id"])
    assert reg_run.data.tags["mlflow.parentRunId"] == run.info.run_id  # training run -> registration
    assert reg_run.info.experiment_id == run.info.experiment_id
    version = client.get_model_version("gate", good["version"])
    assert version.tags["ctxmem.source_run_id"] == run.info.run_id
    assert json.loads(version.tags["ctxmem.verification_report"])["greedy"]["tokens_matched"] == 128
    promote("gate", "champion", version=good["version"], memory_gate=False)  # this test: the perplexity gate

    worse = register_export(tiny_export, "gate", eval_data=data)  # random weights: perplexity ~ vocabulary size
    with pytest.raises(PromotionRefusedError, match=r"validation perplexity .* worse than the champion's"):
        promote("gate", "champion", version=worse["version"])
    with pytest.raises(RegistryError, match="--reason"):
        promote("gate", "champion", version=worse["version"], force=True)
    record = promote("gate", "champion", version=worse["version"], force=True, reason="rollback drill")
    assert record["forced"] and record["previous_version"] == good["version"]
    assert _aliases(store, "gate")["champion"] == worse["version"]
    stored = json.loads(client.get_model_version("gate", worse["version"]).tags["ctxmem.promotion.champion"])
    assert stored["reason"] == "rollback drill" and "worse" in stored["gate"][0]
    assert json.loads(client.get_registered_model("gate").tags["ctxmem.last_promotion.champion"])["forced"]
    rows = {r["version"]: r for r in list_versions("gate")}
    assert rows[worse["version"]]["aliases"] == ["champion"] and rows[good["version"]]["val_ppl"] < 30


def test_a_version_registered_around_ctxmem_without_verification_is_refused(store, tiny_export):
    from mlflow import MlflowClient

    from ctxmem.export.registry import promote

    client = MlflowClient(store, store)
    client.create_registered_model("bare")
    client.create_model_version("bare", source=tiny_export.as_uri())  # no ctxmem.* tags at all
    with pytest.raises(PromotionRefusedError, match="no verification record"):
        promote("bare", "champion", version="1")
    assert "champion" not in client.get_registered_model("bare").aliases


def test_runs_uri_resolves_to_the_checkpoint_a_training_run_logged(store, tiny_checkpoint):
    from mlflow import MlflowClient

    from ctxmem.export.resolve import resolve_model

    client = MlflowClient(store, store)
    run = client.create_run(client.create_experiment("training-artifacts"))
    client.log_artifacts(run.info.run_id, str(tiny_checkpoint), "checkpoint")
    path = resolve_model(f"runs:/{run.info.run_id}/checkpoint")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert resolve_model(f"runs:/{run.info.run_id}/checkpoint") == path  # cached: downloaded once


@pytest.mark.slow
def test_register_promote_load_and_generate_against_a_real_mlflow_server(tiny_export, tmp_path, monkeypatch,
                                                                         mlflow_store_template):
    from ctxmem.export.registry import promote, register_export
    from ctxmem.export.resolve import open_onnx_generator, resolve_model

    server = MlflowServer(tmp_path / "server", store_template=mlflow_store_template)
    try:
        server.wait()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        monkeypatch.setenv("CTXMEM_MODEL_CACHE", str(tmp_path / "cache"))
        result = register_export(tiny_export, "served")
        assert result["tracking_uri"] == server.uri and result["verification"] == "passed"
        promote("served", "champion", version=result["version"], memory_gate=False)
        with pytest.raises(AliasNotFoundError, match="@champion -> v1"):
            resolve_model("models:/served@staging")
        path = resolve_model("models:/served@champion")
        assert (path / "model.onnx.data").stat().st_size == (tiny_export / "model.onnx.data").stat().st_size
        done = open_onnx_generator("models:/served@champion").generate(["hello"])[0]
        assert done.completion_tokens > 0
        # artifacts went through the server's proxy into its own folder, not the client's disk
        assert any((tmp_path / "server" / "artifacts").rglob("model.onnx"))
    finally:
        server.stop()
