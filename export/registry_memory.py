"""The memory evaluation of a registered model version, and the part of the promotion gate that reads it.

Recording (`ctxmem registry evaluate-memory`): `ctxmem eval memory` run on the version's export
(models:/NAME/VERSION), or an existing memory_eval.json (training's end-of-run evaluation of the
checkpoint the export came from). The full result goes to the version's run - the run that
registered it - as metrics (MemoryEvalResult.metrics()) and artifacts under `memory_eval/`
(memory_eval.json and the two PNGs); what the gate needs goes to the version itself as the tag
`ctxmem.memory_eval` (a compact JSON summary, so promotion reads no artifacts). Run params are not
used: MLflow params cannot change, and a version may be re-measured (e.g. on its champion's text).

The gate (for the gated alias, champion), every comparison made by `mlflow.validate_evaluation_results`
with a `MetricThreshold`:
* the candidate's `sink` perplexity on the tokens beyond 10x the window must be <= SINK_RATIO_LIMIT
  (1.10) x its recompute(chunk=1) perplexity on the same tokens (the StreamingLLM reference);
* and <= the current champion's, measured on the same text (same text_sha256), window and stream
  length - numbers measured on different tokens are refused, naming both hashes and how to fix it.
A version with no memory evaluation is refused, saying how to record one; `--no-memory-gate`
skips this part of the gate (with a warning, recorded in the promotion decision).
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from .errors import EvalError, RegistryError

log = logging.getLogger(__name__)

TAG = "ctxmem.memory_eval"  # version tag: the compact summary the gate reads
ARTIFACT_DIR = "memory_eval"  # in the version's run: memory_eval.json + PNGs
EXPERIMENT = "ctxmem-models"  # for a version registered without a run (around ctxmem)
SINK_RATIO_LIMIT = 1.10  # sink perplexity beyond 10x the window / recompute(chunk=1)'s on the same tokens
RATIO_METRIC = "sink_over_recompute_ppl_beyond_10x"
SINK_METRIC = "sink_ppl_beyond_10x"


# ---- what the version carries -------------------------------------------------------------------------
def summarize(result, source: str) -> dict[str, Any]:
    """The tag value: identity of the measured tokens and the beyond-10x perplexities per run.
    `sink` is the sink run with the most sinks (S sinks; window-only when the eval ran with 0)."""
    sink_runs = [r for r in result.streaming if r["policy"] == "sink" and result.is_beyond(r)]
    sink = max(sink_runs, key=lambda r: r["sinks"], default=None)
    reference = result.beyond("recompute", 0, 1)
    beyond = next((r for r in result.streaming if result.is_beyond(r)), None)
    return {
        "text_sha256": result.text_sha256, "source": source, "window": result.window, "length": result.length,
        "beyond": [beyond["start"], beyond["end"]] if beyond else None,
        "sinks": sink["sinks"] if sink else None,
        "sink_ppl": sink["ppl"] if sink else None,
        "recompute_ppl": reference["ppl"] if reference else None,
        "ppl_beyond_10x": {k.rsplit(".", 1)[1]: round(v, 6) for k, v in result.metrics().items()
                           if k.startswith("memory.ppl_beyond_10x.")},
    }


def recorded(mv) -> dict[str, Any] | None:
    """The memory evaluation summary a model version carries, or None."""
    value = (mv.tags or {}).get(TAG)
    if not value:
        return None
    try:
        summary = json.loads(value)
    except json.JSONDecodeError:
        raise RegistryError(f"version {mv.version} of {mv.name!r} has an unreadable {TAG} tag; re-record it with "
                            f"`ctxmem registry evaluate-memory --name {mv.name} --version {mv.version} "
                            "--text FILE`") from None
    return summary if isinstance(summary, dict) else None


# ---- record -----------------------------------------------------------------------------------------
def record_memory_eval(name: str, version: str | int | None = None, *, from_alias: str | None = None,
                       text: str | Path | None = None, data: str | Path | None = None,
                       result_file: str | Path | None = None, tracking_uri: str | None = None,
                       provider: str | None = None, out: str | Path | None = None,
                       **eval_options: Any) -> tuple[Any, dict[str, Any]]:
    """Measure (or read) the memory evaluation of `name` version `version` and record it on that
    version (see the module docstring). Exactly one of text, data, result_file. eval_options go to
    ctxmem.memory_eval.evaluate_memory (window, sinks, length, distances, trials, seed,
    reference_tokens). Returns (MemoryEvalResult, the recorded summary with run_id)."""
    from ctxmem.memory_eval import MemoryEvalResult
    from ctxmem.paths import default_tracking_uri

    from .store import alias_version, mlflow_client, model_version

    if sum(x is not None for x in (text, data, result_file)) != 1:
        raise RegistryError("give exactly one of --text FILE, --data DIR (measure the version's export on it) or "
                            "--result memory_eval.json (an evaluation already made, e.g. by training)")
    if (version is None) == (from_alias is None):
        raise RegistryError("give exactly one of --version V or --from-alias ALIAS")
    given = sorted(f"--{k.replace('_', '-')}" for k, v in eval_options.items() if v is not None)
    if result_file is not None and given:
        raise RegistryError(f"{', '.join(given)} set how to measure, but --result records an evaluation already "
                            "made, as it is; drop them, or measure with --text FILE / --data DIR instead")
    measure_on = text if text is not None else data
    if measure_on is not None and not Path(measure_on).exists():  # before the version's export is downloaded
        raise EvalError(f"{measure_on} does not exist; --text takes a UTF-8 text file, --data a `ctxmem data prepare` "
                        "folder")
    uri = default_tracking_uri(tracking_uri)
    with mlflow_client(uri) as client:
        if from_alias is not None:
            version = alias_version(client, name, from_alias)
        mv = model_version(client, name, str(version))
    with tempfile.TemporaryDirectory(prefix="ctxmem-memory-eval-") as tmp:
        if result_file is not None:
            local = _fetch_result(str(result_file), uri, Path(tmp) / "fetched")
            result, source, plots = _read_result(local, MemoryEvalResult)
            if str(result_file).startswith("runs:/"):
                source = f"{result_file} (text sha256 {result.text_sha256[:12]})"
        else:
            result, source = _measure(f"models:/{name}/{mv.version}", text or data, uri, provider, eval_options)
            plots = None
        # PNGs are drawn unless the result file came with both (then those are logged, not redrawn)
        paths = result.save(out or Path(tmp) / "saved", plots=out is not None or len(plots or {}) < 2)
        if plots:  # the PNGs made with the result file, when they are beside it, rather than new ones
            paths.update(plots)
        summary = summarize(result, source)
        with mlflow_client(uri) as client:
            summary["run_id"] = _log_to_run(client, mv, result, paths)
            summary["at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            client.set_model_version_tag(name, str(mv.version), TAG, json.dumps(summary))
            client.set_model_version_tag(name, str(mv.version), f"{TAG}.text_sha256", result.text_sha256)
    log.info("recorded the memory evaluation of %s version %s (%s) in run %s", name, mv.version, source,
             summary["run_id"])
    summary["version"] = str(mv.version)
    return result, summary


def _fetch_result(spec: str, uri: str, target: Path) -> Path:
    """A local path for --result: as given, or downloaded from runs:/<run_id>/<path> (training logs its
    end-of-run evaluation as the run's memory_eval/ folder)."""
    if not spec.startswith("runs:/"):
        return Path(spec)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    from .store import first_line

    run_id, _, sub = spec[len("runs:/"):].partition("/")
    if not run_id or not sub.strip("/"):
        raise EvalError(f"{spec}: expected runs:/<run_id>/<path of memory_eval.json or its folder>, e.g. "
                        "runs:/RUN_ID/memory_eval (where training logs its end-of-run memory evaluation)")
    target.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=str(target), tracking_uri=uri)
    except (MlflowException, OSError) as err:
        raise EvalError(f"cannot download {spec} from {uri} ({first_line(err)}); check the run id and the path "
                        "(`memory_eval` in a run with eval.memory on)") from None
    return Path(local)


def _read_result(path: Path, result_cls):
    from ctxmem.memory_eval import RECALL_PNG, RESULT_FILE, STREAMING_PNG, MemoryEvalError

    path = path / RESULT_FILE if path.is_dir() else path
    try:
        result = result_cls.from_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(f"{path} does not exist; --result takes a {RESULT_FILE} written by `ctxmem eval memory "
                        "--out DIR` (or by training's end-of-run evaluation)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, MemoryEvalError) as err:
        raise EvalError(f"{path} is not a memory evaluation result ({err}); write one with `ctxmem eval memory "
                        "--out DIR`") from None
    plots = {key: path.parent / file for key, file in (("streaming_png", STREAMING_PNG), ("recall_png", RECALL_PNG))
             if (path.parent / file).is_file()}
    return result, f"result file {path.name} (text sha256 {result.text_sha256[:12]})", plots


def _measure(spec: str, source: str | Path, uri: str, provider: str | None, options: dict[str, Any]):
    from ctxmem.memory_eval import evaluate_memory

    from .eval_memory_cli import load_eval_tokens
    from .evaluate import open_backend

    backend, tokenizer, _ = open_backend(spec, provider, uri)
    tokens, sha, described = load_eval_tokens(str(source), tokenizer)
    options = {k: v for k, v in options.items() if v is not None}
    return evaluate_memory(backend, tokens, tokenizer, text_hash=sha, **options), described


def _log_to_run(client, mv, result, paths: dict[str, Path]) -> str:
    """Metrics and artifacts into the version's run (a new run when the version has none here)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from ctxmem.paths import default_artifact_location

    from .store import is_missing

    run_id = mv.run_id
    if run_id:
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if not is_missing(err):
                raise
            run_id = None
    if not run_id:
        found = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = found.experiment_id if found else client.create_experiment(
            EXPERIMENT, artifact_location=default_artifact_location(client.tracking_uri))
        run = client.create_run(experiment_id, tags={"ctxmem.kind": "memory-eval",
                                                     "mlflow.runName": f"memory-eval-{mv.name}-v{mv.version}"})
        run_id = run.info.run_id
        client.set_terminated(run_id, "FINISHED")
    now = int(_dt.datetime.now().timestamp() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics().items()])
    client.set_tag(run_id, f"{TAG}.text_sha256", result.text_sha256)
    for path in paths.values():
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    return run_id


# ---- gate -------------------------------------------------------------------------------------------
def memory_gate(name: str, candidate, champion=None) -> list[str]:
    """Why `candidate` (a ModelVersion) may not become champion on memory grounds; [] when it may.
    champion: the current champion's ModelVersion (None when there is none, or it is the candidate)."""
    fix = f"`ctxmem registry evaluate-memory --name {name} --version {{v}} --text FILE`"
    cand = recorded(candidate)
    if cand is None:
        return [f"version {candidate.version} has no memory evaluation recorded; record one with "
                f"{fix.format(v=candidate.version)} (or --result memory_eval.json from training), or promote with "
                "--no-memory-gate to skip this check (recorded)"]
    if cand.get("sink_ppl") is None or cand.get("recompute_ppl") is None:
        missing = "sink" if cand.get("sink_ppl") is None else "recompute(chunk=1)"
        return [f"the memory evaluation of version {candidate.version} has no {missing} perplexity beyond 10x the "
                f"window (window {cand.get('window')}, stream of {cand.get('length')} tokens; it needs more than "
                "11x the window, and a model with rotary positions for sink); re-record it with "
                f"{fix.format(v=candidate.version)} and a longer --length, or promote with --no-memory-gate"]
    failures = []
    ratio = cand["sink_ppl"] / cand["recompute_ppl"]
    if not _passes(RATIO_METRIC, ratio, _threshold(threshold=SINK_RATIO_LIMIT)):
        failures.append(f"sink ({cand['sinks']} sinks) perplexity beyond 10x the window {cand['sink_ppl']:.4f} is "
                        f"{ratio:.3f}x recompute(chunk=1)'s {cand['recompute_ppl']:.4f} on the same tokens "
                        f"(limit {SINK_RATIO_LIMIT:.2f}x)")
    if champion is None:
        return failures
    champ = recorded(champion)
    if champ is None:
        return failures + [f"the champion (version {champion.version}) has no memory evaluation to compare with; "
                           f"record one on the same text: {_same_text_fix(name, champion.version, cand)}"]
    if champ.get("text_sha256") != cand.get("text_sha256"):
        return failures + [
            f"the memory evaluations were measured on different texts (version {candidate.version}: text_sha256 "
            f"{cand.get('text_sha256')} from {cand.get('source')}; champion version {champion.version}: "
            f"text_sha256 {champ.get('text_sha256')} from {champ.get('source')}) and are not comparable; measure "
            f"both on one text: {_same_text_fix(name, candidate.version, champ)}"]
    if (champ.get("window"), champ.get("length")) != (cand.get("window"), cand.get("length")):
        return failures + [
            f"the memory evaluations measured different tokens (version {candidate.version}: window "
            f"{cand.get('window')}, length {cand.get('length')}; champion version {champion.version}: window "
            f"{champ.get('window')}, length {champ.get('length')}); re-record one with the other's --window and "
            "--length"]
    if champ.get("sink_ppl") is None:
        return failures + [f"the champion's (version {champion.version}) memory evaluation has no sink perplexity "
                           f"beyond 10x the window; re-record it: {_same_text_fix(name, champion.version, cand)}"]
    # lower is better; a relative change of at least 0 from the champion: not worse than it
    if not _passes(SINK_METRIC, cand["sink_ppl"], _threshold(min_relative_change=0.0), champ["sink_ppl"]):
        failures.append(f"sink perplexity beyond 10x the window {cand['sink_ppl']:.4f} is worse than the champion's "
                        f"{champ['sink_ppl']:.4f} (version {champion.version}) on the same text "
                        f"(sha256 {cand['text_sha256'][:12]})")
    return failures


def _same_text_fix(name: str, version, measured: dict[str, Any]) -> str:
    source = str(measured.get("source") or "")
    path = source.split(" (", 1)[0] if source and not source.startswith("result file") else "FILE"
    flag = "--data" if Path(path).is_dir() else "--text"
    extra = f" --window {measured['window']}" if measured.get("window") else ""
    extra += f" --length {measured['length']}" if measured.get("length") else ""
    return (f"`ctxmem registry evaluate-memory --name {name} --version {version} {flag} {path}{extra}` "
            f"(the text with sha256 {measured.get('text_sha256')})")


def _threshold(**kwargs):
    from mlflow.models import MetricThreshold

    return MetricThreshold(greater_is_better=False, **kwargs)


def _passes(metric: str, value: float, threshold, baseline: float | None = None) -> bool:
    """One metric through mlflow.validate_evaluation_results (lower is better)."""
    import mlflow
    from mlflow.models.evaluation import EvaluationResult
    from mlflow.models.evaluation.validation import ModelValidationFailedException

    candidate = EvaluationResult(metrics={metric: value}, artifacts={})
    reference = EvaluationResult(metrics={metric: baseline}, artifacts={}) if baseline is not None else None
    try:
        mlflow.validate_evaluation_results({metric: threshold}, candidate, reference)
    except ModelValidationFailedException as err:
        log.info("memory gate: %s", err.message)
        return False
    return True
