"""The continuous (iteration-level) batcher over ContextMemory + SequenceDecoder.

One scheduler thread owns the model. Each iteration it

1. admits waiting requests while the running batch has room (`max_batch_size`) and the step's prompt
   budget lasts (`prefill_token_budget`); each new sequence is prefilled on its own - from the KV state
   of its conversation when this replica still holds it (`kv_reuse`), so only the new tokens run -
   samples its first token and is merged into the running batch (`ContextMemory.merge` left-pads);
2. runs one decode step for the whole running batch (one forward per memory policy in use);
3. lets finished or cancelled sequences leave (`ContextMemory.select`), keeping the KV state of those
   that belong to a conversation in the bounded LRU (`kv_reuse.SessionCache`).

Sampling, detokenisation and stop rules stay in `ctxmem.generation.SequenceDecoder`; eviction stays in
`ctxmem.memory.ContextMemory`. Events (`events.py`) go out through `Job.emit`, batched per step.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ctxmem.generation import SequenceDecoder
from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError, MemoryState
from ctxmem.sampling import GenerationConfig

from .config import EngineConfig
from .errors import APIError, bad_request
from .events import FINAL, Delta, Event, Finished, Started, Usage
from .kv_reuse import CachedConversation, SessionCache, past_nbytes, reuse
from .loading import LoadedModel
from .metrics import Registry

log = logging.getLogger("ctxmem.serving.scheduler")


@dataclass
class Job:
    """A prepared request: tokens and configs fixed, waiting to be admitted."""

    model: LoadedModel
    prompt_ids: list[int]
    generation: GenerationConfig
    memory: MemoryConfig
    session_id: str | None
    emit: Callable[[list[Event]], None]
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
        self._out: dict[int, tuple[Job, list[Event]]] = {}
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
        """Forget cached conversations of a model that was swapped out (their KV states mean nothing
        to another model); those of other models stay."""
        self.cache.drop_version(version)

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
            self._emit(job, Started(len(job.prompt_ids), cached, queue_s, result))
            if decoder.finished:  # max_tokens=0 never reaches here (validated), kept for safety
                self._finish(seq, memory, state)
                return
            delta = decoder.step(logits[0])
            self._emit(job, Delta(delta.text, 1, 1))
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
            self._emit(s.job, Delta(delta.text, 1, batch))
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
        usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=len(d.token_ids), cached_tokens=seq.cached,
                      evicted_tokens=evicted, prefill_tokens=len(job.prompt_ids) - seq.cached)
        self._emit(job, Finished(d.finish_reason or "length", usage, seq.cache_result,
                                 seq.batch_sum / seq.steps if seq.steps else 1.0))
        m = self.metrics
        m.inc("ctxmem_evicted_tokens_total", evicted)
        if job.session_id is not None and self.config.kv_reuse and not job.cancelled:
            state = memory.compact(state)
            self.cache.put(job.session_id, CachedConversation(job.model.version, job.memory, seq.history, state,
                                                              past_nbytes(state.past)))

    def _emit(self, job: Job, event: Event) -> None:
        slot = self._out.get(id(job))
        if slot is None:
            self._out[id(job)] = (job, [event])
        else:
            slot[1].append(event)

    def _flush(self) -> None:
        out, self._out = self._out, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, events in out.values():
            if job.cancelled and not isinstance(events[-1], FINAL):
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

    def __call__(self, events: list[Event]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)


def _deliver(deliveries: list) -> None:
    for job, events in deliveries:
        job.emit.queue.put_nowait(events)
