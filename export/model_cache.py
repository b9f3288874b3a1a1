"""The local cache of registry downloads: one verified, atomic download per version (or run folder).

    <parent>/v3-0123456789ab/                 a complete entry (its `.complete` marker inside)
    <parent>/.v3-0123456789ab.lock            the lock every resolver of that entry takes
    <parent>/.v3-0123456789ab.download-XXXX/  a download in progress, removed on any failure

Under the lock a resolver either finds a complete entry and re-hashes it against the recorded
sha256 (a cached copy changed since its download is downloaded afresh), or downloads into a
temporary sibling, checks every recorded file there, and renames the folder into place. So no one
ever reads a half-written folder, nothing unchecked is loaded, and no resolver removes a folder
another one has returned. The lock is a file lock (filelock): it serialises threads and processes
alike, and the OS drops it when its holder dies.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import ArtifactIntegrityError, ModelSpecError
from .runtime import MODEL_FILE, REPORT_FILE, RUNTIME_CONFIG, confined_file, file_sha256

log = logging.getLogger(__name__)

MARKER = ".complete"


@dataclass(frozen=True)
class Expected:
    """The sha256 a download must match. `hashes` None: nothing was recorded for it, so the export's
    own verification report (if the download holds one) is what it is checked against.
    `origin` says where the hashes come from and `fix` what to do on a mismatch (both for messages)."""

    hashes: dict[str, str] | None = None
    origin: str = ""
    fix: str = ""


def fetch_verified(source: str, target: Path, uri: str, spec: str, expected: Expected) -> Path:
    """The model folder (export or checkpoint) of `source` downloaded into `target`, its files
    checked against `expected` before it is returned; ArtifactIntegrityError (the download removed)
    when they differ."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target, spec):
        if (target / MARKER).is_file():
            model_dir = find_model_dir(target, spec)
            bad, _ = _mismatches(model_dir, expected)
            if not bad:
                return model_dir
            log.warning("%s: the cached copy in %s changed after it was downloaded (%s differs from the sha256 %s); "
                        "downloading it again", spec, target, bad[0][0], _origin(expected))
        if target.exists():  # a changed copy, or a folder without its marker: no one reads either
            _discard(target)
        for stale in target.parent.glob(f".{target.name}.download-*"):  # a holder that died mid-download
            shutil.rmtree(stale, ignore_errors=True)  # (a live one would hold the lock we hold)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.download-", dir=target.parent))
        try:
            log.info("downloading %s from %s into %s", spec, source, target)
            import mlflow.artifacts

            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp), tracking_uri=uri,
                                                registry_uri=uri)
            model_dir = find_model_dir(tmp, spec)
            bad, checked = _mismatches(model_dir, expected)
            if bad:
                raise _integrity_error(spec, expected, bad)
            (tmp / MARKER).write_text(json.dumps({"source": source, "sha256": checked}, indent=1) + "\n")
            tmp.rename(target)  # atomic: the entry appears complete or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target / model_dir.relative_to(tmp)


def find_model_dir(root: Path, spec: str) -> Path:
    """The export (runtime_config.json) or checkpoint (config.json + model.safetensors) inside a download."""
    candidates = [root] + sorted(p for p in root.rglob("*") if p.is_dir())
    for path in candidates:
        if (path / RUNTIME_CONFIG).is_file() and (path / MODEL_FILE).is_file():
            return path
    for path in candidates:
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise ModelSpecError(f"{spec} holds neither a ctxmem export ({RUNTIME_CONFIG} + {MODEL_FILE}) nor a checkpoint "
                         "(config.json + model.safetensors)")


@contextlib.contextmanager
def _locked(target: Path, spec: str) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s: waiting for another process or thread downloading it into %s", spec, target)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _mismatches(model_dir: Path, expected: Expected) -> tuple[list[tuple[str, str, str | None]], dict[str, str]]:
    """(name, recorded sha256, actual sha256 or None when missing) for every file that differs, and
    the hashes that were checked. Names are relative to the model folder and may not leave it."""
    hashes = expected.hashes if expected.hashes is not None else _report_hashes(model_dir)
    bad = []
    for name, want in sorted(hashes.items()):
        path = confined_file(model_dir, name, f"the recorded sha256 of {name!r}")
        got = file_sha256(path) if path.is_file() else None
        if got != want:
            bad.append((name, want, got))
    return bad, hashes


def _report_hashes(model_dir: Path) -> dict[str, str]:
    """The graph and weight hashes the export's own verification report pinned (empty without one):
    what a download that nothing else vouches for is checked against."""
    try:
        hashes = json.loads((model_dir / REPORT_FILE).read_text()).get("hashes")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(hashes, dict):
        return {}
    return {str(k): str(v) for k, v in hashes.items()}


def _origin(expected: Expected) -> str:
    return expected.origin if expected.hashes is not None else f"that the download's own {REPORT_FILE} recorded"


def _integrity_error(spec: str, expected: Expected, bad) -> ArtifactIntegrityError:
    name, want, got = bad[0]
    files = "; ".join(f"{n}: recorded sha256 {w}, downloaded {g or 'no such file'}" for n, w, g in bad)
    fix = expected.fix if expected.hashes is not None else \
        "The download is incomplete or the stored artifact is corrupt: try again, or log the artifact anew"
    return ArtifactIntegrityError(f"{spec}: {name} does not match the sha256 {_origin(expected)} ({files}); the "
                                  f"download was removed and nothing of it was loaded. {fix}",
                                  file=name, expected=want, actual=got)


def _discard(path: Path) -> None:
    """Out of sight at once (an atomic rename), then deleted."""
    gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.discard-", dir=path.parent))
    path.rename(gone / path.name)
    shutil.rmtree(gone, ignore_errors=True)
