"""The continuous (iteration-level) batcher over ContextMemory + SequenceDecoder.

One scheduler thread owns the model. Each iteration it

1. admits waiting requests while the running batch has room (`max_batch_size`, counting sequences
   still prefilling): each starts from the KV state of its conversation when this replica still holds
   it (`kv_reuse`), so only the new tokens run, else from an empty state;
2. prefills in budgeted chunks (`_prefill_step`): at most `prefill_token_budget` prompt tokens per
   step, and while other sequences decode at most about `PREFILL_SHARE` of a decode step's time, so a
   long prompt never stalls the running streams - it takes as many steps as it needs, a decode step
   between each two chunks. Short prompts go first; one passed over STARVE_STEPS steps in a row goes
   first, so none starves. The exact banded prefill of `ContextMemory` makes the result independent
   of the chunking (`sink`: any piece; `recompute`: whole pieces; `full`: one chunk, bounded by the
   context). A prompt whose last
   chunk ran samples its first token and is merged into the running batch (`ContextMemory.merge`
   left-pads); one whose client went away is dropped before its next chunk;
3. runs one decode step for the whole running batch (one forward per memory policy in use);
4. lets finished or cancelled sequences leave (`ContextMemory.select`), keeping the KV state of those
   that belong to a conversation in the bounded LRU (`kv_reuse.SessionCache`).

No request can take the loop down: an exception while prefilling or stepping one sequence fails that
request alone (a `Failed` event) and the others go on. Should the loop itself still die, a supervisor
fails the requests it was running, counts the restart (`ctxmem_scheduler_restarts_total`), reports
itself down (`state()`, so `/health` says degraded) for a short backoff, and starts it again; queued
requests wait and are served by the new loop. Only a loop that keeps dying (`crash_looping`) makes the
replica unhealthy, so that Ray Serve replaces it.

Sampling, detokenisation and stop rules stay in `ctxmem.generation.SequenceDecoder` (a decode step's
tokens are picked for the whole batch at once by `ctxmem.generation.pick`, each row's own Sampler only
where the batch cannot decide it); eviction stays in `ctxmem.memory.ContextMemory`. Events (`events.py`) go
out through `Job.emit`, batched per step; a stream's tokens gather in one `Texts` until its message goes
out as one Delta. A
stream read by an asyncio consumer (`AsyncSink`, what `Engine.generate` uses) is paced here, on this
thread: its events are held until its stream interval has passed since its last message and go out
together, so the consumer's event loop wakes once per message rather than once per decode step; the
stream's first text and its last event are never held (a first token with no text of its own - half a
UTF-8 character, or text a stop string holds back - waits for the text or the interval).
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

from ctxmem.generation import SequenceDecoder, pick
from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError, MemoryState
from ctxmem.sampling import GenerationConfig

from .config import EngineConfig
from .errors import APIError, bad_request
from .events import FINAL, Event, Finished, Started, Texts, Usage
from .kv_reuse import CachedConversation, SessionCache, reuse, state_nbytes, store_nbytes
from .loading import LoadedModel
from .metrics import Registry
from .recall import RecallLog

log = logging.getLogger("ctxmem.serving.scheduler")
RESTART_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)  # after the 1st, 2nd, 3rd, later deaths in a row
STABLE_S = 60.0  # a loop that ran this long before dying starts the backoff over
CRASH_LOOP_DEATHS = 3  # this many deaths in a row, each within STABLE_S of the last: the replica is unhealthy
# While sequences decode, a step's prefill chunks may take about this fraction of a decode step's time
# (measured, EMA): their inter-token latency grows by at most ~1 + PREFILL_SHARE while a long prompt
# arrives, and the prompt still gets a third of the engine (issue 11: <= 2x p99).
PREFILL_SHARE = 0.5
STARVE_STEPS = 8  # a prompt passed over this many steps in a row goes first (short prompts cannot starve it)
MIN_CHUNK = 32  # smaller prefill chunks cost more per token than they save in latency (tiny: 146 vs 101 us/token)
EMA = 0.2  # weight of the newest sample in the step-time and prefill-rate averages
# Adaptive stream pacing: a message costs ~2 ms of CPU across engine, ingress, proxy and client
# whatever it carries (bench_serving.py cost phase), so a replica sends about 1000 / ADAPTIVE_MS_PER_SEQ
# messages a second whatever the number of streams: ~50/s, ~0.1 core. 20 ms (not 10) measured 0.285 against
# 0.316 ms CPU/token (medians of six runs each, alternately in one Ray session) at 16 streams of 128 tokens on
# the tiny export (2.0-2.8 against 3.7-4.3 messages a request); a stream still gets its first text at once,
# then tokens every 20 ms alone, ~320 ms apart at 16 streams.
ADAPTIVE_MS_PER_SEQ = 20.0
ADAPTIVE_MAX_MS = 500.0


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
    sent: float | None = None  # AsyncSink pacing: when its last message went out (or its first events came)
    texted: bool = False  # a message with text went out


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
    recall: RecallLog | None = None  # retrieve: the evicted tokens put back for this reply


@dataclass
class Prefill:
    """A sequence whose prompt is being fed, a chunk per scheduler step (`Scheduler._prefill_step`)."""

    job: Job
    memory: ContextMemory
    state: MemoryState  # batch of 1: the conversation's cached state, or empty
    new: list[int]  # prompt tokens to feed (after the cached prefix)
    cached: int
    cache_result: str | None
    queue_s: float
    fed: int = 0
    steps: int = 0  # scheduler steps that fed a chunk of it
    skipped: int = 0  # scheduler steps in a row that fed none of it

    @property
    def left(self) -> int:
        return len(self.new) - self.fed


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
        self._out: dict[int, tuple[Job, list]] = {}  # id(job) -> its pending events (Event or Texts)
        self._stop = False
        self._running = 0
        self._admitting: list[Job] = []  # taken from the queue, not yet in a group (for the supervisor)
        self._prefilling: list[Prefill] = []  # oldest first
        self._decode_s: float | None = None  # EMA of a step's decode time (all groups)
        self._prefill_rate: dict[tuple, float] = {}  # EMA seconds per prompt token, per (model, memory)
        self._down = False  # between a loop's death and its restart
        self.error: BaseException | None = None  # why the loop last died (kept after the restart)
        self.restarts = 0
        self._deaths_in_a_row = 0
        self._last_death = 0.0
        self._thread = threading.Thread(target=self._run, name="ctxmem-scheduler", daemon=True)
        self._thread.start()

    # -- control (any thread) --
    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stop or not self._thread.is_alive():
                raise APIError(503, "the engine is shutting down; retry", code="engine_unavailable")
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
        """The loop is running (False while it restarts after a death, and once stopped)."""
        return self._thread.is_alive() and not self._down and not self._stop

    def crash_looping(self) -> bool:
        """The loop keeps dying: restarting it in place is not helping (replace the replica)."""
        return self._deaths_in_a_row >= CRASH_LOOP_DEATHS and time.monotonic() - self._last_death < STABLE_S

    def state(self) -> str:
        """"running", "restarting" (the loop died; requests queue until it is back) or "stopped"."""
        if self._stop or not self._thread.is_alive():
            return "stopped"
        return "restarting" if self._down else "running"

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Sequences in the running batch, as of the last scheduler step (safe from any thread)."""
        return self._running

    @property
    def prefilling(self) -> int:
        """Sequences whose prompt is still being fed (safe from any thread)."""
        return len(self._prefilling)

    def _count_running(self) -> int:  # scheduler thread only: it alone mutates the groups
        self._running = sum(len(g.seqs) for g in self._groups.values())
        return self._running

    # -- the loop (scheduler thread) --
    def _run(self) -> None:
        """The supervisor: runs the loop until `stop`, restarting it whenever it dies."""
        while True:
            started = time.monotonic()
            try:
                self._loop()
                return  # stopped
            except BaseException as err:  # noqa: BLE001 - whatever killed the loop, the replica stays up
                log.exception("scheduler loop died; failing its in-flight requests and restarting")
                self._down = True
                self.error = err
                self.restarts += 1
                self._deaths_in_a_row = 1 if time.monotonic() - started >= STABLE_S else self._deaths_in_a_row + 1
                self._last_death = time.monotonic()
                self._supervised(self.metrics.inc, "ctxmem_scheduler_restarts_total")
                self._supervised(self._fail_in_flight, APIError(
                    500, f"the engine's scheduler failed while running this request ({type(err).__name__}: {err}); "
                    "retry it", code="engine_failure"))
            backoff = RESTART_BACKOFF_S[min(self._deaths_in_a_row, len(RESTART_BACKOFF_S)) - 1]
            with self._cond:
                if self._cond.wait_for(lambda: self._stop, timeout=backoff):
                    return
                self._down = False
            log.warning("scheduler loop restarted (%d restarts so far)", self.restarts)

    @staticmethod
    def _supervised(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - the supervisor itself must not die
            log.exception("scheduler supervisor: %s failed", getattr(fn, "__name__", fn))

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._queue and not self._prefilling and not self._count_running():
                    self._cond.wait()
                if self._stop:
                    return
                self._admitting = self._take_admissions()
            while self._admitting:
                self._start(self._admitting[0])
                self._admitting.pop(0)
            self._prefill_step()
            self._flush()
            started, decoded = time.perf_counter(), False
            for key in list(self._groups):
                group = self._groups[key]
                if group.seqs:
                    self._decode(group)
                    decoded = True
                if not group.seqs:
                    del self._groups[key]
            if decoded:
                took = time.perf_counter() - started
                self._decode_s = took if self._decode_s is None else (1 - EMA) * self._decode_s + EMA * took
            self._flush()
            self._count_running()
            self._gauges()

    def _take_admissions(self) -> list[Job]:
        room = self.config.max_batch_size - self._count_running() - len(self._prefilling)
        out: list[Job] = []
        while self._queue and room > 0:
            job = self._queue.popleft()
            if not job.cancelled:
                out.append(job)
                room -= 1
        return out

    def _group(self, job: Job) -> Group:
        key = (job.model.version, job.memory)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = Group(ContextMemory(job.model.generator.backend, job.memory))
        return group

    def _start(self, job: Job) -> None:
        """Look up the conversation's cached state; the prompt is fed by `_prefill_step`."""
        m = self.metrics
        queue_s = time.perf_counter() - job.submitted
        m.observe("ctxmem_queue_seconds", queue_s)
        try:
            memory = self._group(job).memory
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
            m.inc("ctxmem_cached_tokens_total", cached)
            self._prefilling.append(Prefill(job, memory, state, job.prompt_ids[cached:], cached, result, queue_s))
        except Exception as err:  # noqa: BLE001 - one bad request must not take the batch down
            self._fail_prefill(job, err)

    def _prefill_step(self) -> None:
        """Feed prompt chunks for at most `prefill_token_budget` tokens and, while other sequences
        decode, about PREFILL_SHARE of a decode step's time (the first chunk of a step always runs)."""
        self._prefilling = [p for p in self._prefilling if not p.job.cancelled]  # client gone: state dropped
        if not self._prefilling:
            return
        tokens = self.config.prefill_token_budget
        decoding = self._count_running() > 0
        deadline = time.perf_counter() + PREFILL_SHARE * (self._decode_s or 0.0) if decoding else None
        # shortest first (a short prompt's first token is not held up by a long one), except that a
        # prompt passed over STARVE_STEPS steps in a row goes first
        order = sorted(self._prefilling, key=lambda p: (p.skipped < STARVE_STEPS, p.left))
        fed: set[int] = set()
        for i, p in enumerate(order):
            if i and (tokens <= 0 or (deadline is not None and time.perf_counter() >= deadline)):
                break
            try:
                logits, tokens = self._feed_chunks(p, tokens, deadline, must=i == 0)
            except Exception as err:  # noqa: BLE001 - this prompt fails alone
                self._prefilling.remove(p)
                self._fail_prefill(p.job, err)
                continue
            if logits is not None:
                fed.add(id(p))
            if not p.left:
                self._prefilling.remove(p)
                self._complete(p, logits)
        for p in self._prefilling:
            p.skipped = 0 if id(p) in fed else p.skipped + 1

    def _feed_chunks(self, p: Prefill, tokens: int, deadline: float | None, must: bool) -> tuple[np.ndarray, int]:
        """Feed chunks of `p` while the step's token budget and time last (with `must`, at least one);
        returns the last logits (1, V) and the tokens left in the budget."""
        key = (p.job.model.version, p.job.memory)
        logits, fed = None, False
        while p.left and tokens > 0:
            now = time.perf_counter()
            if fed and deadline is not None and now >= deadline:
                break
            n = self._chunk_size(p, key, tokens, deadline, now, must and not fed)
            if n <= 0:
                break
            logits = p.memory.feed(p.state, [p.new[p.fed:p.fed + n]])  # (1, V)
            took = (time.perf_counter() - now) / n
            rate = self._prefill_rate.get(key)
            self._prefill_rate[key] = took if rate is None else (1 - EMA) * rate + EMA * took
            p.fed += n
            tokens -= n
            fed = True
            self.metrics.inc("ctxmem_prefill_tokens_total", n)
        p.steps += fed
        return logits, tokens

    def _chunk_size(self, p: Prefill, key: tuple, tokens: int, deadline: float | None, now: float, must: bool) -> int:
        """Prompt tokens of `p` to feed next: what the budget and the time left allow (at the measured
        rate of this model and memory policy), at least MIN_CHUNK when this step must make progress,
        cut so that the result equals a whole-prompt prefill."""
        rate = self._prefill_rate.get(key)
        if deadline is None:
            n = tokens
        else:
            n = min(tokens, int(max(0.0, deadline - now) / rate)) if rate else 0
        if must:
            n = max(n, min(MIN_CHUNK, tokens))
        policy, piece = p.memory.config.policy, p.memory.piece
        if policy == "full":
            return p.left  # one forward, as a whole prompt gets; the context bounds it
        if policy == "recompute":  # whole pieces: evictions fall where a whole-prompt prefill puts them
            n = (n // piece) * piece or (piece if must else 0)
        return min(n, p.left)

    def _complete(self, p: Prefill, logits: np.ndarray) -> None:
        """The prompt is in: sample the first token and join the running batch."""
        job, memory, state = p.job, p.memory, p.state
        try:
            decoder = SequenceDecoder(job.model.generator.tokenizer, job.generation, job.prompt_ids)
            seq = Seq(job, decoder, list(job.prompt_ids), p.cached, p.cache_result)
            if memory.retrieval is not None:  # the last prompt token's put-back blocks gave the first token
                seq.recall = RecallLog(len(memory.prefix_for(job.prompt_ids)))
                seq.recall.note(_store(state, 0))
            self._emit(job, Started(len(job.prompt_ids), p.cached, p.queue_s, p.cache_result, p.steps))
            if decoder.finished:  # max_tokens=0 never reaches here (validated), kept for safety
                self._finish(seq, memory, state)
                return
            delta = decoder.step(logits[0])
            self._text(job, delta.text, 1)
            if decoder.finished:
                self._finish(seq, memory, state)
                return
            seq.next_token = delta.token_id
            group = self._group(job)  # its group may have emptied (and gone) while this prompt was fed
            group.state = state if group.state is None else group.memory.merge([group.state, state])
            group.seqs.append(seq)
        except Exception as err:  # noqa: BLE001
            self._fail_prefill(job, err)

    def _fail_prefill(self, job: Job, err: Exception) -> None:
        if isinstance(err, APIError):
            self._emit(job, err.to_event())
        elif isinstance(err, MemoryConfigError):
            self._emit(job, bad_request(str(err), param="policy").to_event())
        else:
            log.error("prefill failed for request %s", job.id, exc_info=err)
            self.metrics.inc("ctxmem_failed_sequences_total", labels={"stage": "prefill"})
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
        if memory.retrieval is not None:  # what each row's token was computed with
            for i, s in enumerate(seqs):
                if s.recall is not None:
                    s.recall.note(_store(group.state, i))
        leaving: list[int] = []
        failed: list[int] = []
        picks = pick([s.decoder for s in seqs], logits)  # the batch's tokens at once; -1: the row's own step
        for i, s in enumerate(seqs):
            try:  # one row's sampling or detokenising error fails that row only
                s.history.append(s.next_token)
                s.batch_sum += batch
                s.steps += 1
                token = picks[i]
                delta = s.decoder.accept(token) if token >= 0 else s.decoder.step(logits[i])
            except Exception as err:  # noqa: BLE001
                self._fail_row(s, err)
                failed.append(i)
                continue
            self._text(s.job, delta.text, batch)
            if s.decoder.finished:
                leaving.append(i)
            else:
                s.next_token = delta.token_id
        for i in leaving:
            try:
                self._finish(seqs[i], memory, memory.select(group.state, [i]))
            except Exception as err:  # noqa: BLE001
                self._fail_row(seqs[i], err)
        if leaving or failed:
            gone = set(leaving) | set(failed)
            self._keep(group, [i for i in range(batch) if i not in gone])

    def _fail_row(self, seq: Seq, err: Exception) -> None:
        log.exception("decode failed for request %s; the other rows go on", seq.job.id)
        self.metrics.inc("ctxmem_failed_sequences_total", labels={"stage": "decode"})
        self._emit(seq.job, APIError(500, f"generation failed for this request ({type(err).__name__}: {err}); "
                                          "retry it, or change its sampling settings", code="engine_failure").to_event())

    def _keep(self, group: Group, rows: list[int]) -> None:
        group.seqs = [group.seqs[i] for i in rows]
        group.state = group.memory.compact(group.memory.select(group.state, rows)) if rows else None

    def _finish(self, seq: Seq, memory: ContextMemory, state: MemoryState) -> None:
        """state: this sequence's row alone (batch 1)."""
        job, d = seq.job, seq.decoder
        evicted = int(state.seen[0] - state.lengths()[0])  # tokens of this context no longer attended to
        recalled = None if seq.recall is None else seq.recall.ranges(job.model.generator.tokenizer.decode)
        usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=len(d.token_ids), cached_tokens=seq.cached,
                      evicted_tokens=evicted, prefill_tokens=len(job.prompt_ids) - seq.cached, recalled=recalled)
        self._emit(job, Finished(d.finish_reason or "length", usage, seq.cache_result,
                                 seq.batch_sum / seq.steps if seq.steps else 1.0))
        m = self.metrics
        m.inc("ctxmem_evicted_tokens_total", evicted)
        if recalled is not None:
            m.inc("ctxmem_recalled_tokens_total", usage.recalled_tokens)
        if job.session_id is not None and self.config.kv_reuse and not job.cancelled:
            # under retrieve the state carries the conversation's store: kept (and bounded) with it
            state = memory.compact(state)
            self.cache.put(job.session_id, CachedConversation(job.model.version, job.memory, seq.history, state,
                                                              state_nbytes(state), store_nbytes(state)))

    def _emit(self, job: Job, event: Event | Texts) -> None:
        slot = self._out.get(id(job))
        if slot is None:
            self._out[id(job)] = (job, [event])
        else:
            slot[1].append(event)

    def _text(self, job: Job, text: str, batch: int) -> None:
        """A token's text: added to the stream's pending Texts (one Delta when its message goes out)."""
        slot = self._out.get(id(job))
        if slot is not None and type(slot[1][-1]) is Texts:
            slot[1][-1].add(text, batch)
        else:
            self._emit(job, Texts(text, batch))

    def stream_interval(self) -> float:
        """Seconds between two messages of one paced stream (EngineConfig.stream_interval_ms; adaptive
        by default: ADAPTIVE_MS_PER_SEQ per running sequence, at most ADAPTIVE_MAX_MS)."""
        ms = self.config.stream_interval_ms
        return (min(ADAPTIVE_MAX_MS, ADAPTIVE_MS_PER_SEQ * self._running) if ms is None else ms) / 1000.0

    def _flush(self) -> None:
        out, self._out = self._out, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        now, interval = time.perf_counter(), self.stream_interval()
        for key, (job, events) in out.items():
            final = isinstance(events[-1], FINAL)
            if job.cancelled and not final:
                continue
            if isinstance(job.emit, AsyncSink):  # one wake-up per event loop per step, not one per request
                text = job.texted or any(type(ev) is Texts and ev.has_text() for ev in events)
                if not final and (job.texted or not text):  # the first text goes at once, the end too
                    if job.sent is None:
                        job.sent = now  # the clock starts with the stream's first events
                    if now - job.sent < interval:
                        self._out[key] = (job, events)  # held: they go out with a later step's, as one message
                        continue
                job.sent, job.texted = now, text
                by_loop.setdefault(job.emit.loop, []).append((job, _events(events)))
                continue
            try:
                job.emit(_events(events))
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
        m.set("ctxmem_prefilling_sequences", len(self._prefilling))
        m.set("ctxmem_waiting_requests", len(self._queue))
        m.set("ctxmem_kv_cache_sessions", len(self.cache))
        m.set("ctxmem_kv_cache_bytes", self.cache.nbytes)
        m.set("ctxmem_kv_cache_store_bytes", self.cache.store_bytes)

    def _fail_in_flight(self, err: APIError) -> None:
        """After the loop died: every running or half-admitted request gets `err` and leaves (their
        state may be inconsistent); the queue stays for the restarted loop."""
        jobs = list({id(j): j for j in [s.job for g in self._groups.values() for s in g.seqs] + self._admitting
                     + [p.job for p in self._prefilling]}.values())
        self._groups, self._admitting, self._prefilling = {}, [], []
        for job in jobs:
            self._emit(job, err.to_event())
        self._flush()
        self._count_running()


def _events(pending: list) -> list[Event]:
    """What goes out: each run of Texts as its one Delta."""
    return [ev.delta() if type(ev) is Texts else ev for ev in pending]


def _store(state: MemoryState | None, row: int):
    """Row ``row``'s retrieve store, or None (nothing evicted yet)."""
    return None if state is None or state.stores is None else state.stores[row]


class AsyncSink:
    """Job.emit for an asyncio consumer: events land in `queue` on `loop` (see Scheduler._flush)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue = loop, queue

    def __call__(self, events: list[Event]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)


def _deliver(deliveries: list) -> None:
    for job, events in deliveries:
        job.emit.queue.put_nowait(events)
