"""The typed application builder: `ctxmem.serving.app:build_app` for `serve run` YAML and `ctxmem serve`.

    serve run infra/serve.yaml                       # import_path: ctxmem.serving.app:build_app
    serve run ctxmem.serving.app:build_app model=/path/to/export
"""
import os
from typing import Any

from ray.serve import Application

from .config import ServeArgs, exposure_refusal


def build_app(args: ServeArgs) -> Application:
    """Ingress(FastAPI) -> Engine(ONNX Runtime + continuous batching). Serve converts the YAML `args:`
    dict to ServeArgs (the annotation); a plain dict is accepted too. Ray Serve calls an application
    builder with exactly one argument, so the A/B switch below lives in its own function."""
    return build_app_with_router(args, session_affinity=True)


def build_app_with_router(args: ServeArgs, session_affinity: bool) -> Application:
    """build_app, choosing the engine's request router: `session_affinity=False` routes with Serve's
    default router instead of serving/router.py (for A/B benchmarks of KV reuse)."""
    from ray.serve.config import RequestRouterConfig

    from .deployments import EngineDeployment, IngressDeployment

    if not isinstance(args, ServeArgs):
        args = ServeArgs.model_validate(dict(args or {}))
    args = args.resolve()
    refusal = exposure_refusal(serve_http_host(), bool(args.tenants), args.allow_unauthenticated)
    if refusal:  # `serve run` YAML: http_options.host 0.0.0.0 and no keys stops here, as `ctxmem serve` does
        raise ValueError(f"ctxmem: {refusal}")
    # args.engine is the engine's base config; its user_config starts empty ({} still makes Serve call
    # `reconfigure`, which loads the model) and is where YAML puts live overrides. The ingress gets
    # only what it reads.
    ingress_args = args.model_dump(exclude={"engine", "engine_deployment", "ingress_deployment"})
    if args.colocate_engine:
        from .deployments import ServerDeployment

        # one replica type: the HTTP side's options (replicas, queue), the engine's resources (CPUs, GPUs)
        options = {**args.ingress_deployment.as_options(), "user_config": {}}
        engine_actor = args.engine_deployment.as_options().get("ray_actor_options")
        if engine_actor:
            options["ray_actor_options"] = engine_actor
        return ServerDeployment.options(**http_options(options, args)).bind(args.engine.model_dump(), ingress_args)
    options = args.engine_deployment.as_options()
    if not session_affinity:
        options["request_router_config"] = RequestRouterConfig()  # power of two choices
    engine = EngineDeployment.options(user_config={}, **options).bind(args.engine.model_dump())
    return IngressDeployment.options(**http_options(args.ingress_deployment.as_options(), args)).bind(
        engine, ingress_args)


# Serve reads these once per process at import. The first makes a replica serve HTTP on its own port;
# the second runs the replica's user code (our ASGI app) on the loop that HTTP server runs on rather than
# on a loop in a thread of its own, so an ASGI message is not handed between two loops (bench_serving.py
# `direct` phase: 0.90x and 0.91x the CPU per token at 16 streams, colocated, in two runs)
DIRECT_INGRESS_ENV = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def direct_ingress_cluster_env(port: int | None = None, http_replicas: int = 1) -> dict[str, str]:
    """The environment a local Ray cluster starts with for Serve's direct ingress (its controller, proxy
    and replicas read it when they start): the switch; with `port`, HTTP replicas take
    PORT..PORT+N-1 (Serve's allocator hands out [min, max); else its default 30000-31000); with no
    external load balancer in front, a stopped replica's port is free again at once and a replica stops
    after 1 s instead of Serve's 30 s drain - unless the environment already sets those two."""
    env = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
           "RAY_SERVE_PORT_QUARANTINE_S": os.environ.get("RAY_SERVE_PORT_QUARANTINE_S", "0"),
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")}
    if port is not None:
        env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(port),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(port + http_replicas))
    return env


def http_options(options: dict[str, Any], args: ServeArgs) -> dict[str, Any]:
    """The HTTP deployment's options; with args.direct_ingress, DIRECT_INGRESS_ENV added to its replicas'
    environment (runtime_env env_vars, under any the options already carry)."""
    if not args.direct_ingress:
        return options
    actor = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**DIRECT_INGRESS_ENV, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    return {**options, "ray_actor_options": actor}


def serve_http_host() -> str:
    """The host Serve's HTTP proxies bind: the running controller's (`serve run` YAML `http_options`,
    `ctxmem serve --host`), else the one Serve will start with (its default, loopback unless
    $RAY_SERVE_DEFAULT_HTTP_HOST says otherwise) - `serve run IMPORT_PATH` builds before starting Serve."""
    import ray
    from ray.serve.config import HTTPOptions
    from ray.serve.context import _get_global_client

    client = None
    if ray.is_initialized():  # (asking without Ray would start one here)
        try:
            client = _get_global_client(raise_if_no_controller_running=False)
        except Exception:  # noqa: BLE001 - no Serve yet: it starts later with its defaults
            client = None
    host = client.http_config.host if client is not None else None
    return host or HTTPOptions().host


def app_args(**overrides: Any) -> ServeArgs:
    """ServeArgs from keyword arguments, e.g. app_args(model=path, api_keys=["k"])."""
    return ServeArgs.model_validate(overrides)
