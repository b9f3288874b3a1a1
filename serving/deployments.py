"""The two Ray Serve deployments. Thin on purpose: replicas, resources, autoscaling and batching knobs
arrive from `ctxmem.serving.app.build_app` (typed arguments) or from YAML under infra/.

    Ingress  FastAPI (ctxmem.serving.api) - validation, auth, SSE, metrics, the conversation store
    Engine   the model (ONNX Runtime, or PyTorch for a checkpoint) + the continuous batcher
             (ctxmem.serving.engine); `user_config` = EngineConfig, so `reconfigure` changes it live
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from prometheus_client.core import Metric
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.config import RequestRouterConfig

from .api import EngineUnavailable, build_api
from .config import EngineConfig, ServeArgs
from .errors import APIError
from .events import Event
from .metrics import Registry
from .router import ROUTER_PATH

log = logging.getLogger("ctxmem.serving")
_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class _ReplicaEngine:
    """The engine half of a replica (EngineDeployment, ServerDeployment): `base` (the builder's
    EngineConfig) with the deployment's `user_config` merged on top; `reconfigure` loads the model in a
    thread, or applies live knobs to the running engine."""

    engine = None
    KIND = "Engine"  # the deployment's name, for the error below

    def _engine(self):
        if self.engine is None:
            raise RuntimeError(f"the {self.KIND} deployment was built without user_config, so it never loaded a "
                               "model: build it with ctxmem.serving.app:build_app")
        return self.engine

    def check_health(self) -> None:
        engine = self._engine()
        if not engine.healthy():
            raise RuntimeError(f"engine scheduler stopped: {engine.scheduler.error!r}")

    async def _configure(self, base: dict[str, Any], user_config: dict[str, Any] | None, replica: str) -> None:
        from .engine import Engine

        config = EngineConfig.model_validate({**base, **(user_config or {})})
        if self.engine is None:  # Serve calls this before the replica takes traffic
            self.engine = await asyncio.to_thread(Engine, config)
            log.info("engine replica %s ready: %s", replica, self.engine.info())
        elif config != self.engine.config:
            # loading a new model runs off the event loop: this replica keeps serving meanwhile
            info = await asyncio.to_thread(self.engine.reconfigure, config)
            log.info("engine replica %s reconfigured: %s", replica, info)


# Serve's router runs in the caller (the ingress): it sends each conversation to the replica holding
# its KV state (serving/router.py); YAML `request_router_config` under the Engine overrides it.
@serve.deployment(name="Engine", request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH))
class EngineDeployment(_ReplicaEngine):
    """One model replica. `base` is the builder's EngineConfig (args.engine); the deployment's
    `user_config` (YAML `deployments: - name: Engine, user_config: {...}`) is merged on top. Changing
    only user_config is a lightweight Serve update: `reconfigure` runs on the live replicas (a new
    model, e.g. a re-resolved registry alias, loads in the background) instead of restarting them."""

    def __init__(self, base: dict[str, Any]) -> None:
        self._base = dict(base)
        self.engine = None
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.actor_name = ctx.replica_id.to_full_id_str() if ctx else None  # for ray.get_actor(..., namespace="serve")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._configure(self._base, user_config, self.replica)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[Event]]:
        async for chunk in self._engine().generate(request):
            yield chunk

    def info(self) -> dict[str, Any]:
        return {**self._engine().info(), "replica": self.replica, "actor_name": self.actor_name}

    def metrics_snapshot(self) -> list[Metric]:
        return self._engine().metrics.snapshot()

    async def reload(self) -> dict[str, Any]:
        info = await asyncio.to_thread(self._engine().reload)
        return {**info, "replica": self.replica}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class RayEngineClient:
    """EngineClient over a Serve handle: streams, broadcasts, and turns replica death into EngineUnavailable."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[list[Event]]:
        try:
            async for chunk in self._stream.generate.remote(request):
                yield chunk
        except _GONE as err:
            raise EngineUnavailable(str(err)[:300]) from None
        except BackPressureError as err:
            raise APIError(429, f"the server is busy ({err}); retry later", code="overloaded") from None

    async def info(self) -> dict[str, Any]:
        try:
            return await self._handle.info.remote()
        except _GONE as err:
            raise EngineUnavailable(str(err)[:300]) from None

    async def snapshots(self) -> list[list[Metric]]:
        results = await self._handle.broadcast("metrics_snapshot").results_async(timeout_s=10, return_exceptions=True)
        return [r for r in results if isinstance(r, list)]

    async def reload(self) -> list[dict]:
        results = await self._handle.broadcast("reload").results_async(timeout_s=600, return_exceptions=True)
        return [r if isinstance(r, dict) else {"error": str(r)[:300]} for r in results]


@serve.deployment(name="Ingress")
@serve.ingress()
class IngressDeployment:
    """The HTTP front: builds the FastAPI app at replica start (`__serve_build_asgi_app__`)."""

    def __init__(self, engine: DeploymentHandle, args: dict[str, Any]):
        from .store import open_store

        self.args = ServeArgs.model_validate(args)
        self.metrics = Registry()
        self.store = open_store(self.args.session_store, self.args.session_ttl_s)
        self.client = RayEngineClient(engine)

    def __serve_build_asgi_app__(self):
        return build_api(self.client, self.args, self.store, self.metrics, self._peer_snapshots)

    def metrics_snapshot(self) -> list[Metric]:
        return self.metrics.snapshot()

    async def _peer_snapshots(self) -> list[list[Metric]]:
        """Every ingress replica's metrics, so one scrape sees the whole application."""
        ctx = serve.get_replica_context()
        try:
            handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
            results = await handle.broadcast("metrics_snapshot").results_async(timeout_s=5, return_exceptions=True)
            snaps = [r for r in results if isinstance(r, list)]
            return snaps or [self.metrics.snapshot()]
        except Exception as err:  # noqa: BLE001 - fall back to this replica's view
            log.warning("ingress broadcast failed (%s); /metrics shows this replica only", err)
            return [self.metrics.snapshot()]


@serve.deployment(name="Server")
@serve.ingress()
class ServerDeployment(_ReplicaEngine):
    """The HTTP front and the engine in one replica (`ServeArgs.colocate_engine`): the API calls the
    engine in its own process, so a request and each streamed message skip the ingress -> engine Ray
    hop (bench_serving.py `colocated` phase, the two set-ups alternately: 0.242 against 0.321 ms CPU per
    token and 5093 against 4005 tokens/s on the tiny export at 16 streams; no gain on `small`, where the
    decode dominates). Each replica has its own engine and KV cache, and Serve's proxy balances HTTP requests
    over replicas without knowing conversations: with several replicas a conversation's turns land
    anywhere (KV reuse about 1 time in N) - for one replica per node, not for the session router's
    multi-replica case. `user_config` is EngineConfig, as on the Engine deployment."""

    KIND = "Server"

    def __init__(self, base: dict[str, Any], args: dict[str, Any]):
        from .store import open_store

        self._base = dict(base)
        self.args = ServeArgs.model_validate(args)
        self.metrics = Registry()
        self.store = open_store(self.args.session_store, self.args.session_ttl_s)
        ctx = serve.get_replica_context()
        self.replica = ctx.replica_id.unique_id if ctx else "local"
        self.client = _ColocatedEngineClient(self)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        await self._configure(self._base, user_config, self.replica)

    def __serve_build_asgi_app__(self):
        return build_api(self.client, self.args, self.store, self.metrics, self._broadcast_snapshots)

    def metrics_snapshot(self) -> list[Metric]:
        return self.metrics.snapshot()

    def engine_metrics_snapshot(self) -> list[Metric]:
        return self._engine().metrics.snapshot()

    async def engine_reload(self) -> dict[str, Any]:
        info = await asyncio.to_thread(self._engine().reload)
        return {**info, "replica": self.replica}

    async def _broadcast(self, method: str, timeout_s: float) -> list:
        """`method` on every replica of this deployment (this one included)."""
        ctx = serve.get_replica_context()
        handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        return await handle.broadcast(method).results_async(timeout_s=timeout_s, return_exceptions=True)

    async def _broadcast_snapshots(self) -> list[list[Metric]]:
        """Every replica's HTTP-side metrics, so one scrape sees the whole application."""
        try:
            snaps = [r for r in await self._broadcast("metrics_snapshot", 5) if isinstance(r, list)]
            return snaps or [self.metrics.snapshot()]
        except Exception as err:  # noqa: BLE001 - fall back to this replica's view
            log.warning("server broadcast failed (%s); /metrics shows this replica only", err)
            return [self.metrics.snapshot()]

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


class _ColocatedEngineClient:
    """EngineClient (serving/api.py) of a ServerDeployment: generation and info from the engine in this
    replica; metrics and reload from every replica's engine (one snapshot list per engine, as the
    split deployment's client gives)."""

    def __init__(self, owner: ServerDeployment):
        self._owner = owner

    def stream(self, request: dict[str, Any]) -> AsyncIterator[list[Event]]:
        return self._owner._engine().generate(request)

    async def info(self) -> dict[str, Any]:
        info = self._owner._engine().info()
        if info["scheduler"] == "stopped":
            raise EngineUnavailable("engine scheduler is not running")
        return {**info, "replica": self._owner.replica}

    async def snapshots(self) -> list[list[Metric]]:
        return [r for r in await self._owner._broadcast("engine_metrics_snapshot", 10) if isinstance(r, list)]

    async def reload(self) -> list[dict]:
        results = await self._owner._broadcast("engine_reload", 600)
        return [r if isinstance(r, dict) else {"error": str(r)[:300]} for r in results]
