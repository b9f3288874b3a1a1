"""Registry artifacts are verified on load: a download is checked against the sha256 recorded for
its version before anything is loaded (a mismatch is refused and the download removed), each
version is downloaded once, atomically, however many threads and processes ask at the same time,
and runtime_config.json cannot point outside its export folder. On a real MLflow store (SQLite
with local artifacts in tmp)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from helpers_export import copy_export, new_sqlite_store, tamper_weights

from ctxmem.export.errors import ArtifactIntegrityError, RegistryError, RuntimeConfigError, UnsafeFilePathError
from ctxmem.export.runtime import DATA_FILE, MODEL_FILE, RUNTIME_CONFIG, TOKENIZER_FILE, RuntimeConfig, file_sha256

@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store_template) -> str:
    root = tmp_path_factory.mktemp("integrity_store")
    uri = new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        yield uri


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own: each test sees its first download happen."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CTXMEM_MODEL_CACHE", str(path))
    return path


def _register(export_dir: Path, name: str) -> dict:
    from ctxmem.export.registry import register_export

    result = register_export(export_dir, name)
    assert result["verification"] == "passed"
    return result


def _recorded(store: str, name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return json.loads(MlflowClient(store, store).get_model_version(name, version).tags["ctxmem.export_sha256"])


def _stored_export(store: str, name: str, version: str) -> Path:
    """The export folder inside the store's artifacts (what a download copies)."""
    from mlflow import MlflowClient

    source = MlflowClient(store, store).get_model_version(name, version).source
    matches = list(Path(unquote(urlparse(source).path)).rglob(RUNTIME_CONFIG))
    assert len(matches) == 1, matches
    return matches[0].parent


def _hashes(export_dir: Path) -> dict[str, str]:
    return {n: file_sha256(export_dir / n) for n in (MODEL_FILE, DATA_FILE, TOKENIZER_FILE, RUNTIME_CONFIG)}


def _leftovers(cache: Path) -> list[Path]:
    """Temporary download or discard folders anywhere in the cache."""
    return [p for p in cache.rglob(".*") if p.is_dir()]


# ---- sha256 against what registration recorded --------------------------------------------------------
def test_a_version_tampered_in_the_store_after_registration_is_refused_and_its_download_removed(
        store, cache, tiny_export, tmp_path, capsys):
    from ctxmem.cli import main
    from ctxmem.export.resolve import resolve_model

    _register(copy_export(tiny_export, tmp_path / "export"), "tampered")
    recorded = _recorded(store, "tampered", "1")
    assert set(recorded) == {MODEL_FILE, DATA_FILE, TOKENIZER_FILE, RUNTIME_CONFIG}  # every file a replica loads
    stored = _stored_export(store, "tampered", "1")
    tamper_weights(stored)
    changed = file_sha256(stored / DATA_FILE)
    assert changed != recorded[DATA_FILE]

    with pytest.raises(ArtifactIntegrityError) as err:
        resolve_model("models:/tampered/1")
    assert (err.value.file, err.value.expected, err.value.actual) == (DATA_FILE, recorded[DATA_FILE], changed)
    message = str(err.value)
    assert recorded[DATA_FILE] in message and changed in message and DATA_FILE in message
    assert "tag ctxmem.export_sha256" in message and "register the export again" in message
    assert "download was removed" in message
    assert isinstance(err.value, RegistryError)
    # nothing of the download stays: no entry, no temporary folder
    entries = [p for p in cache.rglob("*") if p.is_dir() and not p.name.startswith(".")]
    assert [p for p in entries if p.name.startswith("v1-")] == [] and _leftovers(cache) == []

    # a user of the CLI gets the same refusal as one line, before any model is loaded
    capsys.readouterr()
    assert main(["generate", "--backend", "onnx", "--model", "models:/tampered/1", "--prompt", "hi"]) == 1
    assert f"{DATA_FILE} does not match the sha256 recorded for tampered version 1" in capsys.readouterr().err


def test_a_cached_copy_changed_after_its_download_is_downloaded_again(store, cache, tiny_export, caplog):
    from ctxmem.export.resolve import resolve_model

    _register(tiny_export, "recached")
    recorded = _recorded(store, "recached", "1")
    first = resolve_model("models:/recached/1")
    assert _hashes(first) == recorded
    tamper_weights(first)  # the local copy, not the store
    assert file_sha256(first / DATA_FILE) != recorded[DATA_FILE]
    entry = next(p for p in first.parents if p.name.startswith("v1-"))
    dead = entry.parent / f".{entry.name}.download-killed"  # what a downloader killed midway leaves
    (dead / "model").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="ctxmem.export"):
        again = resolve_model("models:/recached/1")
    assert again == first and _hashes(again) == recorded
    assert "changed after it was downloaded" in caplog.text
    assert sum("downloading models:/recached/1" in r.getMessage() for r in caplog.records) == 1
    assert _leftovers(cache) == []


def test_a_run_folder_is_checked_against_the_exports_own_verification_report(store, cache, tiny_export):
    """A runs:/ URI has no registered version: the report the export carries vouches for its files."""
    from mlflow import MlflowClient

    from ctxmem.export.resolve import resolve_model

    client = MlflowClient(store, store)
    run = client.create_run(client.create_experiment("integrity-runs"))
    client.log_artifacts(run.info.run_id, str(tiny_export), "export")
    path = resolve_model(f"runs:/{run.info.run_id}/export")
    assert _hashes(path) == _hashes(tiny_export)

    stored = Path(unquote(urlparse(client.get_run(run.info.run_id).info.artifact_uri).path)) / "export"
    tamper_weights(stored)
    with pytest.raises(ArtifactIntegrityError, match="sha256 that the download's own verification.json recorded"):
        resolve_model(f"runs:/{run.info.run_id}/export", cache_dir=cache / "other")
    assert _leftovers(cache) == []


def test_a_version_without_recorded_hashes_warns_and_a_malformed_record_is_refused(store, cache, tiny_export,
                                                                                    caplog):
    from mlflow import MlflowClient

    from ctxmem.export.resolve import resolve_model

    client = MlflowClient(store, store)
    client.create_registered_model("untagged")
    client.create_model_version("untagged", source=tiny_export.as_uri())  # registered around ctxmem
    with caplog.at_level(logging.WARNING, logger="ctxmem.export"):
        path = resolve_model("models:/untagged/1")
    assert _hashes(path) == _hashes(tiny_export)
    assert "has no recorded sha256" in caplog.text

    client.create_model_version("untagged", source=tiny_export.as_uri(),
                                tags={"ctxmem.export_sha256": json.dumps({"../outside": "0" * 64})})
    with pytest.raises(RegistryError, match=r"ctxmem.export_sha256 names '\.\./outside', a path that climbs out"):
        resolve_model("models:/untagged/2")
    client.create_model_version("untagged", source=tiny_export.as_uri(),
                                tags={"ctxmem.export_sha256": json.dumps({MODEL_FILE: "abc"})})
    with pytest.raises(RegistryError, match=r"gives 'model.onnx' the sha256 'abc', not 64 hex digits"):
        resolve_model("models:/untagged/3")


def test_every_file_the_record_names_is_checked_not_only_the_graph(store, cache, tiny_export, tmp_path):
    """The check covers whatever the version's record names: a record over the tokenizer and the
    runtime config refuses a changed tokenizer."""
    from mlflow import MlflowClient

    from ctxmem.export.resolve import resolve_model

    source = copy_export(tiny_export, tmp_path / "source")
    names = (MODEL_FILE, DATA_FILE, "tokenizer.json", RUNTIME_CONFIG)
    record = {n: file_sha256(source / n) for n in names}
    client = MlflowClient(store, store)
    client.create_registered_model("wide")
    client.create_model_version("wide", source=source.as_uri(), tags={"ctxmem.export_sha256": json.dumps(record)})
    assert {n: file_sha256(resolve_model("models:/wide/1") / n) for n in names} == record

    tokenizer = source / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")  # still valid JSON, other bytes
    client.create_model_version("wide", source=source.as_uri(), tags={"ctxmem.export_sha256": json.dumps(record)})
    with pytest.raises(ArtifactIntegrityError, match="tokenizer.json does not match the sha256 recorded for wide "
                                                     "version 2") as err:
        resolve_model("models:/wide/2")
    assert err.value.file == "tokenizer.json" and err.value.actual == file_sha256(tokenizer)


# ---- one atomic download per version ------------------------------------------------------------------
RESOLVER = """
import json, logging, sys

from ctxmem.export.resolve import resolve_model
from ctxmem.export.runtime import file_sha256

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
path = resolve_model(sys.argv[1])
print(json.dumps({"path": str(path), "sha256": {n: file_sha256(path / n) for n in ("model.onnx", "model.onnx.data", "tokenizer.json",
                                                "runtime_config.json")}}))
"""
WAITING = "waiting for another process or thread downloading it"


def _entry_lock(cache: Path, store: str, name: str, run_id: str):
    """The lock of a version's cache entry (the layout in export/model_cache.py's docstring). A test
    that holds it while the resolvers start makes them all wait at it: when it is released they
    contend for the same download at once, by construction rather than by timing."""
    import hashlib

    from filelock import FileLock

    parent = cache / hashlib.sha1(store.encode()).hexdigest()[:10] / name
    parent.mkdir(parents=True, exist_ok=True)
    return FileLock(parent / f".v1-{run_id[:12]}.lock")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow  # two more Python processes, each importing MLflow and ONNX Runtime (~20 s on a busy machine)
def test_two_processes_resolving_the_same_version_at_once_get_one_intact_download(store, cache, tiny_export,
                                                                                   tmp_path):
    from mlflow import MlflowClient

    run_id = _register(tiny_export, "raced")["run_id"]
    recorded = _recorded(store, "raced", "1")
    MlflowClient(store, store).set_registered_model_alias("raced", "champion", "1")
    script = tmp_path / "resolver.py"
    script.write_text(RESOLVER)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "CTXMEM_MODEL_CACHE": str(cache)}
    lock = _entry_lock(cache, store, "raced", run_id)
    errors: list[list[str]] = [[], []]
    with lock:
        procs = [subprocess.Popen([sys.executable, str(script), uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=tmp_path)
                 for uri in ("models:/raced/1", "models:/raced@champion")]  # one version, two ways to name it
        readers = [threading.Thread(target=lambda p=p, lines=lines: lines.extend(p.stderr), daemon=True)
                   for p, lines in zip(procs, errors)]
        for reader in readers:
            reader.start()
        _wait_for(lambda: all(any(WAITING in line for line in lines) or p.poll() is not None
                              for p, lines in zip(procs, errors)), "both resolvers to reach the lock")
        assert all(p.poll() is None for p in procs), errors
    outs = [p.stdout.read() for p in procs]
    for p, reader in zip(procs, readers):
        p.wait(timeout=300)
        reader.join(timeout=60)
    assert [p.returncode for p in procs] == [0, 0], errors
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert results[0]["path"] == results[1]["path"]
    assert results[0]["sha256"] == results[1]["sha256"] == recorded
    downloads = sum("downloading models:/raced" in line for lines in errors for line in lines)
    assert downloads == 1, errors
    path = Path(results[0]["path"])
    assert _hashes(path) == recorded and _leftovers(cache) == []
    entry = next(p for p in path.parents if p.name.startswith("v1-"))
    assert json.loads((entry / ".complete").read_text())["sha256"] == recorded


def test_threads_resolving_the_same_version_at_once_share_one_download(store, cache, tiny_export, caplog):
    from ctxmem.export.resolve import resolve_model

    run_id = _register(tiny_export, "threaded")["run_id"]
    recorded = _recorded(store, "threaded", "1")
    lock = _entry_lock(cache, store, "threaded", run_id)
    with caplog.at_level(logging.INFO, logger="ctxmem.export"), ThreadPoolExecutor(4) as pool:
        with lock:
            futures = [pool.submit(resolve_model, "models:/threaded/1") for _ in range(4)]
            _wait_for(lambda: sum(WAITING in r.getMessage() for r in caplog.records) == 4 or
                      any(f.done() for f in futures), "four threads to reach the lock")
            assert not any(f.done() for f in futures), [f.exception() for f in futures if f.done()]
        paths = [f.result() for f in futures]
    assert len(set(paths)) == 1 and _hashes(paths[0]) == recorded
    assert sum("downloading models:/threaded/1" in r.getMessage() for r in caplog.records) == 1
    assert _leftovers(cache) == []


# ---- runtime_config.json paths stay in the export folder -----------------------------------------------
def _config_on_disk(export_dir: Path, **files: str) -> None:
    from ctxmem.config import preset
    from ctxmem.export.contract import ExportContract
    from ctxmem.memory import MemoryConfig

    cfg = preset("tiny", vocab_size=263)
    config = RuntimeConfig(model=cfg.to_dict(), contract=ExportContract.for_model(cfg).to_dict(),
                           memory=MemoryConfig("sink", window=60, sinks=4).to_dict(), opset=18)
    data = config.to_dict()
    data["files"].update(files)
    export_dir.mkdir(parents=True, exist_ok=True)
    (export_dir / RUNTIME_CONFIG).write_text(json.dumps(data))


@pytest.mark.parametrize("value,says", [
    ("/etc/passwd", "an absolute path"),
    ("../model.onnx", "climbs out of the export folder"),
    ("graph/../../model.onnx", "climbs out of the export folder"),
    ("C:\\models\\model.onnx", "an absolute path"),
    ("..\\model.onnx", "climbs out of the export folder"),
    ("", "an empty path"),
])
def test_a_file_path_leaving_the_export_folder_is_refused_naming_the_key(tmp_path, value, says):
    _config_on_disk(tmp_path, model=value)
    with pytest.raises(UnsafeFilePathError, match=rf"key 'files\.model' is .*{says}.*re-run `ctxmem export") as err:
        RuntimeConfig.load(tmp_path)
    assert err.value.key == "files.model" and isinstance(err.value, RuntimeConfigError)


def test_a_symlink_out_of_the_export_folder_is_refused_and_one_inside_it_is_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("{}")
    export = tmp_path / "export"
    _config_on_disk(export)
    (export / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    with pytest.raises(UnsafeFilePathError, match=r"files\.tokenizer is 'tokenizer.json', which leads out") as err:
        RuntimeConfig.load(export)
    assert err.value.key == "files.tokenizer"

    (export / "tokenizer.json").unlink()
    (export / "weights").symlink_to(outside, target_is_directory=True)  # a linked folder on the way
    _config_on_disk(export, external_data="weights/model.onnx.data")
    with pytest.raises(UnsafeFilePathError, match=r"files\.external_data is 'weights/model.onnx.data'"):
        RuntimeConfig.load(export)

    (export / "weights").unlink()
    (export / "real").mkdir()
    (export / "real" / "tokenizer.json").write_text("{}")
    (export / "tokenizer.json").symlink_to(export / "real" / "tokenizer.json")  # stays inside: fine
    _config_on_disk(export)
    config = RuntimeConfig.load(export)
    assert config.file_path(export, "tokenizer") == export / "tokenizer.json"


def test_an_in_memory_config_with_an_escaping_path_is_refused_too(tiny_export):
    data = RuntimeConfig.load(tiny_export).to_dict()
    data["files"]["tokenizer"] = "/etc/hosts"
    with pytest.raises(UnsafeFilePathError, match=r"key 'files\.tokenizer' is '/etc/hosts', an absolute path"):
        RuntimeConfig.from_dict(data)
