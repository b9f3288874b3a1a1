"""The MLflow store seen from the export stage: a client on a URI with MLflow's errors turned into
RegistryError, and the lookups of registered models, aliases and versions that both resolution
(resolve.py) and the registry commands (registry.py) need.

Nothing global is changed (no mlflow.set_tracking_uri): every call names its store explicitly.
mlflow is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

from .errors import AliasNotFoundError, RegistryError


@contextlib.contextmanager
def mlflow_client(uri: str) -> Iterator[Any]:
    """An MlflowClient on `uri` (tracking and registry), with MLflow's errors as RegistryError."""
    # An unreachable server should fail in seconds, not after MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    except MlflowException as err:
        raise RegistryError(f"MLflow at {uri}: {first_line(err)}") from None
    except OSError as err:  # requests' ConnectionError is an OSError
        raise RegistryError(f"cannot reach the MLflow tracking server at {uri} ({first_line(err)}); start it "
                            "(see infra/mlflow/README.md) or pass another --tracking-uri") from None


def first_line(err: Exception) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0][:400] if text else type(err).__name__


def is_missing(err: Exception) -> bool:
    """An MlflowException that says 'no such thing' (as opposed to a store failure)."""
    return getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def registered_model(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not is_missing(err):
            raise
        names = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model {name!r} in {client.tracking_uri}; registered models: "
                            f"{names or 'none'}") from None


def alias_version(client, name: str, alias: str) -> str:
    """The version `name@alias` points at; AliasNotFoundError lists the aliases that exist."""
    aliases = dict(registered_model(client, name).aliases)  # search_model_versions does not show aliases
    if alias not in aliases:
        known = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        raise AliasNotFoundError(f"registered model {name!r} has no alias {alias!r}; its aliases: {known}. "
                                 f"Set one with `ctxmem registry promote --name {name} --version V --alias {alias}`")
    return str(aliases[alias])


def model_version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    registered_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not is_missing(err):
            raise
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        raise RegistryError(f"registered model {name!r} has no version {version}; versions: {versions}") from None


EXPORT_SHA256_TAG = "ctxmem.export_sha256"  # {file name in the export: sha256}, set by `registry register`
_HEX = frozenset("0123456789abcdef")


def recorded_hashes(mv) -> dict[str, str] | None:
    """The sha256 that registration recorded for a version's export files (the tag
    ctxmem.export_sha256), or None for a version registered without ctxmem. A tag that is not a
    {relative file name: sha256} object is a RegistryError: nothing recorded can be trusted."""
    from .runtime import file_path_problem

    text = (mv.tags or {}).get(EXPORT_SHA256_TAG)
    if text is None:
        return None
    where = f"version {mv.version} of {mv.name!r}: its tag {EXPORT_SHA256_TAG}"
    try:
        hashes = json.loads(text)
    except ValueError:
        hashes = None
    if not isinstance(hashes, dict) or not hashes:
        raise RegistryError(f"{where} is not a JSON object of file sha256 ({text[:80]!r}); register the export again")
    for name, digest in hashes.items():
        problem = file_path_problem(name)
        if problem:
            raise RegistryError(f"{where} names {name!r}, {problem}; register the export again")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise RegistryError(f"{where} gives {name!r} the sha256 {digest!r}, not 64 hex digits; register the "
                                "export again")
    return hashes
