"""MLflow model registry for exports: register, promote through a gate, list. Resolving
`models:/NAME@ALIAS` and friends to a local directory is resolve.py's job.

Aliases, not stages (deprecated in MLflow): `challenger` is where a new version waits, `champion`
is what serving loads. Moving an alias goes through `promote`, whose gate refuses a version whose
verification failed or is missing, or (for champion) whose validation perplexity is worse than the
current champion's beyond a tolerance, or whose memory evaluation fails the memory gate
(registry_memory.py: sink perplexity far past the window against recompute and against the
champion on the same text) - unless forced with a reason, which is recorded on the version and on
the registered model.

Store: --tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite:///<working dir>/mlflow.db with
artifacts in mlruns/ beside it - ctxmem.paths.default_tracking_uri, the default of every stage, so
lineage links up.
"""
from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ctxmem.paths import default_artifact_location, default_tracking_uri

from . import registry_memory
from .errors import PromotionRefusedError, RegistryError, VerificationError
from .resolve import resolve_model
from .runtime import RUNTIME_CONFIG, TOKENIZER_FILE, RuntimeConfig, export_hashes, file_sha256
from .store import EXPORT_SHA256_TAG, alias_version, mlflow_client, model_version, registered_model

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PPL_TOLERANCE = 0.02  # a candidate may be at most 2% worse in validation perplexity than the champion
EXPERIMENT = "ctxmem-models"
TAG_VALUE_LIMIT = 5000  # MLflow's limit on a model version tag value


# ---- register ---------------------------------------------------------------------------------------
def register_export(export_dir: str | Path, name: str, *, tracking_uri: str | None = None,
                    checkpoint: str | Path | None = None, eval_data: str | Path | None = None,
                    allow_unverified: bool = False, description: str | None = None, reverify: bool = False,
                    eval_windows: int = 32) -> dict[str, Any]:
    """Verify the export, then log it (pyfunc that generates, artifacts = the export) and register
    a new version of `name` with tags carrying the verification, metrics and lineage.

    Verification comes first: a passed verification.json that pins these exact files (sha256 of
    the graph and weights) is accepted; otherwise (no report, a failed one, or reverify=True) the
    structured check is re-run against the source checkpoint. Files changed since verification
    raise TamperedExportError. A failed or missing verification raises unless allow_unverified,
    which registers the version tagged as such - the promotion gate will then refuse it."""
    from .verify import STATUS_FAILED, STATUS_MISSING, STATUS_PASSED, check_report, summarize, verify_export

    export_dir = Path(export_dir).resolve()
    config = RuntimeConfig.load(export_dir)
    ckpt = Path(checkpoint) if checkpoint else (Path(config.source["checkpoint"]) if config.source.get("checkpoint")
                                                else None)
    error: Exception | None = None
    try:
        if reverify:
            if ckpt is None or not ckpt.is_dir():
                raise VerificationError(f"cannot re-verify {export_dir}: its source checkpoint {ckpt} is not here; "
                                        "pass --checkpoint DIR")
            stored = {}
        else:  # TamperedExportError when the files changed since they were verified
            stored = check_report(export_dir)
        if stored.get("status") == STATUS_PASSED:
            report = stored
            log.info("%s: verification report passed and pins these exact files (sha256); not re-running it "
                     "(--reverify to re-run against the checkpoint)", export_dir)
        elif ckpt is not None and ckpt.is_dir():
            data = eval_data or (stored.get("accuracy") or {}).get("data")
            report = verify_export(export_dir, ckpt, eval_data=data if data and Path(str(data)).exists() else None)
        else:
            report = stored
    except VerificationError as err:
        error, report = err, dict(err.report or {"status": STATUS_FAILED})
        report["status"] = STATUS_FAILED
        report.setdefault("error", {"type": type(err).__name__, "message": str(err)})
    status = report.get("status", STATUS_MISSING)
    if status != STATUS_PASSED and not allow_unverified:
        if error is not None:
            raise error
        raise VerificationError(f"{export_dir} has verification status {status!r}; verify it (`ctxmem export "
                                "--verify`, or pass --checkpoint) before registering, or pass --allow-unverified "
                                "to register it for inspection (promotion will refuse it)")
    metrics = _metrics(export_dir, config, eval_data, eval_windows)
    uri = default_tracking_uri(tracking_uri)
    with mlflow_client(uri) as client:
        experiment_id, parent = _experiment_for(client, uri, config.source.get("run_id"))
        tags = {"ctxmem.kind": "registration", "ctxmem.export": str(export_dir), "mlflow.runName": f"register-{name}"}
        if parent:
            tags["mlflow.parentRunId"] = parent  # the training run: lineage shows in the MLflow UI
        run = client.create_run(experiment_id, tags=tags)
        run_id = run.info.run_id
        try:
            _log_run(client, run_id, config, report, metrics, export_dir)
            model_uri = f"{run.info.artifact_uri.rstrip('/')}/model"
            mv = _create_version(client, name, model_uri, run_id, _version_tags(config, report, metrics, status,
                                                                               export_dir), description)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    result = {"name": name, "version": str(mv.version), "run_id": run_id, "model_uri": model_uri,
              "verification": status, "summary": summarize(report), "tracking_uri": uri, **metrics}
    log.info("registered %s version %s (%s)", name, mv.version, result["summary"])
    return result


def _log_run(client, run_id: str, config: RuntimeConfig, report, metrics, export_dir: Path) -> None:
    """Params, metrics, the report, and the export as a generating pyfunc under `model/`."""
    import mlflow.pyfunc
    from mlflow.entities import Metric, Param

    from .pyfunc import ARTIFACT_KEY, onnx_signature, signature

    params = {"variant": config.variant, "opset": config.opset, **{f"memory.{k}": v for k, v in config.memory.items()},
              **{f"model.{k}": v for k, v in config.model.items()}}
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    numeric.update(_report_metrics(report))
    now = int(_dt.datetime.now().timestamp() * 1000)
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, now, 0) for k, v in numeric.items()])
    client.log_dict(run_id, report, "verification.json")
    with tempfile.TemporaryDirectory(prefix="ctxmem-pyfunc-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow asks for type hints / an input example
        path = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            str(path), python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # model from code: no pickle
            artifacts={ARTIFACT_KEY: str(export_dir)}, signature=signature(), pip_requirements=_requirements(),
            metadata={"ctxmem": {"variant": config.variant, "opset": config.opset,
                                 "onnx_signature": onnx_signature(config.export_contract)}})
        client.log_artifacts(run_id, str(path), "model")


def _create_version(client, name: str, source: str, run_id: str, tags: dict[str, str], description: str | None):
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)


def _metrics(export_dir: Path, config: RuntimeConfig, eval_data, windows: int) -> dict[str, Any]:
    """Validation metrics of this export: measured now on --eval-data, else the training run's."""
    if eval_data is not None:
        from .evaluate import evaluate

        result = evaluate(export_dir, eval_data, block=min(128, config.model_config.max_seq_len), max_windows=windows)
        return {"val_loss": result.loss, "val_ppl": result.ppl, "metrics_source": f"ctxmem eval on {eval_data}"}
    src = config.source
    if src.get("val_ppl") is not None:
        return {"val_loss": src.get("val_loss"), "val_ppl": src.get("val_ppl"),
                "metrics_source": f"training run {src.get('run_id')}"}
    return {"metrics_source": "none"}


def _report_metrics(report: dict[str, Any]) -> dict[str, float]:
    out = {}
    for stage, data in (report.get("stages") or {}).items():
        if isinstance(data, dict) and "max_abs_diff" in data:
            out[f"verify_{stage}_max_abs_diff"] = float(data["max_abs_diff"])
    greedy = report.get("greedy") or {}
    if greedy.get("tokens_compared"):
        out["verify_greedy_match"] = greedy["tokens_matched"] / greedy["tokens_compared"]
    acc = report.get("accuracy") or {}
    for key in ("loss", "reference_loss", "loss_rel_change", "top1_agreement"):
        if key in acc:
            out[f"variant_{key}"] = float(acc[key])
    return out


def _compact_report(report: dict[str, Any]) -> str:
    keep = {k: report.get(k) for k in ("status", "variant", "checks", "provider", "checked_at", "error")}
    keep["stages"] = {s: {k: v for k, v in d.items() if k in ("calls", "max_abs_diff", "slides", "window_turns")}
                      for s, d in (report.get("stages") or {}).items() if isinstance(d, dict)}
    keep["greedy"] = {k: (report.get("greedy") or {}).get(k) for k in ("tokens", "tokens_matched", "tokens_compared")}
    if report.get("accuracy"):
        keep["accuracy"] = {k: report["accuracy"].get(k) for k in
                            ("reference_loss", "loss", "loss_rel_change", "top1_agreement", "tolerance")}
    text = json.dumps(keep, default=float)
    return text if len(text) <= TAG_VALUE_LIMIT else text[:TAG_VALUE_LIMIT - 40] + ' ... (see verification.json)'


def _version_tags(config: RuntimeConfig, report, metrics, status, export_dir: Path) -> dict[str, str]:
    from .verify import summarize

    src = config.source
    tags = {
        "ctxmem.verification": status, "ctxmem.verification_summary": summarize(report)[:TAG_VALUE_LIMIT],
        "ctxmem.verification_report": _compact_report(report), "ctxmem.variant": config.variant,
        "ctxmem.opset": str(config.opset), "ctxmem.memory": json.dumps(config.memory),
        "ctxmem.metrics_source": str(metrics.get("metrics_source")),
        "ctxmem.source_run_id": str(src.get("run_id") or ""), "ctxmem.source_checkpoint": str(src.get("checkpoint")),
        "ctxmem.source_tracking_uri": str(src.get("tracking_uri") or ""),
        # every file a replica loads, so a download is checked whole (export/model_cache.py)
        EXPORT_SHA256_TAG: json.dumps({**export_hashes(export_dir), **{
            name: file_sha256(export_dir / name) for name in (TOKENIZER_FILE, RUNTIME_CONFIG)
            if (export_dir / name).exists()}}),
    }
    for key in ("val_loss", "val_ppl"):
        if metrics.get(key) is not None:
            tags[f"ctxmem.{key}"] = repr(float(metrics[key]))
    return tags


def _experiment_for(client, uri: str, source_run_id: str | None) -> tuple[str, str | None]:
    """The training run's experiment (and that run as parent) when it is in this store, else ctxmem-models."""
    from mlflow.exceptions import MlflowException

    if source_run_id:
        try:
            run = client.get_run(source_run_id)
            return run.info.experiment_id, source_run_id
        except MlflowException:
            log.info("source run %s is not in %s; registering under experiment %s", source_run_id, uri, EXPERIMENT)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id, None
    return client.create_experiment(EXPERIMENT, artifact_location=default_artifact_location(uri)), None


def _requirements() -> list[str]:
    """Pinned to what is installed; ctxmem itself comes from this repository (pip install -e .)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = ["ctxmem"]
    for dist in ("onnxruntime", "onnxruntime-gpu", "numpy", "tokenizers", "mlflow"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return reqs


# ---- promote ----------------------------------------------------------------------------------------
def promote(name: str, alias: str, *, version: str | int | None = None, from_alias: str | None = None,
            force: bool = False, reason: str | None = None, tolerance: float = PPL_TOLERANCE,
            tracking_uri: str | None = None, gate_alias: str = CHAMPION, memory_gate: bool = True) -> dict[str, Any]:
    """Point `name@alias` at a version, through the gate (see the module docstring).
    memory_gate=False skips the memory evaluation part of the champion gate (a warning; recorded).
    Returns the decision record, which is also stored as tags."""
    if (version is None) == (from_alias is None):
        raise RegistryError("give exactly one of --version V or --from-alias ALIAS (e.g. --from-alias challenger)")
    if force and not (reason and reason.strip()):
        raise RegistryError("--force needs --reason '...': a forced promotion is recorded with its reason")
    uri = default_tracking_uri(tracking_uri)
    with mlflow_client(uri) as client:
        if from_alias is not None:
            version = alias_version(client, name, from_alias)
        mv = model_version(client, name, str(version))
        aliases = dict(registered_model(client, name).aliases)
        previous = str(aliases[alias]) if alias in aliases else None
        failures = _gate(client, name, mv, alias, previous, tolerance, gate_alias)
        memory = _memory_gate(client, name, mv, alias, previous, gate_alias, memory_gate)
        if isinstance(memory, list):
            failures += memory
        if failures and not force:
            stays = f"{name}@{alias} stays on version {previous}" if previous else f"{name}@{alias} stays unset"
            raise PromotionRefusedError(
                f"refused to point {name}@{alias} at version {mv.version}: {'; '.join(failures)}. {stays}. "
                "Fix the cause (re-export and verify, register with --eval-data, record a memory evaluation) "
                "or override with --force --reason '...' (recorded)")
        record = {"alias": alias, "version": str(mv.version), "previous_version": previous,
                  "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "by": _user(),
                  "forced": bool(force and failures), "reason": reason, "gate": failures or "passed",
                  "val_ppl": mv.tags.get("ctxmem.val_ppl")}
        if alias == gate_alias:
            record["memory_gate"] = "skipped (--no-memory-gate)" if memory == "skipped" else \
                ("passed" if not memory else "failed")
            summary = registry_memory.recorded(mv)
            if summary:
                record["memory_eval"] = {k: summary.get(k) for k in ("text_sha256", "window", "sinks", "sink_ppl",
                                                                     "recompute_ppl")}
        client.set_registered_model_alias(name, alias, str(mv.version))
        value = json.dumps(record)
        client.set_model_version_tag(name, str(mv.version), f"ctxmem.promotion.{alias}", value)
        client.set_registered_model_tag(name, f"ctxmem.last_promotion.{alias}", value)
    log.info("%s@%s -> version %s%s", name, alias, mv.version, " (FORCED: %s)" % reason if record["forced"] else "")
    return record


def _gate(client, name: str, mv, alias: str, previous: str | None, tolerance: float, gate_alias: str) -> list[str]:
    failures = []
    status = mv.tags.get("ctxmem.verification")
    if status is None:
        failures.append(f"version {mv.version} has no verification record (register it with `ctxmem registry "
                        "register`, which verifies first)")
    elif status != "passed":
        summary = mv.tags.get("ctxmem.verification_summary", "")
        failures.append(f"version {mv.version} verification {status}" + (f" ({summary})" if summary else ""))
    if alias == gate_alias and previous is not None and str(previous) != str(mv.version):
        champion = client.get_model_version(name, str(previous))
        cand, champ = _float(mv.tags.get("ctxmem.val_ppl")), _float(champion.tags.get("ctxmem.val_ppl"))
        if cand is None:
            failures.append(f"version {mv.version} has no validation perplexity to compare with the {alias} "
                            f"(version {previous}); register it with --eval-data")
        elif champ is not None and cand > champ * (1 + tolerance):
            failures.append(f"validation perplexity {cand:.4g} is worse than the {alias}'s {champ:.4g} "
                            f"(version {previous}) by more than {100 * tolerance:g}%")
    return failures


def _memory_gate(client, name: str, mv, alias: str, previous: str | None, gate_alias: str,
                 enabled: bool) -> list[str] | str:
    """The memory part of the gate (registry_memory.py) for the gated alias: its failures, or
    "skipped" when disabled (warned: the version is promoted without a memory check)."""
    if alias != gate_alias:
        return []
    if not enabled:
        log.warning("promoting %s version %s to @%s WITHOUT the memory gate (--no-memory-gate): its sink perplexity "
                    "past the window is not checked; the decision records the skip", name, mv.version, alias)
        return "skipped"
    champion = None
    if previous is not None and str(previous) != str(mv.version):
        champion = client.get_model_version(name, str(previous))
    return registry_memory.memory_gate(name, mv, champion)


def _float(value) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return "unknown"


# ---- list ---------------------------------------------------------------------------------------------
def list_versions(name: str | None = None, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """One row per version: aliases, verification, variant, metrics, lineage."""
    uri = default_tracking_uri(tracking_uri)
    rows = []
    with mlflow_client(uri) as client:
        models = [registered_model(client, name)] if name else list(client.search_registered_models())
        for model in models:
            by_version: dict[str, list[str]] = {}
            for alias, v in dict(model.aliases).items():
                by_version.setdefault(str(v), []).append(alias)
            for mv in client.search_model_versions(f"name='{model.name}'"):
                t = mv.tags
                rows.append({"name": model.name, "version": str(mv.version),
                             "aliases": sorted(by_version.get(str(mv.version), [])),
                             "verification": t.get("ctxmem.verification", "missing"),
                             "variant": t.get("ctxmem.variant", "?"), "val_loss": _float(t.get("ctxmem.val_loss")),
                             "val_ppl": _float(t.get("ctxmem.val_ppl")),
                             **_memory_columns(mv),
                             "source_run_id": t.get("ctxmem.source_run_id") or None, "run_id": mv.run_id,
                             "created": _dt.datetime.fromtimestamp(mv.creation_timestamp / 1000,
                                                                   _dt.timezone.utc).isoformat(timespec="seconds")})
    rows.sort(key=lambda r: (r["name"], int(r["version"])))
    return rows


def _memory_columns(mv) -> dict[str, Any]:
    """The recorded memory evaluation, if any: sink and recompute(chunk=1) perplexity beyond 10x the
    window, and the text they were measured on."""
    summary = registry_memory.recorded(mv) or {}
    return {"memory_sink_ppl": _float(summary.get("sink_ppl")),
            "memory_recompute_ppl": _float(summary.get("recompute_ppl")),
            "memory_text_sha256": summary.get("text_sha256")}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = ("name", "version", "aliases", "verification", "variant", "val_loss", "val_ppl", "sink/recompute",
            "memory_text", "source_run_id")
    def cell(row, key):
        value = row.get(key)
        if key == "aliases":
            return ",".join("@" + a for a in value) or "-"
        if key == "sink/recompute":  # beyond 10x the window; the memory gate allows up to 1.10
            sink, ref = row.get("memory_sink_ppl"), row.get("memory_recompute_ppl")
            return f"{sink / ref:.3f}" if sink and ref else "-"
        if key == "memory_text":
            return (row.get("memory_text_sha256") or "-")[:12]
        if isinstance(value, float):
            return f"{value:.4f}"
        return "-" if value in (None, "") else str(value)
    table = [head] + [tuple(cell(r, k) for k in head) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


# resolve_model and default_tracking_uri are re-exported: older imports name them here
__all__ = ["register_export", "promote", "list_versions", "format_table", "resolve_model", "default_tracking_uri",
           "CHAMPION", "CHALLENGER", "PPL_TOLERANCE"]
