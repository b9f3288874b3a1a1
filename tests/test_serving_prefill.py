"""Chunked prefill: a long prompt is fed a budgeted chunk per scheduler step, with decode steps of the
running streams in between, gives exactly what a whole-prompt prefill gives, and is dropped when its
client goes away. On the tiny export (sink window 60 + 4 sinks), without Ray."""
from __future__ import annotations

import asyncio
import threading

import pytest

from ctxmem.sampling import GenerationConfig
from ctxmem.serving.config import EngineConfig
from ctxmem.serving.engine import Engine
from ctxmem.serving.events import Delta, Finished, Started

BUDGET = 64  # prompt tokens per scheduler step: a 1500-token prompt needs at least 24 steps


@pytest.fixture(scope="module")
def engine(tiny_export):
    eng = Engine(EngineConfig(model=str(tiny_export), max_batch_size=8, prefill_token_budget=BUDGET))
    yield eng
    eng.close()


def completion(prompt: str, max_tokens: int) -> dict:
    return {"kind": "completion", "prompt": prompt,
            "generation": {"max_new_tokens": max_tokens, "temperature": 0.0, "stop_token_ids": []}}


def prefilled(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("ctxmem_prefill_tokens_total")


class Recorder:
    """Job.emit that records, in the scheduler's order, which request got which events."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.done = {name: threading.Event() for name in ("short", "long")}

    def emit(self, name: str):
        def sink(events):
            with self.lock:
                self.log.extend((name, ev) for ev in events)
            if any(isinstance(ev, Finished) for ev in events):
                self.done[name].set()
        return sink


def test_a_long_prompt_is_prefilled_over_many_steps_while_another_stream_keeps_decoding(engine):
    rec = Recorder()
    short = engine.prepare(completion("a stream that is running", 200), rec.emit("short"))
    engine.scheduler.submit(short)
    for _ in range(2000):  # the short stream decodes before the long prompt arrives
        with rec.lock:
            if any(isinstance(ev, Delta) for _, ev in rec.log):
                break
        threading.Event().wait(0.005)
    long_prompt = "".join(chr(97 + (i * 7) % 26) for i in range(1500))
    long = engine.prepare(completion(long_prompt, 4), rec.emit("long"))
    with rec.lock:
        mark = len(rec.log)
    engine.scheduler.submit(long)
    assert rec.done["long"].wait(120) and rec.done["short"].wait(120)

    started = next(i for i, (name, ev) in enumerate(rec.log) if name == "long" and isinstance(ev, Started))
    steps = rec.log[started][1].prefill_steps
    assert steps >= len(long.prompt_ids) // BUDGET  # never more than the budget in one step
    # the short stream got a token from (nearly) every decode step between the long prompt's chunks
    between = sum(ev.tokens for name, ev in rec.log[mark:started] if name == "short" and isinstance(ev, Delta))
    assert between >= steps - 2, (between, steps)
    end = next(ev for name, ev in reversed(rec.log) if name == "long")
    assert isinstance(end, Finished) and end.usage.prompt_tokens == len(long.prompt_ids)


def test_a_chunked_prefill_gives_what_a_whole_prompt_prefill_gives(engine, tiny_export):
    """The same greedy continuation as the ONNX generator, which feeds the prompt in one call."""
    from ctxmem.export.runtime import load_onnx_generator

    prompt = "".join(chr(97 + (i * 11) % 26) for i in range(700))
    ref = load_onnx_generator(tiny_export).generate(
        [prompt], GenerationConfig(max_new_tokens=12, temperature=0, stop_token_ids=[]), memory=engine.model.memory)[0]

    async def go():
        text, started = [], None
        async for chunk in engine.generate(completion(prompt, 12)):
            for ev in chunk:
                if isinstance(ev, Started):
                    started = ev
                if isinstance(ev, Delta):
                    text.append(ev.text)
        return "".join(text), started

    text, started = asyncio.run(go())
    assert started.prefill_steps >= 700 // BUDGET
    assert text == ref.text


def test_a_long_prefill_is_dropped_when_its_client_goes_away(engine):
    prompt = "".join(chr(97 + (i * 5) % 26) for i in range(6000))
    before = prefilled(engine)

    async def go():
        gen = engine.generate(completion(prompt, 4))
        first = asyncio.ensure_future(gen.__anext__())
        for _ in range(2000):  # until its first chunks ran
            if engine.scheduler.prefilling and prefilled(engine) > before:
                break
            await asyncio.sleep(0.005)
        first.cancel()  # the client goes away mid-prefill
        try:
            await first
        except (asyncio.CancelledError, StopAsyncIteration):
            pass
        await gen.aclose()
        for _ in range(2000):
            if not engine.scheduler.prefilling:
                return True
            await asyncio.sleep(0.005)
        return False

    assert asyncio.run(go()), "the cancelled prefill still holds its place"
    fed = prefilled(engine) - before
    assert 0 < fed < 6000  # it stopped partway: the rest of the prompt never ran


def test_a_chunk_fits_the_time_left_at_the_measured_rate_and_keeps_the_result_exact(engine):
    """While others decode, a chunk is what the time left allows at the rate measured for that model
    and memory policy - so a slow policy gets fewer tokens per step, not a longer step; recompute
    chunks are whole pieces; a `full` prompt is one chunk (the context bounds it)."""
    from ctxmem.memory import ContextMemory, MemoryConfig
    from ctxmem.serving.scheduler import MIN_CHUNK, Prefill

    sched, backend = engine.scheduler, engine.model.generator.backend

    def prefill(config: MemoryConfig, tokens: int) -> tuple[Prefill, tuple]:
        memory = ContextMemory(backend, config)
        job = engine.prepare(completion("x" * tokens, 1), emit=lambda events: None)
        return Prefill(job, memory, memory.start(1), job.prompt_ids, 0, None, 0.0), ("v", config)

    now = 0.0  # powers of two below: the arithmetic is exact
    fast, key_fast = prefill(MemoryConfig("sink", window=60, sinks=4), 5000)
    slow, key_slow = prefill(MemoryConfig("sink", window=8, sinks=4), 5000)
    sched._prefill_rate.update({key_fast: 2**-12, key_slow: 2**-8})  # seconds per token
    deadline = now + 2**-4
    assert sched._chunk_size(fast, key_fast, 512, deadline, now, must=False) == 256
    assert sched._chunk_size(slow, key_slow, 512, deadline, now, must=False) == 16
    assert sched._chunk_size(slow, key_slow, 512, deadline, now, must=True) == MIN_CHUNK  # progress every step
    assert sched._chunk_size(fast, key_fast, 100, deadline, now, must=False) == 100  # the token budget
    assert sched._chunk_size(fast, key_fast, 512, None, now, must=False) == 512  # nothing decodes: the budget
    recompute, key_r = prefill(MemoryConfig("recompute", window=40, chunk=8), 5000)
    sched._prefill_rate[key_r] = 2**-12
    piece = recompute.memory.piece
    assert sched._chunk_size(recompute, key_r, 512, deadline, now, must=False) == (256 // piece) * piece
    assert sched._chunk_size(recompute, key_r, 512, now + 2**-12, now, must=True) == piece
    full, key_full = prefill(MemoryConfig("full"), 100)
    sched._prefill_rate[key_full] = 1.0
    assert sched._chunk_size(full, key_full, 512, deadline, now, must=True) == 100
