"""The one resolver of `--model SPEC` to a local directory, and the stage's public entry points for
callers that take a spec (serving, `ctxmem generate --backend onnx`, `ctxmem eval`, `ctxmem export`).

SPEC is one of
    a directory             an export (runtime_config.json + model.onnx) or a checkpoint
    runs:/<run_id>/<path>   an artifact folder of an MLflow run
    models:/NAME@ALIAS      the version an alias points at, looked up now (aliases move on promotion)
    models:/NAME/VERSION    a fixed version
URIs are downloaded through MLflow once into $CTXMEM_MODEL_CACHE (default ~/.cache/ctxmem/models),
keyed by store, name, version and run: atomically, under a lock, and checked against the sha256
recorded for the version before anything is loaded (model_cache.py).

Layering: this module sits above the ONNX Runtime engine (runtime.py), which imports nothing from
here; mlflow loads inside the functions that need it.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from ctxmem.memory import MemoryConfig
from ctxmem.paths import default_tracking_uri

from .errors import ModelSpecError
from .model_cache import Expected, fetch_verified
from .providers import choose_provider
from .runtime import load_onnx_generator
from .store import EXPORT_SHA256_TAG, alias_version, mlflow_client, model_version, recorded_hashes

log = logging.getLogger(__name__)

CACHE_ENV = "CTXMEM_MODEL_CACHE"
URI_PREFIXES = ("models:/", "runs:/")


def is_model_uri(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(URI_PREFIXES)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ctxmem" / "models")


def resolve_model(spec: str | Path, tracking_uri: str | None = None, *, cache_dir: str | Path | None = None) -> Path:
    """A local directory (export or checkpoint) for a --model SPEC (see the module docstring).
    `tracking_uri` None = the project's default store (ctxmem.paths.default_tracking_uri)."""
    text = str(spec)
    if not is_model_uri(text):
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelSpecError(f"{path} does not exist; --model takes a checkpoint or export directory, "
                                 "runs:/<run_id>/<path>, or models:/NAME@ALIAS (or models:/NAME/VERSION)")
        if not path.is_dir():
            raise ModelSpecError(f"{path} is a file; --model takes a directory (checkpoint or export) or a URI")
        return path
    uri = default_tracking_uri(tracking_uri)
    root = Path(cache_dir) if cache_dir else cache_root()
    store = hashlib.sha1(uri.encode()).hexdigest()[:10]
    parsed = _parse_models_uri(text) if text.startswith("models:/") else None  # syntax before any I/O
    with mlflow_client(uri) as client:
        if parsed is not None:
            name, version, alias = parsed
            if alias is not None:
                version = alias_version(client, name, alias)
            mv = model_version(client, name, version)
            target = root / store / _safe(name) / f"v{mv.version}-{(mv.run_id or 'norun')[:12]}"
            source = mv.source  # the artifact location itself: no second lookup through the global registry
            expected = _version_expected(mv, text)
        else:
            run_id, _, sub = text[len("runs:/"):].partition("/")
            if not run_id:
                raise ModelSpecError(f"{text}: expected runs:/<run_id>/<artifact path>")
            target = root / store / "runs" / run_id / (_safe(sub) or "_root")
            source = client.get_run(run_id).info.artifact_uri.rstrip("/") + ("/" + sub.strip("/") if sub else "")
            expected = Expected()  # nothing is recorded for a run's folder: its own verification report, if any
        return fetch_verified(source, target, uri, text, expected)


def open_onnx_generator(spec: str | Path, memory: MemoryConfig | None = None, provider: str | None = None,
                        intra_op_threads: int = 1, tracking_uri: str | None = None, decode_session: bool = False):
    """runtime.load_onnx_generator for any --model SPEC: a local export, or a runs:/ / models:/ URI
    whose download holds one."""
    return load_onnx_generator(resolve_model(spec, tracking_uri), memory=memory, provider=provider,
                               intra_op_threads=intra_op_threads, decode_session=decode_session)


def _parse_models_uri(text: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS -> (NAME, None, ALIAS); models:/NAME/VERSION -> (NAME, VERSION, None)."""
    body = text[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    else:
        name, _, version = body.rpartition("/")
        if name and version.isdigit():
            return name, version, None
    raise ModelSpecError(f"{text}: expected models:/NAME@ALIAS or models:/NAME/VERSION")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text.strip("/"))


def _version_expected(mv, spec: str) -> Expected:
    """What a registered version's download must match: the sha256 its registration recorded."""
    hashes = recorded_hashes(mv)
    if hashes is None:
        log.warning("%s: version %s of %s has no recorded sha256 (tag %s; it was not registered with `ctxmem "
                    "registry register`): only its own verification report, if any, vouches for the download",
                    spec, mv.version, mv.name, EXPORT_SHA256_TAG)
    fix = (f"The stored artifact of {mv.name} version {mv.version} changed after it was registered: register the "
           f"export again (`ctxmem registry register --export DIR --name {mv.name}`) and promote the new version, or "
           f"point the alias at an intact version (`ctxmem registry promote --name {mv.name} --version V --alias "
           "ALIAS`)")
    return Expected(hashes, f"recorded for {mv.name} version {mv.version} at registration (tag {EXPORT_SHA256_TAG})",
                    fix)


__all__ = ["resolve_model", "choose_provider", "open_onnx_generator", "is_model_uri", "cache_root", "CACHE_ENV"]
