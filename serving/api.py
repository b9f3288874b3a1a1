"""The OpenAI-compatible HTTP API as a FastAPI app over an `EngineClient`.

`build_api` knows nothing about Ray: the ingress deployment passes a client that reaches engine
replicas through a Serve handle; tests and `bench/` can pass `LocalEngineClient` (an in-process
engine). Endpoints:

    POST /v1/completions, /v1/chat/completions    (stream: true -> server-sent events, then [DONE])
    POST /v1/sessions/{id}/messages               the server holds the history; send only the new message
    GET|DELETE /v1/sessions/{id}
    GET  /v1/models, /health, /metrics            (/health and /metrics need no API key)
    POST /admin/reload                            re-resolve the model alias on every engine replica
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import asdict
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import Metric
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .chat_page import mount_chat_page
from .config import ServeArgs, hash_key
from .errors import APIError, bad_request
from .events import Delta, Event, Failed, Finished
from .metrics import CONTENT_TYPE, ClientTimer, Registry, render
from .store import ConversationStore, StoreConflict

log = logging.getLogger("ctxmem.serving.api")
RETRY_WINDOW_S = 60.0  # keep retrying this long when the engine replica died before anything reached the client
RETRY_SLEEP_S = (0.25, 0.5, 1.0, 2.0)  # backoff while Serve replaces the replica


class EngineUnavailable(Exception):
    """The engine replica died or could not be reached; safe to retry if nothing was sent yet."""


class EngineClient(Protocol):
    def stream(self, request: dict[str, Any]) -> AsyncIterator[list[Event]]: ...
    async def info(self) -> dict[str, Any]: ...
    async def snapshots(self) -> list[list[Metric]]: ...  # one metrics snapshot per engine replica
    async def reload(self) -> list[dict]: ...


class LocalEngineClient:
    """An Engine in this process (tests, bench, development)."""

    def __init__(self, engine):
        self.engine = engine

    def stream(self, request):
        return self.engine.generate(request)

    async def info(self):
        info = self.engine.info()
        if info["scheduler"] == "stopped":
            raise EngineUnavailable("engine scheduler is not running")
        return info

    async def snapshots(self):
        return [self.engine.metrics.snapshot()]

    async def reload(self):
        return [await asyncio.to_thread(self.engine.reload)]


def build_api(engine: EngineClient, args: ServeArgs, store: ConversationStore, metrics: Registry | None = None,
              peer_snapshots: Callable[[], Awaitable[list[list[Metric]]]] | None = None) -> FastAPI:
    """args must be resolved (`ServeArgs.resolve()`): model_name and key hashes filled in."""
    metrics = metrics or Registry()
    app = FastAPI(title="ctxmem", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    api = _API(engine, args, store, metrics, peer_snapshots)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 404:
            msg = f"unknown request URL: {request.method} {request.url.path}"
        elif err.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(err.detail)
        return JSONResponse(APIError(err.status_code, msg, code=None).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError):
        return JSONResponse(bad_request(f"invalid request: {err.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}", code="internal_error").body(),
                            status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.get("/health")
    async def health():
        try:
            info = await asyncio.wait_for(engine.info(), timeout=10)
        except Exception as err:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "error": str(err)[:200]}, status_code=503)
        if isinstance(info, dict) and info.get("scheduler", "running") != "running":
            # the engine's loop died and is being restarted: requests queue meanwhile
            return JSONResponse({"status": "degraded", "model": args.model_name, "engine": info}, status_code=503)
        return {"status": "ok", "model": args.model_name, "engine": info}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(await api.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        api.auth(request)
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "created": api.created,
                                            "owned_by": "ctxmem", "memory": await api.memory()}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        api.auth(request)
        api.check_model(model_id, param="model_id")
        return {"id": args.model_name, "object": "model", "created": api.created, "owned_by": "ctxmem"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await api.generate(request, "chat")

    @app.post("/v1/sessions/{sid}/messages")
    async def session_message(sid: str, request: Request):
        return await api.session_message(sid, request)

    @app.get("/v1/sessions/{sid}")
    async def session_get(sid: str, request: Request):
        api.auth(request)
        sid = P.session_id(sid, None)
        row = await asyncio.to_thread(store.get, sid)
        if row is None:
            raise APIError(404, f"no conversation {sid!r}", param="session_id", code="session_not_found")
        return {"id": sid, "object": "session", "turns": row["turns"], "messages": row["messages"]}

    @app.delete("/v1/sessions/{sid}")
    async def session_delete(sid: str, request: Request):
        api.auth(request)
        sid = P.session_id(sid, None)
        deleted = await asyncio.to_thread(store.delete, sid)
        if not deleted:
            raise APIError(404, f"no conversation {sid!r}", param="session_id", code="session_not_found")
        return {"id": sid, "object": "session.deleted", "deleted": True}

    @app.post("/admin/reload")
    async def reload(request: Request):
        api.auth(request)
        return {"replicas": await engine.reload()}

    mount_chat_page(app)  # GET / : the chat page (serving/chat_page.py)
    return app


class _CountRequests:
    """ctxmem_requests_total by endpoint and status, as plain ASGI: Starlette's BaseHTTPMiddleware
    would pipe every streamed chunk through an extra memory stream."""

    def __init__(self, app, metrics: Registry):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.inc("ctxmem_requests_total", labels={"endpoint": _endpoint(scope["path"]),
                                                              "status": str(status[0])})


def _endpoint(path: str) -> str:
    if path.startswith("/v1/sessions/"):
        return "/v1/sessions"
    if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin/reload"):
        return path
    return "other"


class _API:
    def __init__(self, engine: EngineClient, args: ServeArgs, store: ConversationStore, metrics: Registry,
                 peer_snapshots):
        self.engine, self.args, self.store, self.metrics = engine, args, store, metrics
        self.peer_snapshots = peer_snapshots
        self.created = int(time.time())

    # -- guards --
    def auth(self, request: Request) -> None:
        if not self.args.api_key_hashes:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
        digest = hash_key(token.strip())
        if not any(hmac.compare_digest(digest, h) for h in self.args.api_key_hashes):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def check_model(self, name: str, param: str = "model") -> None:
        if name != self.args.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.args.model_name!r}",
                           param=param, code="model_not_found")

    async def read_json(self, request: Request) -> dict[str, Any]:
        limit = self.args.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("invalid Content-Length header", code="invalid_request")
            if int(length) > limit:
                raise APIError(413, f"request body of {length} bytes is over the limit of {limit}",
                               code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes", code="request_too_large")
        return P.parse_json_body(bytes(body))

    async def memory(self) -> dict | None:
        """The engine's memory policy {policy, window, sinks, chunk} (the chat page's memory bar); None
        while no engine answers."""
        try:
            info = await asyncio.wait_for(self.engine.info(), timeout=5)
        except Exception:  # noqa: BLE001 - /v1/models still answers
            return None
        return info.get("memory") if isinstance(info, dict) else None

    # -- generation --
    async def generate(self, request: Request, kind: str):
        arrived = time.perf_counter()
        self.auth(request)
        data = await self.read_json(request)
        parse = P.parse_chat if kind == "chat" else P.parse_completion
        req, payload = parse(data, self.args.max_tokens_limit, self.args.default_max_tokens)
        self.check_model(req.model)
        payload["session_id"] = P.session_id(request.headers.get("x-session-id"), req.user)
        record = None
        if kind == "chat" and payload["session_id"] is not None:
            sid, messages = payload["session_id"], payload["messages"]
            record = lambda text, end: self.store.put(  # noqa: E731
                sid, messages + [{"role": "assistant", "content": text}], _stats(end))
        return await self.respond(payload, kind, req.stream, arrived, record)

    async def session_message(self, sid: str, request: Request):
        """The server holds the conversation: body = one message (+ the chat parameters)."""
        arrived = time.perf_counter()
        self.auth(request)
        sid = P.session_id(sid, None)
        data = await self.read_json(request)
        if "messages" in data:
            raise bad_request("send one message as 'content' (and optionally 'role'); the server keeps the "
                              "history of this session", param="messages")
        message = {"role": data.pop("role", "user"), "content": data.pop("content", None)}
        if message["content"] is None:
            raise bad_request("missing required parameter: content", param="content",
                              code="missing_required_parameter")
        new = P.normalise_messages([message], param="content")[0]
        row = await asyncio.to_thread(self.store.get, sid)
        turns = row["turns"] if row else 0
        history = row["messages"] if row else []
        data.setdefault("model", self.args.model_name)
        req, payload = P.parse_chat({**data, "messages": history + [new]}, self.args.max_tokens_limit,
                                    self.args.default_max_tokens)
        self.check_model(req.model)
        payload["session_id"] = sid

        def record(text: str, end: Finished) -> None:
            self.store.append(sid, turns, [new, {"role": "assistant", "content": text}], _stats(end))

        return await self.respond(payload, "chat", req.stream, arrived, record, session={"id": sid, "turns": turns + 1})

    async def respond(self, payload: dict, kind: str, stream: bool, arrived: float, record, session=None):
        rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = int(time.time())
        model = self.args.model_name
        if not stream:
            text, end = await self.collect(payload, arrived)
            if record is not None:
                await self._record(record, text, end)
            body = (P.chat_response if kind == "chat" else P.completion_response)(rid, model, text, end, created)
            if session:
                body["session"] = session
            return JSONResponse(body)
        first, events = await self.open_stream(payload)
        return StreamingResponse(self.sse(first, events, kind, rid, created, arrived, payload, record, session),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _record(self, record, text: str, end: Finished) -> None:
        try:
            await asyncio.to_thread(record, text, end)
        except StoreConflict as err:
            raise APIError(409, f"{err}; another turn was added concurrently - fetch the session and retry",
                           code="session_conflict") from None

    async def open_stream(self, payload: dict) -> tuple[list[Event], AsyncIterator[list[Event]]]:
        """The engine's first events (raising their error as HTTP status) and the rest of the stream."""
        retry = _Retry()
        while True:
            events = self.engine.stream(payload)
            try:
                first = await events.__anext__()
            except EngineUnavailable as err:
                await retry.wait(err)
                continue
            except StopAsyncIteration:
                raise APIError(500, "the engine ended the stream without an answer", code="engine_failure") from None
            if first and isinstance(first[0], Failed):
                raise APIError.from_event(first[0])
            return first, events

    async def collect(self, payload: dict, arrived: float) -> tuple[str, Finished]:
        retry = _Retry()
        while True:
            try:
                first, events = await self.open_stream(payload)
                text, end = [], None
                timer = ClientTimer(self.metrics, arrived)
                async for chunk in _chain(first, events):
                    for ev in chunk:
                        if isinstance(ev, Delta):
                            timer.tokens(ev.tokens)
                            text.append(ev.text)
                        elif isinstance(ev, Finished):
                            end = ev
                        elif isinstance(ev, Failed):
                            raise APIError.from_event(ev)
                if end is None:
                    raise EngineUnavailable("stream ended early")
                timer.done(end.usage.prompt_tokens, end.usage.completion_tokens)
                return "".join(text), end
            except EngineUnavailable as err:
                # nothing reached the client yet: the turn is rebuilt from the request on another replica
                await retry.wait(err)

    async def sse(self, first, events, kind, rid, created, arrived, payload, record, session):
        model = self.args.model_name
        include_usage = payload.get("include_usage", False)
        chunk_fn = P.chat_chunk if kind == "chat" else P.completion_chunk
        timer = ClientTimer(self.metrics, arrived)
        text: list[str] = []
        if kind == "chat":
            yield P.sse(P.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}))
        try:
            async for chunk in _chain(first, events):
                for ev in chunk:
                    if isinstance(ev, Delta):
                        timer.tokens(ev.tokens)
                        if ev.text:
                            text.append(ev.text)
                            body = {"content": ev.text} if kind == "chat" else ev.text
                            yield P.sse(chunk_fn(rid, model, created, body))
                    elif isinstance(ev, Finished):
                        timer.done(ev.usage.prompt_tokens, ev.usage.completion_tokens)
                        if record is not None:
                            try:
                                await asyncio.to_thread(record, "".join(text), ev)
                            except StoreConflict as err:
                                yield P.sse(APIError(409, str(err), code="session_conflict").body())
                                yield P.DONE
                                return
                        usage = P.usage(ev)
                        last = chunk_fn(rid, model, created, {} if kind == "chat" else "", ev.finish_reason,
                                        None if include_usage else usage)
                        if session:
                            last["session"] = session
                        yield P.sse(last)
                        if include_usage:
                            yield P.sse(chunk_fn(rid, model, created, {}, None, usage, empty=True))
                        yield P.DONE
                        return
                    elif isinstance(ev, Failed):
                        yield P.sse(APIError.from_event(ev).body())
                        yield P.DONE
                        return
            yield P.sse(APIError(500, "the engine ended the stream early", code="engine_failure").body())
            yield P.DONE
        except EngineUnavailable:
            yield P.sse(APIError(503, "the engine replica went away mid-stream; retry this turn",
                                 code="engine_unavailable").body())
            yield P.DONE

    # -- metrics --
    async def metrics_text(self) -> bytes:
        """Every ingress and engine replica's metrics, summed, in the Prometheus text format."""
        ingress = await self.peer_snapshots() if self.peer_snapshots else [self.metrics.snapshot()]
        try:
            engines = await asyncio.wait_for(self.engine.snapshots(), timeout=10)
        except Exception as err:  # noqa: BLE001 - still show the ingress side
            log.warning("engine metrics unavailable: %s", err)
            engines = []
        engines = [e for e in engines if isinstance(e, list)]
        return render([*ingress, *engines], engine_replicas=len(engines))


class _Retry:
    """Backoff while Serve replaces a dead engine replica; 503 once RETRY_WINDOW_S is spent."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RETRY_WINDOW_S
        self.attempt = 0

    async def wait(self, err: Exception) -> None:
        if time.monotonic() >= self.deadline:
            raise APIError(503, f"the engine is unavailable ({err}); retry later", code="engine_unavailable") from None
        log.warning("engine unavailable (%s); retrying", err)
        await asyncio.sleep(RETRY_SLEEP_S[min(self.attempt, len(RETRY_SLEEP_S) - 1)])
        self.attempt += 1


async def _chain(first: list[Event], rest: AsyncIterator[list[Event]]) -> AsyncIterator[list[Event]]:
    yield first
    async for chunk in rest:
        yield chunk


def _stats(end: Finished) -> dict:
    """What the conversation store keeps about a turn (JSON)."""
    return {"usage": asdict(end.usage), "finish_reason": end.finish_reason}
