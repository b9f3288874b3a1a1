"""The engine facade: a loaded model + the scheduler + request preparation.

`Engine.generate` is the async API an engine replica exposes: it validates a request against the
current model (tokens, generation and memory settings through the core's one override path), submits
it to the `Scheduler` and yields its events (`events.py`). `reconfigure`/`reload` swap the model
between decode steps. Nothing here imports Ray: `ctxmem.serving.deployments` wraps `Engine` in a Ray
Serve replica; tests and `bench/` drive it directly.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from typing import Any, AsyncIterator, Callable

from ctxmem.memory import ContextMemory, MemoryConfig, MemoryConfigError
from ctxmem.sampling import GenerationConfig, GenerationConfigError

from .config import EngineConfig
from .errors import APIError, bad_request
from .events import FINAL, Event, coalesce
from .loading import LoadedModel, load_served_model, model_directory
from .metrics import Registry
from .scheduler import AsyncSink, Job, Scheduler

log = logging.getLogger("ctxmem.serving.engine")

# glibc malloc settings for an engine's process (mallopt parameter numbers from malloc.h). Rows joining
# and leaving the batch copy the KV cache into fresh numpy arrays (ContextMemory.merge/select/compact,
# eviction's compaction); with glibc's adaptive defaults a freed array of a few hundred KiB goes back to
# the system (munmap, or trimming the heap top past twice the largest freed block) and the next copy
# faults in its pages again. On the benchmark VM a page fault costs ~2.5 us: a (15, 2, 160, 24) x 4
# select of the tiny export's cache took 1.2 ms of page faults against 64 us for the copy itself. Blocks
# up to MMAP_THRESHOLD come from the heap and up to TRIM_THRESHOLD of freed heap stays mapped for reuse:
# the process's memory stays at its high-water mark (plus at most TRIM_THRESHOLD free per arena).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value (and its adaptive maximum on 64-bit)
TRIM_THRESHOLD = 256 * 2**20
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Once per process: glibc keeps freed cache-sized blocks for reuse (see TRIM_THRESHOLD). False
    where the C library is not glibc (no mallopt) or refuses a value; nothing changes then."""
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator's defaults
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _malloc_tuned


class Engine:
    """A model + a scheduler + request preparation. `generate` is the async API the replica exposes."""

    def __init__(self, config: EngineConfig, metrics: Registry | None = None, model: LoadedModel | None = None):
        self.config = config
        self.metrics = metrics or Registry()
        keep_freed_memory()  # the scheduler's cache copies reuse freed memory instead of faulting pages in
        self.model = model or load_served_model(config)
        self.scheduler = Scheduler(config, self.metrics)
        self._reload_lock = threading.Lock()

    # -- requests --
    def prepare(self, request: dict[str, Any], emit: Callable[[list[Event]], None]) -> Job:
        """Tokenize and validate against the current model; APIError (4xx) for what the model cannot do."""
        model = self.model
        memory = self._memory(model, request.get("memory"))
        template = model.template(self.config.chat_template)
        config = self._generation(model, template, request)
        prompt_ids = self._prompt(model, template, request)
        if len(prompt_ids) > self.config.max_prompt_tokens:
            raise bad_request(
                f"the prompt is {len(prompt_ids)} tokens, over this server's max_prompt_tokens of "
                f"{self.config.max_prompt_tokens}; shorten it (a conversation: start a new one)",
                param="messages" if request.get("kind") == "chat" else "prompt", code="prompt_too_long")
        if memory.policy == "full" and ContextMemory(model.generator.backend, memory).full_tokens_needed(
                prompt_ids, config.max_new_tokens) > memory.capacity:
            raise bad_request(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({config.max_new_tokens}) exceeds the model's "
                f"context of {memory.capacity} under policy 'full'; shorten it or use policy 'sink'",
                param="max_tokens", code="context_length_exceeded")
        return Job(model, prompt_ids, config, memory, request.get("session_id"), emit)

    @staticmethod
    def _memory(model: LoadedModel, overrides: dict[str, Any] | None) -> MemoryConfig:
        """The request's policy/window/sinks/budget over the server's (None = unset; setting only
        `sinks` re-derives the window), validated against the model. On a retrieve server a request
        keeps the server's store bound and scoring (it may set only the budget); a request for
        `retrieve` on a server of another policy gets the core's retrieve defaults (a store of 2048
        tokens per conversation)."""
        if not overrides:
            return model.memory
        backend = model.generator.backend
        try:
            return model.memory.with_overrides(backend.max_seq_len, backend.uses_rope, **overrides)
        except MemoryConfigError as err:
            message = str(err)
            param = next((k for k in ("window", "sinks", "chunk", "budget") if k in overrides and k in message),
                         "policy")
            raise bad_request(message, param=param) from None

    @staticmethod
    def _generation(model: LoadedModel, template, request: dict[str, Any]) -> GenerationConfig:
        """The request's sampling settings over the model's saved defaults; a chat also stops where the
        template ends an assistant turn."""
        overrides = dict(request.get("generation") or {})
        if request.get("kind") == "chat" and template.stop_strings:
            overrides["stop"] = list(overrides.get("stop") or []) + list(template.stop_strings)
        try:
            return model.generator.defaults.with_overrides(**overrides)
        except GenerationConfigError as err:
            first = str(err).split(" ")[0]  # the core's messages start with the field they are about
            raise bad_request(str(err), param=first if first in overrides else None) from None

    @staticmethod
    def _prompt(model: LoadedModel, template, request: dict[str, Any]) -> list[int]:
        from ctxmem.tokenizer import TokenizerError

        try:
            if request.get("kind") == "chat":
                return template.render(request["messages"], add_generation_prompt=True)
            return model.generator.encode(request["prompt"])
        except TokenizerError as err:
            raise bad_request(str(err), param="messages" if request.get("kind") == "chat" else "prompt") from None
        except ValueError as err:  # token ids outside the vocabulary
            raise bad_request(str(err), param="prompt") from None

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[list[Event]]:
        """Yields lists of events: Started, Delta (coalesced), then Finished - or a single Failed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        try:
            job = self.prepare(request, AsyncSink(loop, queue))
            self.scheduler.submit(job)
        except APIError as err:
            yield [err.to_event()]
            return
        try:
            while True:
                # the scheduler paces the stream (at most a message per stream interval, the first text
                # at once); what piled up while the consumer was behind goes out as one message
                events = await queue.get()
                while not queue.empty():
                    events = events + queue.get_nowait()
                out = coalesce(events)
                yield out
                if isinstance(out[-1], FINAL):
                    return
        finally:
            job.cancelled = True  # client gone or done: the row leaves at the next step

    # -- control --
    def reconfigure(self, config: EngineConfig) -> dict[str, Any]:
        """New runtime knobs; a changed model spec or reload_nonce re-resolves and swaps the model."""
        old = self.config
        self.config = config
        self.scheduler.set_config(config)
        # how the model is loaded: a change reloads it even where the spec resolves to the same folder
        loading = ("model", "provider", "memory", "intra_op_threads", "decode_session")
        changed = {key for key in (*loading, "tracking_uri", "reload_nonce") if getattr(config, key) != getattr(old, key)}
        if changed:  # tracking_uri / reload_nonce alone: re-resolve, and roll over if the alias moved
            return self.reload(force=bool(changed & set(loading)))
        return self.info()

    def reload(self, force: bool = False) -> dict[str, Any]:
        """Re-resolve the model spec (a registry alias may have moved) and roll over to it if it changed.
        In-flight sequences finish on the old model; new requests use the new one."""
        with self._reload_lock:
            path = model_directory(self.config)
            if not force and path.resolve() == self.model.path.resolve():
                return {**self.info(), "changed": False}
            new = load_served_model(self.config)
            old, self.model = self.model, new
            self.scheduler.drop_version(old.version)
            log.info("model rolled over: %s -> %s", old.path, new.path)
            return {**self.info(), "changed": True, "previous": str(old.path)}

    def info(self) -> dict[str, Any]:
        m = self.model
        b = m.generator.backend
        return {"spec": m.spec, "path": str(m.path), "kind": m.kind, "provider": m.provider, "version": m.version,
                "decode_session": getattr(b, "decode_session", False),
                "max_seq_len": b.max_seq_len, "vocab_size": b.vocab_size, "memory": m.memory.to_dict(),
                "chat_template": self.config.chat_template,
                "max_batch_size": self.config.max_batch_size, "kv_reuse": self.config.kv_reuse,
                "stream_interval_ms": self.config.stream_interval_ms,
                "scheduler": self.scheduler.state(), "scheduler_restarts": self.scheduler.restarts}

    def healthy(self) -> bool:
        """Worth keeping: the scheduler runs, or restarts after an isolated death (a replica whose loop
        keeps dying, or that stopped, is not - Ray Serve's health check then replaces it)."""
        return self.scheduler.state() != "stopped" and not self.scheduler.crash_looping()

    def close(self) -> None:
        self.scheduler.stop()
