"""`ctxmem serve`: start Ray (or join one), start Serve on HOST:PORT and run the application.

Ray, FastAPI and onnxruntime are imported inside the handler, so `ctxmem --help` stays fast.
The same application runs from YAML with `serve run infra/serve.yaml`.
"""
from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("ctxmem.serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Start Ray Serve with the ctxmem ingress (FastAPI) and engine (ONNX Runtime, continuous "
                    "batching, conversation KV reuse). The OpenAI Python client works unchanged against "
                    "http://HOST:PORT/v1. Same application as `serve run infra/serve.yaml`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="export dir (ONNX Runtime), checkpoint dir (PyTorch fallback), runs:/... or models:/NAME@ALIAS")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store for models:/ specs (default: $MLFLOW_TRACKING_URI, else ./mlflow.db as "
                        "`ctxmem registry`); resolved here so every replica reads the same store")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP bind address; other than loopback it needs API keys (or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas")
    p.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs reserved per engine replica (fractions allowed)")
    p.add_argument("--engine-gpus", type=float, default=0.0, help="GPUs per engine replica (provider cuda)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="ONNX Runtime execution provider; auto = CUDA where present, else CPU")
    p.add_argument("--intra-op-threads", type=int, default=None, help="ONNX Runtime threads per replica (CPU: 1)")
    p.add_argument("--decode-session", action="store_true",
                   help="an export on CPU: decode steps on a second ONNX Runtime session holding only the graph's "
                        "one-token branch (5-11%% faster per token measured, the same tokens) for about 1.5x the "
                        "replica's model memory (the weights are loaded and packed twice)")
    p.add_argument("--max-batch-size", type=int, default=32, help="sequences decoded together (1 = batching off)")
    p.add_argument("--no-kv-reuse", action="store_true", help="re-prefill every conversation turn")
    p.add_argument("--policy", choices=["full", "sink", "recompute", "retrieve"], default=None,
                   help="memory policy (default: the model's saved one; 'full' is served as 'sink')")
    p.add_argument("--window", type=int, default=None, help="memory window (recent tokens kept)")
    p.add_argument("--sinks", type=int, default=None, help="sink tokens always kept (sink, retrieve)")
    p.add_argument("--budget", type=int, default=None, help="retrieve: evicted tokens put back at most")
    p.add_argument("--store", type=int, default=None,
                   help="retrieve: evicted tokens kept per conversation at most (a multiple of 16)")
    p.add_argument("--every", type=int, default=None,
                   help="retrieve: choose what to put back every this many tokens (1 = before each token)")
    p.add_argument("--chat-template", choices=["model", "text"], default="model",
                   help="how chat messages become tokens: 'model' = the tokenizer's chat template; 'text' = the "
                        "conversation as one running text (each message joined by a space, replies appended) "
                        "for a model that was never chat-trained, e.g. bench/models/recall-small")
    p.add_argument("--colocate-engine", action="store_true",
                   help="run the engine inside the HTTP replica (one deployment): less Ray CPU per request and "
                        "per streamed message (~0.75x per token measured); each replica keeps its own KV cache and "
                        "a conversation is not routed back to it, so use it with one replica per machine")
    p.add_argument("--direct-ingress", action="store_true",
                   help="the HTTP replica itself listens on --port (Ray Serve's direct ingress): a request skips "
                        "Serve's HTTP proxy actor and the replica's fetching of its messages from it (with "
                        "--colocate-engine 0.71-0.86x the CPU per token at 16 streams, tiny export). Serve's proxy "
                        "still runs, on --proxy-port. Only with a Ray cluster this command starts (Serve reads the "
                        "switch when Ray starts), not with --address; one port per HTTP replica (with "
                        "--colocate-engine and --replicas N: PORT..PORT+N-1). Streams, keys, /health, /metrics "
                        "work as through the proxy; nothing balances over several HTTP replicas' ports. In Ray "
                        "2.60 a feature flag of Serve's, 'a limited form of direct ingress'")
    p.add_argument("--proxy-port", type=int, default=None,
                   help="with --direct-ingress: the port of Serve's own HTTP proxy (default: a free port)")
    p.add_argument("--model-name", default=None, help="model id clients send (default: from --model)")
    p.add_argument("--api-key", action="append", default=None,
                   help="an admin bearer token (repeatable); also $CTXMEM_API_KEYS (comma-separated)")
    p.add_argument("--api-keys-file", default=None,
                   help="YAML/JSON file of keys: sha256, name, role user|admin, limits (serving/README.md, Tenants)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without any API key (anyone reaching it is admin)")
    p.add_argument("--session-store", default=None,
                   help="sqlite:///PATH (default), redis://HOST:PORT/DB (several nodes) or memory://")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one on 127.0.0.1)")
    p.add_argument("--object-store-mb", type=int, default=500, help="object store size of a local Ray we start")
    p.add_argument("--app-name", default="ctxmem", help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="URL prefix of the application (several apps, one port)")
    p.set_defaults(func=cmd_serve)


def serve_args(args: argparse.Namespace):
    """Command-line flags -> the builder's typed ServeArgs."""
    from .config import DeploymentOptions, ServeArgs

    actor = {"num_cpus": args.engine_cpus}
    if args.engine_gpus:
        actor["num_gpus"] = args.engine_gpus
    data = {
        "model": args.model, "model_name": args.model_name, "api_keys": args.api_key or [],
        "api_keys_file": args.api_keys_file,
        "max_tokens_limit": args.max_tokens_limit, "allow_unauthenticated": args.allow_unauthenticated,
        "colocate_engine": args.colocate_engine, "direct_ingress": args.direct_ingress,
        "engine": {"model": args.model, "tracking_uri": _tracking_uri(args), "provider": args.provider, "intra_op_threads": args.intra_op_threads,
                   "decode_session": args.decode_session,
                   "max_batch_size": args.max_batch_size, "kv_reuse": not args.no_kv_reuse,
                   "chat_template": args.chat_template},
        "engine_deployment": DeploymentOptions(num_replicas=args.replicas, max_ongoing_requests=256,
                                               ray_actor_options=actor).model_dump(),
    }
    memory = {k: getattr(args, k, None) for k in ("policy", "window", "sinks", "budget", "store", "every")}
    if any(v is not None for v in memory.values()):
        data["engine"]["memory"] = {k: v for k, v in memory.items() if v is not None}
    if args.session_store:
        data["session_store"] = args.session_store
    return ServeArgs.model_validate(data)


def _tracking_uri(args: argparse.Namespace) -> str | None:
    if not args.model.startswith(("models:/", "runs:/")):
        return args.tracking_uri
    from ctxmem.paths import default_tracking_uri

    return default_tracking_uri(args.tracking_uri)  # absolute: replicas may not share this cwd


def check_exposure(host: str, has_keys: bool, allow_unauthenticated: bool) -> None:
    """An open server only on loopback, unless the operator says otherwise (the rule `serve run`'s
    builder applies too: serving.config.exposure_refusal)."""
    from .config import exposure_refusal

    refusal = exposure_refusal(host, has_keys, allow_unauthenticated)
    if refusal:
        raise SystemExit(f"ctxmem serve: {refusal}")


def cmd_serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on 127.0.0.1
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    config = serve_args(args)  # validate before paying for Ray's start-up
    try:
        resolved = config.resolve()
    except ValueError as err:  # an unreadable or invalid keys file
        raise SystemExit(f"ctxmem serve: {err}") from None
    check_exposure(args.host, bool(resolved.tenants), args.allow_unauthenticated)

    import ray
    from ray import serve

    from .app import build_app, direct_ingress_cluster_env

    address = args.address or os.environ.get("RAY_ADDRESS")
    proxy_port = args.port
    if args.direct_ingress:
        if address:
            raise SystemExit("ctxmem serve: --direct-ingress needs the Ray cluster this command starts (Serve reads "
                             "the switch when Ray starts); for a cluster of your own start it with "
                             "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and set args.direct_ingress in `serve run` YAML")
        os.environ.update(direct_ingress_cluster_env(args.port, args.replicas if args.colocate_engine else 1))
        from ctxmem.net import free_port

        proxy_port = args.proxy_port or free_port()
    if address:
        from ctxmem.net import unreachable

        problem = unreachable(address)
        if problem:
            raise SystemExit(f"ctxmem serve: {problem}, or drop --address and unset RAY_ADDRESS to let this "
                             "command start a local one")
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, object_store_memory=args.object_store_mb * 2**20)
    serve.start(http_options={"host": args.host, "port": proxy_port})
    app = build_app(config)
    log.info("serving %s as %r on http://%s:%d%s/v1 (%d engine replica(s)%s)", args.model,
             resolved.model_name, args.host, args.port, args.route_prefix.rstrip("/"), args.replicas,
             f"; direct ingress, Serve's proxy on port {proxy_port}" if args.direct_ingress else "")
    try:
        serve.run(app, name=args.app_name, route_prefix=args.route_prefix, blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(args.app_name)
    return 0
