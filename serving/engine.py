"""The serving engine: a continuous (iteration-level) batcher over ContextMemory + SequenceDecoder.

One scheduler thread owns the model. Each iteration it

1. admits waiting requests while the running batch has room (`max_batch_size`) and the step's prompt
   budget lasts (`prefill_token_budget`); each new sequence is prefilled on its own - from the KV state
   of its conversation when this replica still holds it, so only the new tokens run - samples its first
   token and is merged into the running batch (`ContextMemory.merge` left-pads the caches);
2. runs one decode step for the whole running batch (one forward per memory policy in use);
3. lets finished or cancelled sequences leave (`ContextMemory.select`), keeping the KV state of those
   that belong to a conversation in a bounded LRU (`SessionCache`).

Sampling, detokenisation and stop rules stay in `ctxmem.generation.SequenceDecoder`; eviction stays in
`ctxmem.memory.ContextMemory`. Nothing here imports Ray: `ctxmem.serving.deployments` wraps `Engine` in a
Ray Serve replica, tests and `bench/` drive it directly.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from ctxmem.generation import Generator, SequenceDecoder
from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError, MemoryState
from ctxmem.sampling import GenerationConfig, GenerationConfigError

from .config import EngineConfig, MemoryOverrides
from .errors import APIError, bad_request
from .metrics import Registry

log = logging.getLogger("ctxmem.serving.engine")


# ---- model loading -------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A generator plus what the scheduler needs to know about it."""

    spec: str
    path: Path
    generator: Generator
    kind: str  # "onnx" (ONNX Runtime, production) or "torch" (checkpoint fallback)
    provider: str  # "cpu" or "cuda"
    memory: MemoryConfig  # the server's default policy for this model, resolved
    version: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def template(self):
        from ctxmem.chat_template import ChatTemplate

        if not hasattr(self, "_template"):
            self._template = ChatTemplate(self.generator.tokenizer)
        return self._template


def resolve_spec(spec: str, tracking_uri: str | None = None) -> Path:
    """An export/checkpoint dir, runs:/... or models:/NAME@ALIAS -> a local directory. Registry specs
    are looked up now (an alias moves when a new champion is promoted) and downloaded once per version."""
    if spec.startswith(("models:/", "runs:/")):
        from ctxmem.export.registry import resolve_model

        return Path(resolve_model(spec, tracking_uri=tracking_uri))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r} is not a directory; pass an export dir, a checkpoint dir, "
                                "runs:/RUN_ID/PATH or models:/NAME@ALIAS")
    return path


def pick_provider(setting: str) -> str:
    """auto: CUDA where ONNX Runtime offers it, else CPU."""
    if setting != "auto":
        return setting
    try:
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    except ImportError:
        return "cpu"


def server_memory(generator: Generator, overrides: MemoryOverrides | None) -> MemoryConfig:
    """The model's saved policy, upgraded from 'full' to a window so long conversations never fail,
    then the server's overrides."""
    base = generator.memory_config
    if base.policy == "full" and not (overrides and overrides.policy == "full"):
        base = MemoryConfig(policy="sink" if generator.backend.uses_rope else "recompute")
    if overrides:
        given = {k: v for k, v in overrides.model_dump().items() if v is not None}
        if given.get("policy", base.policy) != base.policy:
            base = MemoryConfig(policy=given["policy"])
        base = replace(base, **given)
    return ContextMemory(generator.backend, base).config


def load_model(config: EngineConfig) -> LoadedModel:
    """Export dir (has model.onnx) -> ONNX Runtime; checkpoint dir (model.safetensors) -> PyTorch."""
    path = resolve_spec(config.model, config.tracking_uri)
    provider = pick_provider(config.provider)
    threads = config.intra_op_threads or (1 if provider == "cpu" else None)
    if (path / "model.onnx").exists():
        from ctxmem.export.runtime import load_onnx_generator

        # auto -> None: the runtime picks CUDA when present and reads back what actually runs
        generator = load_onnx_generator(path, provider=None if config.provider == "auto" else provider,
                                        intra_op_threads=threads or 1)
        running = getattr(generator.backend, "provider", "CPUExecutionProvider")
        provider = "cuda" if running.startswith("CUDA") else "cpu"
        kind = "onnx"
    elif (path / "model.safetensors").exists():
        import torch

        from ctxmem.generation import load_generator

        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if provider == "cuda" and torch.cuda.is_available() else "cpu"
        provider = "cuda" if device == "cuda" else "cpu"
        generator = load_generator(path, device=device)
        kind = "torch"
    else:
        raise FileNotFoundError(f"{path} holds neither model.onnx (an export) nor model.safetensors (a checkpoint)")
    memory = server_memory(generator, config.memory)
    log.info("loaded %s from %s (%s, provider=%s, intra_op_threads=%s, policy=%s window=%s sinks=%s)",
             config.model, path, kind, provider, threads, memory.policy, memory.window, memory.sinks)
    return LoadedModel(config.model, path, generator, kind, provider, memory)


# ---- conversation KV states ----------------------------------------------------------------------
def past_nbytes(past: Any) -> int:
    if past is None:
        return 0
    return int(sum(k.nbytes + v.nbytes for k, v in past))  # numpy arrays and torch tensors alike


@dataclass
class CachedConversation:
    version: str  # the model it was computed with
    memory: MemoryConfig
    history: list[int]  # every token fed into `state`, in order
    state: MemoryState  # batch of 1
    nbytes: int


class SessionCache:
    """LRU of conversation states, bounded in entries and bytes. `take` removes the entry: one
    request owns a state at a time, and puts it back (extended) when it finishes."""

    def __init__(self, max_bytes: int, max_entries: int):
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._items: OrderedDict[str, CachedConversation] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, sid: str) -> CachedConversation | None:
        with self._lock:
            item = self._items.pop(sid, None)
            if item is not None:
                self.nbytes -= item.nbytes
            return item

    def put(self, sid: str, item: CachedConversation) -> None:
        with self._lock:
            old = self._items.pop(sid, None)
            if old is not None:
                self.nbytes -= old.nbytes
            if item.nbytes > self.max_bytes or self.max_entries == 0:
                return
            self._items[sid] = item
            self.nbytes += item.nbytes
            while self._items and (self.nbytes > self.max_bytes or len(self._items) > self.max_entries):
                _, dropped = self._items.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if len(diff) else n


def rewind(memory: ContextMemory, state: MemoryState, n: int) -> MemoryState:
    """Forget the last n tokens of a one-row state (mask their slots out, drop the columns). The caller
    checks they are still in the cache - the sink window only ever evicts from the middle."""
    mask = state.mask.copy()
    valid = np.flatnonzero(mask[0])
    mask[0, valid[len(valid) - n:]] = False
    return memory.compact(MemoryState(state.past, mask, state.tokens, state.evicted.copy(), state.seen - n))


def reuse(entry: CachedConversation, prompt: list[int], memory: ContextMemory) -> tuple[MemoryState, int] | None:
    """The cached state advanced to the longest common prefix with `prompt`, and that prefix's length;
    None when nothing can be reused. At least one prompt token is always left to feed (its logits start
    the reply), so a repeated prompt rewinds one token."""
    state, history = entry.state, entry.history
    if int(state.seen[0]) != len(history):
        return None  # bookkeeping mismatch: never guess, rebuild
    p = min(common_prefix(history, prompt), len(prompt) - 1)
    if p <= 0:
        return None
    back = len(history) - p
    if back:
        kept = int(state.lengths()[0])
        evicted = int(state.seen[0]) > kept
        # with evictions the cache holds [sinks | recent tail]; only the tail can be rewound
        protected = memory.config.sinks if evicted and memory.config.policy == "sink" else 0
        if back > kept - protected:
            return None
        state = rewind(memory, state, back)
    return state, p


# ---- requests and the scheduler ------------------------------------------------------------------
@dataclass
class Job:
    """A prepared request: tokens and configs fixed, waiting to be admitted."""

    model: LoadedModel
    prompt_ids: list[int]
    generation: GenerationConfig
    memory: MemoryConfig
    session_id: str | None
    emit: Callable[[list[dict]], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


@dataclass
class Seq:
    job: Job
    decoder: SequenceDecoder
    history: list[int]  # tokens fed so far: prompt, then every generated token that went back in
    cached: int  # prompt tokens reused from the conversation cache
    cache_result: str | None  # "hit", "miss" or None (no session)
    next_token: int = -1
    batch_sum: int = 0
    steps: int = 0


class Group:
    """The running batch of one (model, memory policy): rows of `state` are `seqs`, in order."""

    def __init__(self, memory: ContextMemory):
        self.memory = memory
        self.state: MemoryState | None = None
        self.seqs: list[Seq] = []


class Scheduler:
    """Continuous batching on one thread; `submit` is thread-safe, events go out through `Job.emit`."""

    def __init__(self, config: EngineConfig, metrics: Registry):
        self.config = config
        self.metrics = metrics
        self.cache = SessionCache(int(config.kv_cache_mb * 2**20), config.kv_cache_sessions)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._groups: dict[tuple, Group] = {}
        self._out: dict[int, tuple[Job, list[dict]]] = {}
        self._stop = False
        self._running = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ctxmem-scheduler", daemon=True)
        self._thread.start()

    # -- control (any thread) --
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop or self.error is not None:
                raise APIError(503, "the engine is shutting down or failed; retry", code="engine_unavailable")
            if len(self._queue) >= self.config.max_queued:
                raise APIError(429, f"the engine has {len(self._queue)} requests waiting; retry later",
                               code="queue_full")
            self._queue.append(job)
            self._cond.notify()

    def set_config(self, config: EngineConfig) -> None:
        with self._cond:
            self.config = config
            self.cache.max_bytes = int(config.kv_cache_mb * 2**20)
            self.cache.max_entries = config.kv_cache_sessions
            if not config.kv_reuse:
                self.cache.clear()
            self._cond.notify()

    def drop_version(self, version: str) -> None:
        """Forget cached conversations of a model that was swapped out."""
        self.cache.clear()

    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Sequences in the running batch, as of the last scheduler step (safe from any thread)."""
        return self._running

    def _count_running(self) -> int:  # scheduler thread only: it alone mutates the groups
        self._running = sum(len(g.seqs) for g in self._groups.values())
        return self._running

    # -- the loop (scheduler thread) --
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._queue and not self._count_running():
                        self._cond.wait()
                    if self._stop:
                        break
                    admitted = self._take_admissions()
                for job in admitted:
                    self._admit(job)
                self._flush()
                for key in list(self._groups):
                    group = self._groups[key]
                    if group.seqs:
                        self._decode(group)
                    if not group.seqs:
                        del self._groups[key]
                self._flush()
                self._count_running()
                self._gauges()
        except BaseException as err:  # noqa: BLE001 - a dead loop must fail health checks, not hang clients
            log.exception("scheduler loop died")
            self.error = err
            self._fail_all(APIError(500, f"engine failure: {err}", code="engine_failure"))

    def _take_admissions(self) -> list[Job]:
        room = self.config.max_batch_size - self._count_running()
        budget = self.config.prefill_token_budget
        out: list[Job] = []
        while self._queue and room > 0:
            job = self._queue[0]
            if job.cancelled:
                self._queue.popleft()
                continue
            if out and len(job.prompt_ids) > budget:
                break  # next step: long prompts do not stall everyone's decoding twice
            self._queue.popleft()
            out.append(job)
            room -= 1
            budget -= len(job.prompt_ids)
        return out

    def _group(self, job: Job) -> Group:
        key = (job.model.version, job.memory)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(ContextMemory(job.model.generator.backend, job.memory))
        return group

    def _admit(self, job: Job) -> None:
        m = self.metrics
        queue_s = time.perf_counter() - job.submitted
        m.observe("ctxmem_queue_seconds", queue_s)
        try:
            group = self._group(job)
            memory = group.memory
            state, cached, result = None, 0, None
            if job.session_id is not None:
                entry = self.cache.take(job.session_id) if self.config.kv_reuse else None
                if entry is not None and entry.version == job.model.version and entry.memory == job.memory:
                    reused = reuse(entry, job.prompt_ids, memory)
                    if reused is not None:
                        state, cached = reused
                result = "hit" if state is not None else "miss"
                m.inc("ctxmem_kv_cache_lookups_total", labels={"result": result})
            if state is None:
                state = memory.start(1)
            new = job.prompt_ids[cached:]
            logits = memory.feed(state, [new])  # (1, V); prefill alone, then join the batch
            m.inc("ctxmem_prefill_tokens_total", len(new))
            m.inc("ctxmem_cached_tokens_total", cached)
            decoder = SequenceDecoder(job.model.generator.tokenizer, job.generation, job.prompt_ids)
            seq = Seq(job, decoder, list(job.prompt_ids), cached, result)
            self._emit(job, {"type": "start", "prompt_tokens": len(job.prompt_ids), "cached_tokens": cached,
                             "queue_s": queue_s, "cache": result})
            if decoder.finished:  # max_tokens=0 never reaches here (validated), kept for safety
                self._finish(seq, memory, state)
                return
            delta = decoder.step(logits[0])
            self._emit(job, {"type": "delta", "text": delta.text, "tokens": 1, "batch": 1})
            if decoder.finished:
                self._finish(seq, memory, state)
                return
            seq.next_token = delta.token_id
            group.state = state if group.state is None else memory.merge([group.state, state])
            group.seqs.append(seq)
        except APIError as err:
            self._emit(job, err.to_event())
        except MemoryConfigError as err:
            self._emit(job, bad_request(str(err), param="policy").to_event())
        except Exception as err:  # noqa: BLE001 - one bad request must not take the batch down
            log.exception("prefill failed for request %s", job.id)
            self._emit(job, APIError(500, f"prefill failed: {err}", code="engine_failure").to_event())

    def _decode(self, group: Group) -> None:
        memory = group.memory
        cancelled = [i for i, s in enumerate(group.seqs) if s.job.cancelled]
        if cancelled:
            self._keep(group, [i for i in range(len(group.seqs)) if i not in set(cancelled)])
            if not group.seqs:
                return
        seqs = group.seqs
        batch = len(seqs)
        ids = np.fromiter((s.next_token for s in seqs), dtype=np.int64, count=batch)[:, None]  # (B, 1)
        try:
            logits = memory.feed(group.state, ids)  # (B, V)
        except Exception as err:  # noqa: BLE001
            log.exception("decode step failed; failing %d sequences", batch)
            for s in seqs:
                self._emit(s.job, APIError(500, f"decode failed: {err}", code="engine_failure").to_event())
            group.seqs, group.state = [], None
            return
        self.metrics.observe("ctxmem_batch_size", batch)
        leaving: list[int] = []
        for i, s in enumerate(seqs):
            s.history.append(s.next_token)
            s.batch_sum += batch
            s.steps += 1
            delta = s.decoder.step(logits[i])
            self._emit(s.job, {"type": "delta", "text": delta.text, "tokens": 1, "batch": batch})
            if s.decoder.finished:
                leaving.append(i)
            else:
                s.next_token = delta.token_id
        if leaving:
            for i in leaving:
                self._finish(seqs[i], memory, memory.select(group.state, [i]))
            gone = set(leaving)
            self._keep(group, [i for i in range(batch) if i not in gone])

    def _keep(self, group: Group, rows: list[int]) -> None:
        group.seqs = [group.seqs[i] for i in rows]
        group.state = group.memory.compact(group.memory.select(group.state, rows)) if rows else None

    def _finish(self, seq: Seq, memory: ContextMemory, state: MemoryState) -> None:
        """state: this sequence's row alone (batch 1)."""
        job, d = seq.job, seq.decoder
        evicted = int(state.seen[0] - state.lengths()[0])  # tokens of this context no longer attended to
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": len(d.token_ids),
                 "cached_tokens": seq.cached, "evicted_tokens": evicted,
                 "prefill_tokens": len(job.prompt_ids) - seq.cached}
        self._emit(job, {"type": "end", "finish_reason": d.finish_reason or "length", "usage": usage,
                         "cache": seq.cache_result,
                         "batch_mean": seq.batch_sum / seq.steps if seq.steps else 1.0})
        m = self.metrics
        m.inc("ctxmem_evicted_tokens_total", evicted)
        if job.session_id is not None and self.config.kv_reuse and not job.cancelled:
            state = memory.compact(state)
            self.cache.put(job.session_id, CachedConversation(job.model.version, job.memory, seq.history, state,
                                                              past_nbytes(state.past)))

    def _emit(self, job: Job, event: dict) -> None:
        slot = self._out.get(id(job))
        if slot is None:
            self._out[id(job)] = (job, [event])
        else:
            slot[1].append(event)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, events in out.values():
            if job.cancelled and events[-1]["type"] not in ("end", "error"):
                continue
            if isinstance(job.emit, AsyncSink):  # one wake-up per event loop per step, not one per request
                by_loop.setdefault(job.emit.loop, []).append((job, events))
                continue
            try:
                job.emit(events)
            except Exception:  # noqa: BLE001 - a consumer that went away
                job.cancelled = True
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
            except RuntimeError:  # the loop closed: its requests are gone
                for job, _ in deliveries:
                    job.cancelled = True

    def _gauges(self) -> None:
        m = self.metrics
        m.set("ctxmem_running_sequences", self.running)
        m.set("ctxmem_waiting_requests", len(self._queue))
        m.set("ctxmem_kv_cache_sessions", len(self.cache))
        m.set("ctxmem_kv_cache_bytes", self.cache.nbytes)

    def _fail_all(self, err: APIError) -> None:
        for group in self._groups.values():
            for s in group.seqs:
                self._emit(s.job, err.to_event())
        with self._cond:
            while self._queue:
                self._emit(self._queue.popleft(), err.to_event())
        self._flush()


class AsyncSink:
    """Job.emit for an asyncio consumer: events land in `queue` on `loop` (see Scheduler._flush)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def __call__(self, events: list[dict]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)


def _deliver(deliveries: list) -> None:
    for job, events in deliveries:
        job.emit.queue.put_nowait(events)


# ---- the engine ----------------------------------------------------------------------------------
class Engine:
    """A model + a scheduler + request preparation. `generate` is the async API the replica exposes."""

    def __init__(self, config: EngineConfig, metrics: Registry | None = None, model: LoadedModel | None = None):
        self.config = config
        self.metrics = metrics or Registry()
        self.model = model or load_model(config)
        self.scheduler = Scheduler(config, self.metrics)
        self._reload_lock = threading.Lock()

    # -- requests --
    def prepare(self, request: dict[str, Any], emit: Callable[[list[dict]], None]) -> Job:
        """Tokenize and validate against the current model; APIError (4xx) for what the model cannot do."""
        model = self.model
        gen = model.generator
        memory = self._memory(model, request.get("memory"))
        overrides = dict(request.get("generation") or {})
        if request.get("kind") == "chat" and model.template.stop_strings:
            overrides["stop"] = list(overrides.get("stop") or []) + list(model.template.stop_strings)
        try:
            config = replace(gen.defaults, **overrides)
        except GenerationConfigError as err:
            raise bad_request(str(err), param=str(err).split(" ")[0]) from None
        except TypeError as err:
            raise bad_request(f"bad generation parameter: {err}") from None
        prompt_ids = self._prompt(model, request)
        if memory.policy == "full" and len(prompt_ids) + config.max_new_tokens > memory.capacity:
            raise bad_request(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({config.max_new_tokens}) exceeds the model's "
                f"context of {memory.capacity} under policy 'full'; shorten it or use policy 'sink'",
                param="max_tokens", code="context_length_exceeded")
        return Job(model, prompt_ids, config, memory, request.get("session_id"), emit)

    def _memory(self, model: LoadedModel, overrides: dict | None) -> MemoryConfig:
        if not overrides:
            return model.memory
        base = model.memory
        if overrides.get("policy", base.policy) != base.policy:
            base = MemoryConfig(policy=overrides["policy"])
        try:
            return ContextMemory(model.generator.backend, replace(base, **overrides)).config
        except MemoryConfigError as err:
            raise bad_request(str(err), param="window" if "window" in str(err) else "policy") from None

    @staticmethod
    def _prompt(model: LoadedModel, request: dict[str, Any]) -> list[int]:
        from ctxmem.tokenizer import TokenizerError

        try:
            if request.get("kind") == "chat":
                return model.template.render(request["messages"], add_generation_prompt=True)
            return model.generator.encode(request["prompt"])
        except TokenizerError as err:
            raise bad_request(str(err), param="messages" if request.get("kind") == "chat" else "prompt") from None
        except ValueError as err:  # token ids outside the vocabulary
            raise bad_request(str(err), param="prompt") from None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[dict]]:
        """Yields lists of events: start, delta (coalesced), then end - or a single error event."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[dict]] = asyncio.Queue()
        try:
            job = self.prepare(request, AsyncSink(loop, queue))
            self.scheduler.submit(job)
        except APIError as err:
            yield [err.to_event()]
            return
        try:
            last = None
            while True:
                events = await queue.get()
                if last is not None:  # after the first token: send at most every `interval`
                    wait = self._stream_interval() - (time.perf_counter() - last)
                    if wait > 0 and events[-1]["type"] not in ("end", "error"):
                        await asyncio.sleep(wait)
                while not queue.empty():
                    events = events + queue.get_nowait()
                out = coalesce(events)
                yield out
                last = time.perf_counter()
                if out[-1]["type"] in ("end", "error"):
                    return
        finally:
            job.cancelled = True  # client gone or done: the row leaves at the next step

    def _stream_interval(self) -> float:
        """Seconds between two messages of one stream (see EngineConfig.stream_interval_ms)."""
        ms = self.config.stream_interval_ms
        if ms is None:
            ms = min(250.0, 10.0 * self.scheduler.running)
        return ms / 1000.0

    # -- control --
    def reconfigure(self, config: EngineConfig) -> dict[str, Any]:
        """New runtime knobs; a changed model spec or reload_nonce re-resolves and swaps the model."""
        old = self.config
        self.config = config
        self.scheduler.set_config(config)
        if (config.model, config.tracking_uri, config.reload_nonce, config.provider, config.memory,
                config.intra_op_threads) != (old.model, old.tracking_uri, old.reload_nonce, old.provider, old.memory,
                                             old.intra_op_threads):
            return self.reload(force=config.model != old.model or config.memory != old.memory)
        return self.info()

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Re-resolve the model spec (a registry alias may have moved) and roll over to it if it changed.
        In-flight sequences finish on the old model; new requests use the new one."""
        with self._reload_lock:
            path = resolve_spec(self.config.model, self.config.tracking_uri)
            if not force and path.resolve() == self.model.path.resolve():
                return {**self.info(), "changed": False}
            new = load_model(self.config)
            old, self.model = self.model, new
            self.scheduler.drop_version(old.version)
            log.info("model rolled over: %s -> %s", old.path, new.path)
            return {**self.info(), "changed": True, "previous": str(old.path)}

    def info(self) -> dict[str, Any]:
        m = self.model
        b = m.generator.backend
        return {"spec": m.spec, "path": str(m.path), "kind": m.kind, "provider": m.provider, "version": m.version,
                "max_seq_len": b.max_seq_len, "vocab_size": b.vocab_size, "memory": m.memory.to_dict(),
                "max_batch_size": self.config.max_batch_size, "kv_reuse": self.config.kv_reuse}

    def healthy(self) -> bool:
        return self.scheduler.alive()

    def close(self) -> None:
        self.scheduler.stop()


def coalesce(events: list[dict]) -> list[dict]:
    """Consecutive deltas become one (text joined, tokens summed, the largest batch they ran in)."""
    out: list[dict] = []
    for ev in events:
        if ev["type"] == "delta" and out and out[-1]["type"] == "delta":
            prev = out[-1]
            out[-1] = {"type": "delta", "text": prev["text"] + ev["text"], "tokens": prev["tokens"] + ev["tokens"],
                       "batch": max(prev["batch"], ev["batch"])}
        else:
            out.append(ev)
    return out
