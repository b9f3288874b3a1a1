"""Typed settings of the serving stack: one pydantic model per layer, validated where they are built.

    ServeArgs              the application builder's arguments (`build_app`, `serve run` YAML `args:`)
      .tenants  Tenant            API keys (sha256 only), their role and limits; from `api_keys_file`
      .limits   KeyLimits         the limits of a key that sets none of its own
      .request_memory  RequestMemory   the per-request memory knobs this server allows
      .engine  EngineConfig       scheduler, KV reuse, memory policy, ONNX Runtime knobs; sent to each
                                  engine replica as its `user_config`, so `reconfigure` can change it live
      .engine_deployment / .ingress_deployment  DeploymentOptions   replicas, resources, autoscaling

Nothing here imports Ray, so the engine and the HTTP layer are testable without a cluster.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

API_KEYS_ENV = "CTXMEM_API_KEYS"  # comma-separated; read where the builder runs
TENANT_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DEFAULT_STORE = "sqlite:///" + str(Path(os.environ.get("CTXMEM_HOME", Path.home() / ".cache" / "ctxmem")) / "sessions.sqlite")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryOverrides(_Strict):
    """A memory policy for the server (defaults to the model's saved one, see EngineConfig.memory).

    `retrieve` (ctxmem.retrieval) also takes: `budget` (evicted tokens put back at most), `store` (the
    bound of each conversation's store of evicted KV, in tokens: a multiple of `block`; its bytes are
    store x layers x 2 x kv_heads x head_dim x 4 for a float32 cache, ~12.6 MB per conversation for
    the recall-trained small model at the default 2048), `block`, `layer`, `queries`, `every` (the
choice is made afresh every `every` tokens: 1 = before each token; more feeds a prompt in pieces and
costs less). The store lives
    with the conversation's KV state (kv_cache_mb bounds both together)."""

    policy: Literal["full", "sink", "recompute", "retrieve"] | None = None
    window: int | None = Field(default=None, ge=1)
    sinks: int | None = Field(default=None, ge=0)
    chunk: int | None = Field(default=None, ge=1)
    budget: int | None = Field(default=None, ge=0)
    block: int | None = Field(default=None, ge=1)
    store: int | None = Field(default=None, ge=1)
    layer: int | None = Field(default=None, ge=0)
    queries: int | None = Field(default=None, ge=1)
    every: int | None = Field(default=None, ge=1)  # choose afresh at stream indices that are multiples of this


class EngineConfig(_Strict):
    """One engine replica: what it serves and how it batches. Runtime knobs: `reconfigure` applies them."""

    model: str = Field(description="export dir (ONNX Runtime), checkpoint dir (PyTorch fallback), "
                                   "runs:/RUN/PATH or models:/NAME@ALIAS (resolved through the MLflow registry)")
    tracking_uri: str | None = None  # MLflow store for models:/ and runs:/ specs; None = $MLFLOW_TRACKING_URI
    provider: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where ONNX Runtime has it, else CPU
    intra_op_threads: int | None = Field(default=None, ge=1)  # None: 1 on CPU (one replica per core slice)
    # an export on CPU: decode steps on a second ONNX Runtime session holding only the graph's one-token
    # branch (5-11% faster per token measured, the same tokens) for about 1.5x the resident memory (the
    # weights loaded and packed twice); no effect on a checkpoint, on CUDA or on a graph without the branch
    decode_session: bool = False
    max_batch_size: int = Field(default=32, ge=1)  # rows decoded together; 1 = batching off
    max_queued: int = Field(default=256, ge=1)  # waiting requests beyond this get 429
    # prompt tokens prefilled per scheduler step (chunked; while other sequences decode, also bounded
    # by time: serving/scheduler.py PREFILL_SHARE)
    prefill_token_budget: int = Field(default=512, ge=1)
    # Each streamed message costs ~1-2 ms of Python in every hop (engine -> ingress -> proxy; measured),
    # so under load a stream's tokens are sent together, at most every stream_interval_ms. None =
    # adaptive: 20 ms per running sequence, at most 500 ms (~50 messages/s per replica, ~0.1 core of
    # Serve overhead here; serving/scheduler.py ADAPTIVE_MS_PER_SEQ); 0 = every step.
    # The first token is never held back.
    stream_interval_ms: float | None = Field(default=None, ge=0)
    kv_reuse: bool = True  # keep recent conversations' KV state (off: every turn re-prefills)
    kv_cache_mb: float = Field(default=256.0, ge=0)  # LRU bound on kept conversation states
    kv_cache_sessions: int = Field(default=1024, ge=0)
    max_prompt_tokens: int = Field(default=131072, ge=1)  # a longer prompt (after the chat template) is a 400
    memory: MemoryOverrides | None = None  # None: the model's saved policy, upgraded from 'full' to sink
    # how chat messages become tokens: "model" = the tokenizer's chat template; "text" = one running text
    # (user messages joined by a space, replies appended) for a model that was never chat-trained
    chat_template: Literal["model", "text"] = "model"
    reload_nonce: int = 0  # bump (YAML user_config) to make replicas re-resolve a registry alias


class DeploymentOptions(_Strict):
    """Ray Serve deployment options that the builder applies with `.options()`; YAML `deployments:`
    entries override them in turn."""

    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    max_queued_requests: int | None = None
    autoscaling_config: dict[str, Any] | None = None
    ray_actor_options: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None
    logging_config: dict[str, Any] | None = None  # Ray Serve LoggingConfig, e.g. {"enable_access_log": false}

    def as_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class KeyLimits(_Strict):
    """What one API key may use. None = no limit. Where rates are counted: serving/README.md, Limits."""

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)  # prompt + completion tokens of finished requests
    max_conversations: int | None = Field(default=None, ge=1)  # stored; the least recently used one is evicted
    max_conversation_tokens: int | None = Field(default=None, ge=1)  # a conversation this long takes no new turn

    def over(self, default: "KeyLimits") -> "KeyLimits":
        """These limits, with the unset ones taken from `default`."""
        return KeyLimits(**{k: v if v is not None else getattr(default, k) for k, v in self})


class Tenant(_Strict):
    """One API key: the sha256 of its secret (keys are random, so a fast hash is enough; the secret
    itself is never stored or shipped), a name that owns its conversations, a role, its limits."""

    name: str
    role: Literal["user", "admin"] = "user"
    sha256: str
    limits: KeyLimits = Field(default_factory=KeyLimits)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not TENANT_NAME.fullmatch(v):
            raise ValueError(f"key name {v!r}: use 1-64 letters, digits or ._@-")
        return v

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str) -> str:
        if not SHA256_HEX.fullmatch(v):
            raise ValueError("sha256 must be the 64 lowercase hex digits of sha256(key) - never the key itself")
        return v


class KeysFile(_Strict):
    """The `--api-keys-file` (YAML or JSON): {"keys": [Tenant, ...]}."""

    keys: list[Tenant]

    @model_validator(mode="after")
    def _unique(self) -> "KeysFile":
        for what in ("name", "sha256"):
            values = [getattr(t, what) for t in self.keys]
            dup = sorted({v for v in values if values.count(v) > 1})
            if dup:
                raise ValueError(f"two keys share the {what} {dup[0][:16]!r}; each key needs its own")
        return self


def load_keys_file(path: str | Path) -> list[Tenant]:
    import yaml
    from pydantic import ValidationError

    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"cannot read the API keys file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"the API keys file {path} is not valid YAML/JSON: {err}") from None
    try:
        return KeysFile.model_validate(data).keys
    except ValidationError as err:
        raise ValueError(f"the API keys file {path} is invalid: {err}") from None


class RequestMemory(_Strict):
    """The per-request memory knobs (`policy`, `window`, `sinks`, `budget`) this server accepts. Every
    distinct window forms its own batch group and a tiny one makes prefill many times slower, so by
    default a request may pick a policy but not a window, a sink count or a retrieve budget: list the
    values to allow. `retrieve` is allowed by default: its store's bound and scoring are the server's
    (EngineConfig.memory), and a model that cannot run it answers 400 saying why."""

    policies: list[Literal["full", "sink", "recompute", "retrieve"]] = Field(
        default_factory=lambda: ["sink", "recompute", "full", "retrieve"])
    windows: list[int] = Field(default_factory=list)
    sinks: list[int] = Field(default_factory=list)
    budgets: list[int] = Field(default_factory=list)


class ServeArgs(_Strict):
    """Arguments of `ctxmem.serving.app:build_app` (YAML `args:` or `ctxmem serve` flags)."""

    model: str | None = None  # None: $CTXMEM_MODEL; copied into engine.model
    model_name: str | None = None  # the id clients put in `model`; default derived from the spec
    api_keys: list[str] = Field(default_factory=list)  # plus $CTXMEM_API_KEYS; empty = no auth
    api_key_hashes: list[str] = Field(default_factory=list)  # sha256 hex, filled by resolve(); keys never ship
    # tenants: a name, a role and limits per key (see Tenant); plain api_keys become admin keys
    api_keys_file: str | None = None  # read by resolve() where the builder runs, into `tenants`
    tenants: list[Tenant] = Field(default_factory=list)
    limits: KeyLimits = Field(default_factory=lambda: KeyLimits(max_conversations=1000))  # a key's defaults
    session_ttl_s: float | None = Field(default=30 * 86400, gt=0)  # idle conversations expire (None: never)
    request_memory: RequestMemory = Field(default_factory=RequestMemory)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_tokens_limit: int = Field(default=4096, ge=1)
    default_max_tokens: int = Field(default=256, ge=1)
    session_store: str = DEFAULT_STORE  # sqlite:///PATH | redis://HOST:PORT/DB | memory://
    # serve a non-loopback HTTP host without any API key (anyone who reaches it is admin): build_app
    # refuses that unless this is set, as `ctxmem serve` does without --allow-unauthenticated
    allow_unauthenticated: bool = False
    # the engine inside the HTTP replica (one deployment, "Server", with ingress_deployment's options and
    # engine_deployment's resources): one Ray hop less per request and per streamed message; each replica
    # its own engine and KV cache, no session routing across replicas (serving/deployments.py)
    colocate_engine: bool = False
    # Ray Serve's direct ingress for the HTTP deployment (Ingress, or Server with colocate_engine): each
    # of its replicas serves HTTP itself on a port of its own, so a request skips Serve's HTTP proxy actor
    # and the replica's fetching of ASGI messages from it. The builder puts Serve's switch into those
    # replicas' environment, with their user code on the HTTP server's event loop; the ports (30000-31000 unless RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT say
    # otherwise), port reuse and draining follow the environment Ray's Serve controller started with.
    # Serve's proxy still runs on http_options' port and still routes (serving/README.md)
    direct_ingress: bool = False
    engine: EngineConfig | None = None
    engine_deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        max_ongoing_requests=256, ray_actor_options={"num_cpus": 1}))
    ingress_deployment: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(
        max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.25}))

    @model_validator(mode="before")
    @classmethod
    def _engine_model(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            model = data.get("model") or os.environ.get("CTXMEM_MODEL")
            engine = dict(data.get("engine") or {})
            if model and not engine.get("model"):
                engine["model"] = model
            if engine:
                data["engine"] = engine
            data["model"] = model or engine.get("model")
        return data

    @field_validator("model_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("model_name must not be empty")
        return v

    def resolve(self) -> "ServeArgs":
        """Fill the derived fields: engine.model, model_name, api key hashes (plain keys dropped), the
        tenants of the keys file (read here, so replicas need not see the file)."""
        if self.engine is None or not self.engine.model:
            raise ValueError("no model: pass `model` (export dir, checkpoint dir or models:/NAME@ALIAS) "
                             "or set CTXMEM_MODEL")
        keys = list(self.api_keys) + [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        hashes = sorted(set(self.api_key_hashes) | {hash_key(k) for k in keys})
        tenants = {t.sha256: t for t in self.tenants}
        if self.api_keys_file:
            tenants.update({t.sha256: t for t in load_keys_file(self.api_keys_file)})
        # a plain key (--api-key, $CTXMEM_API_KEYS) is the operator's: an admin key of its own tenant
        for h in hashes:
            tenants.setdefault(h, Tenant(name=f"key-{h[:12]}", role="admin", sha256=h))
        return self.model_copy(update={"api_keys": [], "api_key_hashes": hashes, "api_keys_file": None,
                                       "tenants": sorted(tenants.values(), key=lambda t: t.name),
                                       "model_name": self.model_name or default_model_name(self.engine.model)})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_refusal(host: str, has_keys: bool, allow_unauthenticated: bool) -> str | None:
    """Why a server on `host` must not start (an open server only on loopback, unless the operator
    says otherwise), or None."""
    if has_keys or allow_unauthenticated or is_loopback(host):
        return None
    return (f"refusing to serve {host} without API keys - anyone who reaches it could use the model and every "
            "admin route. Give keys (args.api_keys_file, args.api_keys or $CTXMEM_API_KEYS; ctxmem serve "
            "--api-keys-file / --api-key), bind a loopback host, or set args.allow_unauthenticated: true "
            "(ctxmem serve --allow-unauthenticated) if this is really meant to be open.")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_model_name(spec: str) -> str:
    """models:/ctxmem-tiny@champion -> ctxmem-tiny; /path/to/export -> export."""
    if spec.startswith("models:/"):
        rest = spec[len("models:/"):]
        return rest.split("@")[0].split("/")[0] or "ctxmem"
    if spec.startswith("runs:/"):
        return "ctxmem-" + spec[len("runs:/"):].split("/")[0][:8]
    return Path(spec.rstrip("/")).name or "ctxmem"
