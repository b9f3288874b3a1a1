"""The OpenAI-compatible HTTP API as a FastAPI app over an `EngineClient`.

`build_api` knows nothing about Ray: the ingress deployment passes a client that reaches engine
replicas through a Serve handle; tests and `bench/` can pass `LocalEngineClient` (an in-process
engine). Endpoints:

    POST /v1/completions, /v1/chat/completions    (stream: true -> server-sent events, then [DONE])
    POST /v1/sessions                             a new server-held conversation (a server-generated id)
    GET  /v1/sessions                             this key's conversations
    POST /v1/sessions/{id}/messages               the server holds the history; send only the new message
    GET|DELETE /v1/sessions/{id}                  (owner only: another key gets 404)
    GET  /v1/models, /health, /metrics            (/health and /metrics need no API key; /health then says
                                                  only ok / not ok)
    POST /admin/reload                            re-resolve the model alias on every engine replica (admin key)

Who calls (serving/auth.py) decides whose conversations a request sees and which limits apply
(serving/limits.py); a store failure after generation never loses the answer (a warning header, or
an error event before [DONE]).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.core import Metric
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as P
from .chat_page import mount_chat_page
from .auth import Authenticator, Principal
from .config import ServeArgs
from .errors import APIError, bad_request
from .events import Delta, Event, Failed, Finished
from .limits import RateLimiter, check_memory, outside
from .metrics import CONTENT_TYPE, ClientTimer, Registry, render
from .store import ConversationStore, StoreConflict, StoreUnavailable

log = logging.getLogger("ctxmem.serving.api")
RETRY_WINDOW_S = 60.0  # keep retrying this long when the engine replica died before anything reached the client
RETRY_SLEEP_S = (0.25, 0.5, 1.0, 2.0)  # backoff while Serve replaces the replica
STORE_WARNING = "X-Ctxmem-Store-Warning"  # set when the answer could not be recorded in the store


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
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_error(_: Request, err: StoreUnavailable):
        log.error("conversation store: %s", err)
        return JSONResponse(APIError(503, "the conversation store is unavailable; retry later",
                                     code="store_unavailable").body(), status_code=503)

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
    async def health(request: Request):
        # only an admin key sees the details (model paths, replica ids); anyone else: ok / not ok
        who = api.authn.optional(request.headers.get("authorization"))
        detail = who is not None and who.admin
        try:
            info = await asyncio.wait_for(engine.info(), timeout=10)
        except Exception as err:  # noqa: BLE001
            body = {"status": "unavailable", "error": str(err)[:200]} if detail else {"status": "unavailable"}
            return JSONResponse(body, status_code=503)
        status, code = "ok", 200
        if isinstance(info, dict) and info.get("scheduler", "running") != "running":
            # the engine's loop died and is being restarted: requests queue meanwhile
            status, code = "degraded", 503
        body = {"status": status, "model": args.model_name, "engine": info} if detail else {"status": status}
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(await api.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        api.auth(request)
        info = await api.engine_info()  # the memory policy and chat template: what the chat page explains
        return {"object": "list", "data": [{"id": args.model_name, "object": "model", "created": api.created,
                                            "owned_by": "ctxmem", "memory": info.get("memory"),
                                            "chat_template": info.get("chat_template")}]}

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

    @app.post("/v1/sessions")
    async def session_create(request: Request):
        return await api.session_create(request)

    @app.get("/v1/sessions")
    async def session_list(request: Request):
        who = api.auth(request)
        rows = await asyncio.to_thread(store.list, who.name)
        return {"object": "list", "data": [_session(r) for r in rows]}

    @app.post("/v1/sessions/{sid}/messages")
    async def session_message(sid: str, request: Request):
        return await api.session_message(sid, request)

    @app.get("/v1/sessions/{sid}")
    async def session_get(sid: str, request: Request):
        who = api.auth(request)
        row = await api.own_session(who, sid)
        # usage: one entry per assistant message, in order (null for a turn stored without it)
        return {**_session(row), "messages": row["messages"], "usage": row["usage"]}

    @app.delete("/v1/sessions/{sid}")
    async def session_delete(sid: str, request: Request):
        who = api.auth(request)
        sid = P.session_id(sid, "session_id")
        if not await asyncio.to_thread(store.delete, who.name, sid):
            raise _no_session(sid)
        return {"id": sid, "object": "session.deleted", "deleted": True}

    @app.post("/admin/reload")
    async def reload(request: Request):
        api.authn.require_admin(api.auth(request))
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
    if path.startswith("/v1/sessions"):
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
        self.authn = Authenticator(args)
        # a store that can hold shared counters (Redis) counts rates for every replica; else this replica does
        shared = getattr(store, "rate_limiter", None)
        self.rates = shared() if shared else RateLimiter()

    # -- guards --
    def auth(self, request: Request) -> Principal:
        return self.authn.principal(request.headers.get("authorization"))

    async def own_session(self, who: Principal, sid: str) -> dict[str, Any]:
        """The caller's conversation `sid`, or 404 - the same 404 whether it never existed or is another key's."""
        sid = P.session_id(sid, "session_id")
        row = await asyncio.to_thread(self.store.get, who.name, sid)
        if row is None:
            raise _no_session(sid)
        return row

    def check_room(self, who: Principal, row: dict[str, Any] | None) -> None:
        """A conversation at its stored-token limit takes no new turn (serving/README.md, Limits)."""
        cap = who.limits.max_conversation_tokens
        if row is not None and cap is not None and row["tokens"] >= cap:
            raise bad_request(f"the conversation {row['id']!r} holds {row['tokens']} tokens, at this key's limit "
                              f"of {cap} (max_conversation_tokens); start a new one with POST /v1/sessions",
                              param="session_id", code="conversation_too_long")

    def check_model(self, name: str, param: str = "model") -> None:
        if name != self.args.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.args.model_name!r}",
                           param=param, code="model_not_found")

    async def read_json(self, request: Request, allow_empty: bool = False) -> dict[str, Any]:
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
        return P.parse_json_body(bytes(body)) if body or not allow_empty else {}

    async def engine_info(self) -> dict:
        """What an engine replica says of itself (Engine.info); {} while no engine answers."""
        try:
            info = await asyncio.wait_for(self.engine.info(), timeout=5)
        except Exception:  # noqa: BLE001 - /v1/models still answers
            return {}
        return info if isinstance(info, dict) else {}

    async def memory(self) -> dict | None:
        """The engine's memory policy {policy, window, sinks, chunk} (the chat page's memory bar); None
        while no engine answers."""
        return (await self.engine_info()).get("memory")

    # -- generation --
    async def admit(self, who: Principal, payload: dict[str, Any]) -> None:
        """The server's limits on this request: the allowed memory knobs, the caller's rates."""
        memory = payload.get("memory")
        if outside(memory, self.args.request_memory):  # unless it restates the engine's own setting
            check_memory(memory, self.args.request_memory, await self.memory())
        self.rates.admit(who)

    async def generate(self, request: Request, kind: str):
        arrived = time.perf_counter()
        who = self.auth(request)
        data = await self.read_json(request)
        parse = P.parse_chat if kind == "chat" else P.parse_completion
        req, payload = parse(data, self.args.max_tokens_limit, self.args.default_max_tokens)
        self.check_model(req.model)
        sid = P.session_id(request.headers.get("x-session-id"))  # OpenAI's `user` never names a conversation
        record = None
        if sid is not None:
            payload["session_id"] = _engine_session(who, sid)
            if kind == "chat":  # the client holds the history; it is recorded as it now stands
                try:
                    self.check_room(who, await asyncio.to_thread(self.store.get, who.name, sid))
                except StoreUnavailable as err:  # the answer needs no store here: recording it will warn
                    log.error("conversation store: %s", err)
                messages, cap = payload["messages"], who.limits.max_conversations
                record = lambda text, end: self.store.put(  # noqa: E731
                    who.name, sid, messages + [{"role": "assistant", "content": text}], _stats(end), cap)
        await self.admit(who, payload)
        return await self.respond(who, payload, kind, req.stream, arrived, record)

    async def session_create(self, request: Request):
        """A new, empty conversation of the caller: {} -> a server-generated id; {"id": ...} -> that id."""
        who = self.auth(request)
        data = await self.read_json(request, allow_empty=True)
        unknown = set(data) - {"id"}
        if unknown:
            raise bad_request(f"unrecognized request argument supplied: {sorted(unknown)[0]}; send {{}} or "
                              "{\"id\": ...}", param=sorted(unknown)[0], code="unknown_parameter")
        sid = data.get("id")
        if sid is not None and not isinstance(sid, str):
            raise bad_request(f"id must be a string of {P.SESSION_ID_RULE}", param="id")
        sid = P.session_id(sid, "id") or P.new_session_id()
        try:
            row = await asyncio.to_thread(self.store.create, who.name, sid, who.limits.max_conversations)
        except StoreConflict:
            raise APIError(409, f"you already have a conversation {sid!r}; use it, delete it, or send no id to get "
                                "a new one", param="id", code="session_exists") from None
        return JSONResponse(_session(row), status_code=201)

    async def session_message(self, sid: str, request: Request):
        """The server holds the conversation: body = one message (+ the chat parameters)."""
        arrived = time.perf_counter()
        who = self.auth(request)
        sid = P.session_id(sid, "session_id")
        data = await self.read_json(request)
        if "messages" in data:
            raise bad_request("send one message as 'content' (and optionally 'role'); the server keeps the "
                              "history of this session", param="messages")
        message = {"role": data.pop("role", "user"), "content": data.pop("content", None)}
        if message["content"] is None:
            raise bad_request("missing required parameter: content", param="content",
                              code="missing_required_parameter")
        new = P.normalise_messages([message], param="content")[0]
        row = await self.own_session(who, sid)  # after the body's checks, which say the same to every key
        self.check_room(who, row)
        turns, history = row["turns"], row["messages"]
        data.setdefault("model", self.args.model_name)
        req, payload = P.parse_chat({**data, "messages": history + [new]}, self.args.max_tokens_limit,
                                    self.args.default_max_tokens)
        self.check_model(req.model)
        payload["session_id"] = _engine_session(who, sid)
        await self.admit(who, payload)

        def record(text: str, end: Finished) -> None:
            self.store.append(who.name, sid, turns, [new, {"role": "assistant", "content": text}], _stats(end),
                              who.limits.max_conversations)

        return await self.respond(who, payload, "chat", req.stream, arrived, record,
                                  session={"id": sid, "turns": turns + 1})

    async def respond(self, who: Principal, payload: dict, kind: str, stream: bool, arrived: float, record,
                      session=None):
        rid = P.new_id("chatcmpl" if kind == "chat" else "cmpl")
        created = int(time.time())
        model = self.args.model_name
        if not stream:
            text, end = await self.collect(payload, arrived)
            self.rates.charge(who, end.usage.prompt_tokens + end.usage.completion_tokens)
            warning = None
            if record is not None:
                warning = await self._record(record, text, end)
            body = (P.chat_response if kind == "chat" else P.completion_response)(rid, model, text, end, created)
            if session:
                body["session"] = session
            return JSONResponse(body, headers={STORE_WARNING: warning} if warning else None)
        first, events = await self.open_stream(payload)
        return StreamingResponse(self.sse(who, first, events, kind, rid, created, arrived, payload, record, session),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _record(self, record, text: str, end: Finished) -> str | None:
        """Store the turn; a 409 on a concurrent turn. A store that fails does not cost the client the
        answer: the warning to send with it is returned instead."""
        try:
            await asyncio.to_thread(record, text, end)
        except StoreConflict as err:
            raise APIError(409, f"{err}; another turn was added concurrently - fetch the session and retry",
                           code="session_conflict") from None
        except Exception as err:  # noqa: BLE001 - StoreUnavailable, or any store bug: the answer goes out
            log.error("the answer was not recorded in the conversation store: %s", err)
            return "the conversation store failed; this turn was not recorded - resend it to keep it"
        return None

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

    async def sse(self, who, first, events, kind, rid, created, arrived, payload, record, session):
        """The SSE body: one write per message of the engine (its deltas as one chunk each, the end - last
        chunk, usage, [DONE] - together), so every hop after the engine carries as few messages as it does."""
        include_usage = payload.get("include_usage", False)
        chunk = _Chunks(kind, rid, self.args.model_name, created)
        timer = ClientTimer(self.metrics, arrived)
        text: list[str] = []
        out: list[bytes] = [chunk.role()] if kind == "chat" else []
        try:
            async for message in _chain(first, events):
                for ev in message:
                    if isinstance(ev, Delta):
                        timer.tokens(ev.tokens)
                        if ev.text:
                            text.append(ev.text)
                            out.append(chunk.text(ev.text))
                    elif isinstance(ev, Finished):
                        timer.done(ev.usage.prompt_tokens, ev.usage.completion_tokens)
                        self.rates.charge(who, ev.usage.prompt_tokens + ev.usage.completion_tokens)
                        warning = None
                        if record is not None:
                            try:
                                warning = await self._record(record, "".join(text), ev)
                            except APIError as err:  # the 409 of a concurrent turn
                                out += [P.sse(err.body()), P.DONE]
                                yield b"".join(out)
                                return
                        usage = P.usage(ev)
                        out.append(chunk.last(ev.finish_reason, None if include_usage else usage, session))
                        if include_usage:
                            out.append(chunk.usage(usage))
                        if warning:  # the answer is complete above; the client learns it was not stored
                            out.append(P.sse(APIError(503, warning, code="store_unavailable").body()))
                        out.append(P.DONE)
                        yield b"".join(out)
                        return
                    elif isinstance(ev, Failed):
                        out += [P.sse(APIError.from_event(ev).body()), P.DONE]
                        yield b"".join(out)
                        return
                if out:
                    yield b"".join(out)
                    out = []
            out += [P.sse(APIError(500, "the engine ended the stream early", code="engine_failure").body()), P.DONE]
            yield b"".join(out)
        except EngineUnavailable:
            out += [P.sse(APIError(503, "the engine replica went away mid-stream; retry this turn",
                                   code="engine_unavailable").body()), P.DONE]
            yield b"".join(out)

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


class _Chunks:
    """The SSE chunks of one streamed response. Everything but the text is the same in every chunk of a
    stream, so it is serialised once: a text chunk is a prefix, the JSON string of the text, a suffix
    (what `P.sse(P.completion_chunk(...))` / `P.chat_chunk` write, byte for byte)."""

    def __init__(self, kind: str, rid: str, model: str, created: int):
        self.kind, self.rid, self.model, self.created = kind, rid, model, created
        self.build = P.chat_chunk if kind == "chat" else P.completion_chunk
        marker = "\x00"  # a text that cannot occur in the rest of the chunk's JSON, split around
        whole = P.dumps(self.build(rid, model, created, {"content": marker} if kind == "chat" else marker))
        self.head, self.tail = whole.rsplit(P.dumps(marker), 1)  # the text is the last string but the nulls

    def text(self, text: str) -> bytes:
        return f"data: {self.head}{P.dumps(text)}{self.tail}\n\n".encode()

    def role(self) -> bytes:
        return P.sse(self.build(self.rid, self.model, self.created, {"role": "assistant", "content": ""}))

    def last(self, finish_reason: str, usage: dict | None, session: dict | None) -> bytes:
        body = self.build(self.rid, self.model, self.created, {} if self.kind == "chat" else "", finish_reason, usage)
        if session:
            body["session"] = session
        return P.sse(body)

    def usage(self, usage: dict) -> bytes:
        return P.sse(self.build(self.rid, self.model, self.created, {}, None, usage, empty=True))


def _no_session(sid: str) -> APIError:
    return APIError(404, f"no conversation {sid!r} for this API key; list yours with GET /v1/sessions or create "
                         "one with POST /v1/sessions", param="session_id", code="session_not_found")


def _session(row: dict[str, Any]) -> dict[str, Any]:
    """What the API shows of a stored conversation (without its messages)."""
    return {"id": row["id"], "object": "session", "created": int(row["created"]), "last_used": int(row["updated"]),
            "turns": row["turns"], "title": row["title"], "tokens": row["tokens"]}


def _engine_session(who: Principal, sid: str) -> str:
    """The engine's KV-cache key of a conversation: per owner, so two keys' equal ids never share state."""
    return f"{who.name}/{sid}"


def _stats(end: Finished) -> dict:
    """What the conversation store keeps about a turn (JSON): its usage as the response showed it
    (`GET /v1/sessions/{id}` gives it back per turn), and why it ended."""
    return {"usage": P.usage(end), "finish_reason": end.finish_reason}
