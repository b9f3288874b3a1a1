"""The OpenAI wire format: request parsing and validation, response and stream-chunk builders.

Requests are parsed by hand from the raw body (size cap, strict UTF-8, no NaN/Infinity, an object at
the top) and then validated by pydantic models with `extra="forbid"`, so every malformed request
becomes one APIError (HTTP 4xx) that names the offending parameter. Parameters OpenAI defines but
ctxmem does not implement are accepted at their neutral value and rejected otherwise, never ignored.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .errors import bad_request
from .events import Finished

ROLES = ("system", "user", "assistant")  # ctxmem.chat_template.ChatTemplate's roles
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for system prompts
MAX_STOP = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # per stop string
SEED_MAX = 2**63 - 1  # OpenAI documents seed as a signed 64-bit integer
TOP_K_MAX = 2**31 - 1  # values at or above the vocabulary keep every token
REPETITION_PENALTY_MAX = 100.0

# What each sampling parameter accepts, as the messages and serving/README.md's table say it.
RANGES = {
    "max_tokens": "an integer from 1 to this server's max_tokens_limit",
    "max_completion_tokens": "an integer from 1 to this server's max_tokens_limit",
    "temperature": "a number in [0, 2] (0 = greedy)",
    "top_p": "a number in (0, 1] (1 = off)",
    "top_k": f"an integer in [0, {TOP_K_MAX}] (0 = off)",
    "repetition_penalty": f"a number in (0, {REPETITION_PENALTY_MAX:g}] (1 = off)",
    "seed": "an integer in [0, 2**63-1]",
    "stop": f"a string or a list of up to {MAX_STOP} strings of 1 to {MAX_STOP_CHARS} characters",
}
# A session id: what `POST /v1/sessions` generates, or a client's own (X-Session-Id, the URL). Matched
# whole (fullmatch: `$` would let a trailing newline through).
SESSION_ID = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
SESSION_ID_RULE = "1-128 characters of letters, digits and ._:@+=-"
USER_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,256}")  # OpenAI's `user`: an end-user id, never a session


# ---- value types ---------------------------------------------------------------------------------
def _int(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"must be an integer, got {type(v).__name__}")
    return v


def _number(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError("must be a finite number")
    return float(v)


def _bool(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"must be a boolean, got {type(v).__name__}")
    return v


def _str(v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError(f"must be a string, got {type(v).__name__}")
    return v


Int = Annotated[int, BeforeValidator(_int)]
Number = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_bool)]
Str = Annotated[str, BeforeValidator(_str)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    n: Int = 1
    stream: Bool = False
    stream_options: dict[str, Any] | None = None
    stop: Str | list[Str] | None = None
    seed: Int | None = Field(default=None, ge=0, le=SEED_MAX)
    user: Str | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[str, Any] | None = None
    # accepted and ignored (bookkeeping fields of the OpenAI API)
    metadata: dict[str, Any] | None = None
    store: Bool | None = None
    service_tier: Str | None = None
    # ctxmem extras (`extra_body=` in the openai client)
    top_k: Int | None = Field(default=None, ge=0, le=TOP_K_MAX)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=REPETITION_PENALTY_MAX)
    policy: Literal["full", "sink", "recompute", "retrieve"] | None = None
    window: Int | None = Field(default=None, ge=1)
    sinks: Int | None = Field(default=None, ge=0)
    budget: Int | None = Field(default=None, ge=0)  # retrieve: evicted tokens put back at most
    ignore_eos: Bool = False  # generate exactly max_tokens (benchmarks), as vLLM's extension


class CompletionRequest(_Req):
    prompt: Str | list[Str] | list[Int] | list[list[Int]]
    echo: Bool = False
    logprobs: Int | None = None
    best_of: Int | None = None
    suffix: Str | None = None


class ChatCompletionRequest(_Req):
    messages: list[dict[str, Any]]
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: Bool | None = None
    top_logprobs: Int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: Bool | None = None
    response_format: dict[str, Any] | None = None


# ---- parsing -------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, or a 400 that says what is wrong with them."""
    if not raw:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})",
                          code="invalid_json") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise bad_request(f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


def validate(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        # for unions pydantic appends the member type tried; keep the user's field path only
        param = ".".join(p for p in loc if not (p[:1].islower() and ("[" in p or p in _TYPE_TAGS))) or None
        kind = first.get("type", "")
        if kind == "extra_forbidden":
            msg = f"unrecognized request argument supplied: {param}"
            code = "unknown_parameter"
        elif kind == "missing":
            msg = f"missing required parameter: {param}"
            code = "missing_required_parameter"
        else:
            msg = f"invalid value for {param}: {first.get('msg', 'invalid')}"
            if param in RANGES:
                msg = (f"invalid value for {param}: {_shown(first.get('input'))} ({first.get('msg', 'invalid')}); "
                       f"send {RANGES[param]}")
            code = "invalid_value"
        raise bad_request(msg, param=param, code=code) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-before", "function-after"}


def _common(req: _Req, limit: int, default_max_tokens: int, max_tokens: int | None,
            max_tokens_param: str = "max_tokens") -> dict[str, Any]:
    if req.n != 1:
        raise bad_request("only n=1 is supported", param="n")
    if req.user is not None and not USER_ID.fullmatch(req.user):
        raise bad_request("invalid value for user: send an end-user id of 1-256 letters, digits or ._:@/+=- "
                          "(it is not stored; X-Session-Id names a conversation)", param="user")
    if req.presence_penalty or req.frequency_penalty:
        raise bad_request("presence_penalty/frequency_penalty are not supported; use repetition_penalty",
                          param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(f"{max_tokens_param}={max_tokens} is above this server's limit of {limit}; "
                          f"send at most {limit}", param=max_tokens_param)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        longest = max(len(s) for s in stop)
        raise bad_request(f"invalid value for stop: {len(stop)} strings, the longest {longest} characters; "
                          f"send {RANGES['stop']}", param="stop")
    if req.stream_options is not None:
        if not req.stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")
        if set(req.stream_options) - {"include_usage", "include_obfuscation"} or \
                not isinstance(req.stream_options.get("include_usage", False), bool):
            raise bad_request("stream_options accepts include_usage (a boolean)", param="stream_options")
    memory = {k: v for k, v in dict(policy=req.policy, window=req.window, sinks=req.sinks,
                                    budget=req.budget).items() if v is not None}
    gen = {k: v for k, v in dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                 repetition_penalty=req.repetition_penalty, seed=req.seed).items() if v is not None}
    gen["max_new_tokens"] = max_tokens if max_tokens is not None else min(default_max_tokens, limit)
    if req.ignore_eos:
        gen["stop_token_ids"] = []
    gen["stop"] = stop
    return {"generation": gen, "memory": memory or None,
            "include_usage": bool((req.stream_options or {}).get("include_usage", False))}


def parse_completion(data: dict[str, Any], limit: int, default_max_tokens: int) -> tuple[CompletionRequest, dict]:
    req = validate(CompletionRequest, data)
    if req.echo:
        raise bad_request("echo is not supported", param="echo")
    if req.logprobs not in (None, 0):
        raise bad_request("logprobs are not supported", param="logprobs")
    if req.best_of not in (None, 1):
        raise bad_request("only best_of=1 is supported", param="best_of")
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    prompt: Any = req.prompt
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("prompt must not be an empty list", param="prompt")
        if isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request("one prompt per request (n=1); send the others as separate requests",
                                  param="prompt")
            prompt = prompt[0]
    body = _common(req, limit, default_max_tokens, req.max_tokens)
    return req, {"kind": "completion", "prompt": prompt, **body}


def parse_chat(data: dict[str, Any], limit: int, default_max_tokens: int) -> tuple[ChatCompletionRequest, dict]:
    req = validate(ChatCompletionRequest, data)
    if req.logprobs or req.top_logprobs:
        raise bad_request("logprobs are not supported", param="logprobs")
    if req.tools:
        raise bad_request("tools are not supported by this model", param="tools")
    if req.tool_choice not in (None, "none", "auto"):
        raise bad_request("tool_choice is not supported", param="tool_choice")
    if req.response_format not in (None, {"type": "text"}):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format")
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise bad_request("max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
    messages = normalise_messages(req.messages)
    body = _common(req, limit, default_max_tokens, req.max_completion_tokens or req.max_tokens,
                   "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    return req, {"kind": "chat", "messages": messages, **body}


def normalise_messages(messages: list[Any], param: str = "messages") -> list[dict[str, str]]:
    """OpenAI messages -> [{"role", "content": str}] with our roles; multi-part text is joined."""
    if not messages:
        raise bad_request("messages must be a non-empty list", param=param)
    out = []
    for i, m in enumerate(messages):
        where = f"{param}[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", param=where)
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise bad_request(f"{where} has unsupported fields {sorted(unknown)}", param=where)
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise bad_request(f"{where}.role is {m.get('role')!r}; the roles are system, user, assistant",
                              param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise bad_request(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                                      param=f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        if "name" in m and not isinstance(m["name"], str):
            raise bad_request(f"{where}.name must be a string", param=f"{where}.name")
        out.append({"role": role, "content": content})
    return out


def session_id(sid: str | None, param: str = "X-Session-Id") -> str | None:
    """A client's session id (header or URL), checked whole; None passes (no session)."""
    if sid is None:
        return None
    if not SESSION_ID.fullmatch(sid):
        raise bad_request(f"invalid session id {_shown(sid)}: send {SESSION_ID_RULE} (or create one with "
                          "POST /v1/sessions)", param=param, code="invalid_session_id")
    return sid


def new_session_id() -> str:
    return f"sess-{uuid.uuid4().hex}"


# ---- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(end: Finished) -> dict[str, Any]:
    """OpenAI usage + prompt_tokens_details.cached_tokens (KV reuse) + evicted_tokens (the window);
    under the retrieve policy also recalled_tokens and recalled: the evicted tokens put back while
    the reply was generated, [{start, tokens, text}] (start: index in the conversation's tokens)."""
    u = end.usage
    out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
           "evicted_tokens": u.evicted_tokens}
    if u.recalled is not None:
        out["recalled_tokens"] = u.recalled_tokens
        out["recalled"] = [{"start": r.start, "tokens": r.tokens, "text": r.text} for r in u.recalled]
    return out


def completion_response(rid: str, model: str, text: str, end: Finished, created: int | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}],
            "usage": usage(end)}


def chat_response(rid: str, model: str, text: str, end: Finished, created: int | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": end.finish_reason}],
            "usage": usage(end)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     usage_: dict | None = None, empty: bool = False) -> dict:
    choices = [] if empty else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage_: dict | None = None, empty: bool = False) -> dict:
    choices = [] if empty else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def dumps(value: Any) -> str:
    """JSON as every response and stream chunk writes it: compact, UTF-8 text kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else dumps(data)}\n\n".encode()


DONE = sse("[DONE]")
