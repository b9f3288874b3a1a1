"""The memory evaluation on a registered model version and the champion gate that reads it, on a real
MLflow store (SQLite in tmp): a recorded evaluation round-trips (tag, run metrics, artifacts); the
gate passes a good challenger and refuses one whose sink perplexity far past the window is over
1.10x recompute(chunk=1)'s, one worse than the champion's on the same text, one measured on another
text (naming both hashes), and a version with no evaluation (unless --no-memory-gate, recorded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers_export import new_sqlite_store

from ctxmem.cli import main
from ctxmem.export.errors import PromotionRefusedError, RegistryError
from ctxmem.memory_eval import BEYOND_WINDOWS, STREAM_WINDOWS, MemoryEvalResult

WINDOW = 16
TEXT_A, TEXT_B = "a" * 64, "b" * 64  # stand-ins for two texts' sha256


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store_template) -> str:
    root = tmp_path_factory.mktemp("memory_gate_store")
    uri = new_sqlite_store(mlflow_store_template, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("CTXMEM_MODEL_CACHE", str(root / "cache"))
        mp.chdir(root)
        yield uri


def memory_result(sha: str, sink: float, recompute: float, window_only: float | None = None) -> MemoryEvalResult:
    """What `ctxmem eval memory` writes, built by hand: per policy one bucket and the beyond-10x record."""
    length = STREAM_WINDOWS * WINDOW
    runs = [("full", 0, 128, None, recompute), ("sink", 4, WINDOW, None, sink),
            ("sink", 0, WINDOW, None, window_only or sink), ("recompute", 0, WINDOW, 1, recompute)]
    streaming = []
    for policy, sinks, window, chunk, ppl in runs:
        streaming.append({"policy": policy, "sinks": sinks, "window": window, "chunk": chunk, "start": 1,
                          "end": WINDOW, "ppl": ppl})
        streaming.append({"policy": policy, "sinks": sinks, "window": window, "chunk": chunk,
                          "start": BEYOND_WINDOWS * WINDOW, "end": length, "ppl": ppl})
    recall = [{"policy": "sink", "sinks": 4, "window": WINDOW, "distance": 8, "accuracy": 0.5, "n": 4}]
    return MemoryEvalResult(sha, streaming, recall)


def new_version(store: str, name: str) -> str:
    """A version as `registry register` leaves it for the gate: verified, with a validation perplexity."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(store, store)
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    mv = client.create_model_version(name, source="file:///nowhere",
                                     tags={"ctxmem.verification": "passed", "ctxmem.val_ppl": "10.0"})
    return str(mv.version)


def record(tmp_path: Path, name: str, version: str, result: MemoryEvalResult) -> dict:
    from ctxmem.export.registry_memory import record_memory_eval

    folder = tmp_path / f"{name}-v{version}"
    result.save(folder, plots=False)
    return record_memory_eval(name, version, result_file=folder / "memory_eval.json")[1]


def aliases(store: str, name: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return {a: str(v) for a, v in MlflowClient(store, store).get_registered_model(name).aliases.items()}


def test_a_recorded_result_round_trips_through_the_version_and_its_run(store, tmp_path):
    from mlflow import MlflowClient

    version = new_version(store, "roundtrip")
    result = memory_result(TEXT_A, sink=10.5, recompute=10.0, window_only=30.0)
    summary = record(tmp_path, "roundtrip", version, result)
    client = MlflowClient(store, store)
    mv = client.get_model_version("roundtrip", version)
    tag = json.loads(mv.tags["ctxmem.memory_eval"])
    assert tag == {k: v for k, v in summary.items() if k != "version"}
    assert (tag["text_sha256"], tag["window"], tag["length"], tag["sinks"]) == (TEXT_A, WINDOW, 20 * WINDOW, 4)
    assert (tag["sink_ppl"], tag["recompute_ppl"], tag["beyond"]) == (10.5, 10.0, [160, 320])
    assert tag["ppl_beyond_10x"] == {"full": 10.0, "sink4": 10.5, "window_only": 30.0, "recompute_chunk1": 10.0}
    assert mv.tags["ctxmem.memory_eval.text_sha256"] == TEXT_A
    # the version had no run here: one was made for it, holding the metrics and the result file
    run = client.get_run(tag["run_id"])
    assert run.data.metrics == pytest.approx(result.metrics())
    local = client.download_artifacts(tag["run_id"], "memory_eval/memory_eval.json", str(tmp_path / "back"))
    assert MemoryEvalResult.from_json(Path(local).read_text()) == result

    # training's end-of-run evaluation, taken from its run (logged there as memory_eval/)
    from ctxmem.export.registry_memory import record_memory_eval

    training = client.create_run(client.create_experiment("memory-train")).info.run_id
    trained = memory_result(TEXT_B, sink=7.0, recompute=6.9)
    client.log_artifacts(training, str(trained.save(tmp_path / "train_out")["json"].parent), "memory_eval")
    second = new_version(store, "roundtrip")
    _, summary = record_memory_eval("roundtrip", second, result_file=f"runs:/{training}/memory_eval")
    assert summary["source"].startswith(f"runs:/{training}/memory_eval") and summary["sink_ppl"] == 7.0
    assert json.loads(client.get_model_version("roundtrip", second).tags["ctxmem.memory_eval"])["text_sha256"] == TEXT_B
    from ctxmem.export.errors import EvalError

    with pytest.raises(EvalError, match=r"cannot download runs:/[0-9a-f]+/nothing"):
        record_memory_eval("roundtrip", second, result_file=f"runs:/{training}/nothing")


def test_the_gate_passes_good_challengers_and_refuses_one_over_1_10x_recompute(store, tmp_path):
    from ctxmem.export.registry import promote

    v1 = new_version(store, "ratio")
    record(tmp_path, "ratio", v1, memory_result(TEXT_A, sink=10.5, recompute=10.0))
    first = promote("ratio", "champion", version=v1)  # no champion yet: only the ratio is checked
    assert first["memory_gate"] == "passed" and first["memory_eval"]["sink_ppl"] == 10.5

    v2 = new_version(store, "ratio")
    record(tmp_path, "ratio", v2, memory_result(TEXT_A, sink=11.5, recompute=10.0))  # better than v1, but 1.15x
    with pytest.raises(PromotionRefusedError, match=r"1\.150x recompute\(chunk=1\)'s 10\.0000 .*limit 1\.10x") as err:
        promote("ratio", "champion", version=v2)
    assert "stays on version 1" in str(err.value)
    assert aliases(store, "ratio") == {"champion": v1}

    v3 = new_version(store, "ratio")
    record(tmp_path, "ratio", v3, memory_result(TEXT_A, sink=9.0, recompute=8.5))  # 1.06x and below v1's 10.5
    decision = promote("ratio", "champion", version=v3)
    assert decision["gate"] == "passed" and decision["previous_version"] == v1
    assert aliases(store, "ratio") == {"champion": v3}


def test_the_gate_refuses_a_challenger_worse_than_the_champion_on_the_same_text(store, tmp_path, capsys):
    from ctxmem.export.registry import promote

    champion, worse = new_version(store, "vs"), new_version(store, "vs")
    record(tmp_path, "vs", champion, memory_result(TEXT_A, sink=9.0, recompute=8.8))
    promote("vs", "champion", version=champion)
    record(tmp_path, "vs", worse, memory_result(TEXT_A, sink=9.3, recompute=9.2))  # 1.01x its own recompute
    promote("vs", "challenger", version=worse)  # only the champion alias is gated on memory
    assert main(["registry", "promote", "--name", "vs", "--from-alias", "challenger"]) == 1
    err = capsys.readouterr().err
    assert "sink perplexity beyond 10x the window 9.3000 is worse than the champion's 9.0000 (version 1)" in err
    assert "1.10x" not in err  # the ratio passed: only the comparison with the champion failed
    assert aliases(store, "vs") == {"champion": champion, "challenger": worse}
    assert main(["registry", "list", "--name", "vs"]) == 0
    table = capsys.readouterr().out.splitlines()
    column = table[0].split().index("sink/recompute")
    assert [row.split()[column:column + 2] for row in table[1:]] == [["1.023", TEXT_A[:12]], ["1.011", TEXT_A[:12]]]


def test_the_gate_refuses_numbers_measured_on_different_texts_naming_both_hashes(store, tmp_path):
    from ctxmem.export.registry import promote

    champion, other = new_version(store, "texts"), new_version(store, "texts")
    record(tmp_path, "texts", champion, memory_result(TEXT_A, sink=9.0, recompute=8.8))
    promote("texts", "champion", version=champion)
    record(tmp_path, "texts", other, memory_result(TEXT_B, sink=5.0, recompute=5.0))  # better, on another text
    with pytest.raises(PromotionRefusedError) as err:
        promote("texts", "champion", version=other)
    message = str(err.value)
    assert "measured on different texts" in message and TEXT_A in message and TEXT_B in message
    assert f"ctxmem registry evaluate-memory --name texts --version {other}" in message
    assert aliases(store, "texts") == {"champion": champion}


def test_a_version_without_a_memory_evaluation_is_refused_unless_the_gate_is_skipped(store, tmp_path):
    from mlflow import MlflowClient

    from ctxmem.export.registry import promote

    version = new_version(store, "bare-memory")
    with pytest.raises(PromotionRefusedError, match=r"version 1 has no memory evaluation recorded; record one with "
                                                    r"`ctxmem registry evaluate-memory --name bare-memory --version 1"):
        promote("bare-memory", "champion", version=version)
    assert promote("bare-memory", "challenger", version=version)["gate"] == "passed"  # not gated on memory
    decision = promote("bare-memory", "champion", version=version, memory_gate=False)
    assert decision["memory_gate"] == "skipped (--no-memory-gate)" and not decision["forced"]
    stored = json.loads(MlflowClient(store, store).get_model_version("bare-memory", version)
                        .tags["ctxmem.promotion.champion"])
    assert stored["memory_gate"] == "skipped (--no-memory-gate)"

    # a challenger measured while the champion never was: refused, saying what to run on the champion
    challenger = new_version(store, "bare-memory")
    record(tmp_path, "bare-memory", challenger, memory_result(TEXT_A, sink=9.0, recompute=8.8))
    with pytest.raises(PromotionRefusedError, match=r"the champion \(version 1\) has no memory evaluation.*"
                                                    r"evaluate-memory --name bare-memory --version 1"):
        promote("bare-memory", "champion", version=challenger)


def test_record_errors_name_the_problem(store, tmp_path):
    from ctxmem.export.errors import EvalError
    from ctxmem.export.registry_memory import record_memory_eval

    version = new_version(store, "errors")
    with pytest.raises(RegistryError, match="exactly one of --text FILE, --data DIR"):
        record_memory_eval("errors", version)
    with pytest.raises(EvalError, match="missing.txt does not exist; --text takes a UTF-8 text file"):
        record_memory_eval("errors", version, text=tmp_path / "missing.txt")
    with pytest.raises(EvalError, match="does not exist; --result takes a memory_eval.json"):
        record_memory_eval("errors", version, result_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"streaming": []}')
    with pytest.raises(EvalError, match=r"not a memory evaluation result .*missing \['recall', 'text_sha256'\]"):
        record_memory_eval("errors", version, result_file=tmp_path / "bad.json")
    with pytest.raises(RegistryError, match=r"--length, --window set how to measure, but --result records"):
        record_memory_eval("errors", version, result_file=tmp_path / "bad.json", window=32, length=640, sinks=None)
    with pytest.raises(RegistryError, match=r"no version 7; versions: \[1\]"):
        record_memory_eval("errors", "7", result_file=tmp_path / "bad.json")


def test_evaluate_memory_measures_a_registered_export_and_records_it(store, tiny_export, tmp_path, capsys):
    """The real thing: `ctxmem eval memory` on the version's export (ONNX Runtime), through the CLI."""
    from helpers_export import synthetic_text
    from mlflow import MlflowClient

    from ctxmem.export.registry import register_export

    text = tmp_path / "notes.txt"
    text.write_text(synthetic_text(60, seed=3))
    registered = register_export(tiny_export, "measured")
    assert main(["registry", "evaluate-memory", "--name", "measured", "--version", registered["version"],
                 "--text", str(text), "--window", "16", "--sinks", "2", "--distances", "48", "--trials", "2",
                 "--reference-tokens", "8", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "streaming perplexity" in printed and "recorded on measured version 1: sink ppl beyond 10x" in printed
    saved = MemoryEvalResult.from_json((tmp_path / "out" / "memory_eval.json").read_text())
    client = MlflowClient(store, store)
    tag = json.loads(client.get_model_version("measured", "1").tags["ctxmem.memory_eval"])
    assert tag["run_id"] == registered["run_id"]  # the run that registered the version
    assert tag["sink_ppl"] == saved.beyond("sink", 2)["ppl"] and tag["sinks"] == 2
    assert tag["recompute_ppl"] == saved.beyond("recompute", 0, 1)["ppl"]
    assert tag["source"].startswith(str(text))
    import hashlib

    assert tag["text_sha256"] == saved.text_sha256 == hashlib.sha256(text.read_bytes()).hexdigest()
    run = client.get_run(registered["run_id"])
    assert run.data.metrics["memory.ppl_beyond_10x.sink2"] == pytest.approx(tag["sink_ppl"])
    logged = {a.path for a in client.list_artifacts(registered["run_id"], "memory_eval")}
    assert logged == {"memory_eval/memory_eval.json", "memory_eval/memory_eval_streaming.png",
                      "memory_eval/memory_eval_recall.png"}
