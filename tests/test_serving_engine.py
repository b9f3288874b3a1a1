"""The serving engine without Ray: continuous batching, conversation KV reuse, admission control.

Everything runs on the tiny model exported to ONNX (the production path; its runtime config sets a
sink window of 60 + 4 sinks in a 128-token context) and is compared with
`load_onnx_generator(...).generate`, the engine behind `ctxmem generate --backend onnx`.
"""
from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from ctxmem.sampling import GenerationConfig
from ctxmem.serving.config import EngineConfig, MemoryOverrides
from ctxmem.serving.engine import Engine
from ctxmem.serving.events import Delta, Event, Failed, Finished
from ctxmem.serving.kv_reuse import CachedConversation, SessionCache, common_prefix, reuse, rewind
from ctxmem.serving.loading import load_served_model
from helpers_serving import poison_rows_after


@pytest.fixture(scope="module")
def export_dir(tiny_export):  # noqa: F811
    return tiny_export


@pytest.fixture(scope="module")
def engine(export_dir):
    eng = Engine(EngineConfig(model=str(export_dir), max_batch_size=32))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def reference(export_dir):
    from ctxmem.export.runtime import load_onnx_generator

    return load_onnx_generator(export_dir)


def run(engine: Engine, request: dict) -> tuple[str, Event, list[Event]]:
    return asyncio.run(collect(engine, request))


async def collect(engine: Engine, request: dict) -> tuple[str, Event, list[Event]]:
    text, events = [], []
    async for chunk in engine.generate(request):
        for ev in chunk:
            events.append(ev)
            if isinstance(ev, Delta):
                text.append(ev.text)
    return "".join(text), events[-1], events


def completion(prompt, max_tokens=16, **extra) -> dict:
    return {"kind": "completion", "prompt": prompt, "generation": {"max_new_tokens": max_tokens, "temperature": 0.0},
            **extra}


def test_engine_serves_the_export_through_onnx_runtime_on_cpu(engine):
    info = engine.info()
    assert info["kind"] == "onnx" and info["provider"] == "cpu"
    assert info["memory"]["policy"] == "sink"  # a window, so long conversations are never rejected


def test_a_greedy_completion_equals_the_onnx_generator(engine, reference):
    ref = reference.generate(["Hello there"], GenerationConfig(max_new_tokens=20, temperature=0),
                             memory=engine.model.memory)[0]
    text, end, _ = run(engine, completion("Hello there", 20))
    assert text == ref.text
    assert end.usage.completion_tokens == ref.completion_tokens
    assert end.usage.prompt_tokens == ref.prompt_tokens


def test_concurrent_requests_share_decode_steps_and_match_solo_decoding(engine, reference):
    """24 different prompts with different lengths run as one continuous batch. Left padding is masked
    out of attention (exact zeros), so every greedy continuation equals its solo decoding token for
    token; the batch sizes show the forward passes were shared."""
    rng = random.Random(1)
    prompts = ["".join(rng.choice("abcdefgh ijklmnop") for _ in range(rng.randint(1, 60))) for _ in range(24)]
    lengths = [30 - (i % 7) * 3 for i in range(24)]  # rows leave at different steps
    refs = [reference.generate([p], GenerationConfig(max_new_tokens=n, temperature=0), memory=engine.model.memory)[0]
            for p, n in zip(prompts, lengths)]

    async def main():
        return await asyncio.gather(*[collect(engine, completion(p, n)) for p, n in zip(prompts, lengths)])

    results = asyncio.run(main())
    assert [r[0] for r in results] == [r.text for r in refs]
    assert max(r[1].batch_mean for r in results) > 8


def test_a_new_request_joins_the_running_batch_between_decode_steps(engine):
    """A short request submitted while a long one decodes finishes first (iteration-level batching):
    it does not wait for the long one to end, and decoding steps are shared while both run."""
    async def main():
        long_events: list[dict] = []
        order: list[str] = []

        async def long():
            async for chunk in engine.generate(completion("a long one", 120)):
                long_events.extend(chunk)
            order.append("long")

        async def short():
            while sum(ev.tokens for ev in long_events if isinstance(ev, Delta)) < 5:  # the long one is mid-flight
                await asyncio.sleep(0.001)
            text, end, events = await collect(engine, completion("short", 5))
            order.append("short")
            return end, events

        (_, (end, events)) = await asyncio.gather(long(), short())
        return order, end, events, long_events

    order, end, events, long_events = asyncio.run(main())
    assert order == ["short", "long"]
    assert end.finish_reason == "length" and end.usage.completion_tokens == 5
    assert max(ev.batch for ev in events if isinstance(ev, Delta)) == 2
    assert max(ev.batch for ev in long_events if isinstance(ev, Delta)) == 2
    assert 1 < long_events[-1].batch_mean < 2  # shared some steps, ran alone for the rest
    assert long_events[-1].usage.completion_tokens == 120


def test_a_conversation_turn_prefills_only_the_new_tokens(engine, export_dir):
    """Turn k reuses turn k-1's KV state: cached_tokens is the previous context and the reply equals
    what a server without KV reuse answers (same tokens through one prefill or two)."""
    fresh = Engine(EngineConfig(model=str(export_dir), kv_reuse=False))
    try:
        messages: list[dict] = []
        previous_prompt = 0
        for turn in range(4):
            messages.append({"role": "user", "content": f"turn {turn}: tell me more"})
            request = {"kind": "chat", "messages": messages, "session_id": "conv-a",
                       "generation": {"max_new_tokens": 8, "temperature": 0.0}}
            text, end, events = run(engine, request)
            plain, plain_end, _ = run(fresh, {**request, "session_id": None})
            assert text == plain
            usage = end.usage
            if turn == 0:
                assert end.cache == "miss" and usage.cached_tokens == 0
            else:
                assert end.cache == "hit"
                # at least the previous prompt; its reply too where its text re-tokenizes the same way
                assert usage.cached_tokens >= previous_prompt
                new_tokens = usage.prompt_tokens - usage.cached_tokens
                assert new_tokens == usage.prefill_tokens < 40  # the new user message, not the history
            assert plain_end.usage.prefill_tokens == plain_end.usage.prompt_tokens
            previous_prompt = usage.prompt_tokens
            messages.append({"role": "assistant", "content": text})
    finally:
        fresh.close()


def test_an_edited_history_rewinds_the_cached_state_to_the_common_prefix(engine):
    base = [{"role": "user", "content": "first question"}]
    run(engine, {"kind": "chat", "messages": base, "session_id": "conv-edit",
                 "generation": {"max_new_tokens": 6, "temperature": 0.0}})
    edited = base + [{"role": "assistant", "content": "a reply the model never wrote"},
                     {"role": "user", "content": "next"}]
    _, end, _ = run(engine, {"kind": "chat", "messages": edited, "session_id": "conv-edit",
                             "generation": {"max_new_tokens": 6, "temperature": 0.0}})
    prefix = engine.model.template().render(base, add_generation_prompt=True)
    assert end.cache == "hit"
    assert end.usage.cached_tokens >= len(prefix)


def test_an_overlong_conversation_is_kept_going_by_the_window_and_reports_evictions(engine):
    messages: list[dict] = []
    evicted = []
    for turn in range(10):
        messages.append({"role": "user", "content": f"message number {turn} with some padding words"})
        text, end, _ = run(engine, {"kind": "chat", "messages": messages, "session_id": "conv-long",
                                    "generation": {"max_new_tokens": 8, "temperature": 0.0}})
        assert isinstance(end, Finished)
        evicted.append(end.usage.evicted_tokens)
        messages.append({"role": "assistant", "content": text})
    assert end.usage.prompt_tokens > 3 * engine.model.memory.capacity
    assert evicted[-1] > 0 and evicted == sorted(evicted)
    assert end.cache == "hit" and end.usage.prefill_tokens < 50


def test_the_full_policy_rejects_an_overflow_up_front_with_a_400(engine):
    _, end, _ = run(engine, completion("x" * 200, 8, memory={"policy": "full"}))
    assert isinstance(end, Failed) and end.status == 400 and end.code == "context_length_exceeded"


def test_a_per_request_window_is_validated_against_the_model(engine):
    _, end, _ = run(engine, completion("hello", 4, memory={"policy": "sink", "window": 10**6}))
    assert isinstance(end, Failed) and end.status == 400 and end.param == "window"
    _, end, _ = run(engine, completion("y" * 100, 4, memory={"policy": "sink", "window": 16, "sinks": 2}))
    assert isinstance(end, Finished) and end.usage.evicted_tokens > 0


def test_a_generation_setting_the_model_cannot_take_is_a_400_naming_it(engine):
    from ctxmem.serving.errors import APIError

    with pytest.raises(APIError) as caught:
        engine.prepare({"kind": "completion", "prompt": "x", "generation": {"top_p": 0.0}}, emit=lambda events: None)
    assert caught.value.status == 400 and caught.value.param == "top_p" and "top_p" in caught.value.message
    job = engine.prepare({"kind": "completion", "prompt": "x", "generation": {"top_k": None, "seed": 3}},
                         emit=lambda events: None)
    assert job.generation.seed == 3 and job.generation.top_k == engine.model.generator.defaults.top_k  # None = unset


def test_a_request_that_sets_only_sinks_gets_the_window_re_derived(engine):
    """The model's window (60) + 100 sinks does not fit its 128-token context: the window shrinks to
    what fits instead of the request being refused."""
    b = engine.model.generator.backend
    assert engine.model.memory.window + 100 > b.max_seq_len
    job = engine.prepare(completion("z", 2, memory={"sinks": 100}), emit=lambda events: None)
    assert (job.memory.policy, job.memory.sinks, job.memory.window) == ("sink", 100, b.max_seq_len - 100)
    _, end, _ = run(engine, completion("z" * 150, 4, memory={"sinks": 100}))
    assert isinstance(end, Finished) and end.usage.evicted_tokens > 0


def test_a_cancelled_request_leaves_the_batch(engine):
    async def main():
        gen = engine.generate(completion("cancel me", 4000))
        async for _ in gen:
            break
        await gen.aclose()  # the client went away
        for _ in range(200):
            if engine.scheduler.running == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())


def test_a_full_queue_answers_429(export_dir):
    eng = Engine(EngineConfig(model=str(export_dir), max_batch_size=1, max_queued=1))
    try:
        async def main():
            return await asyncio.gather(*[collect(eng, completion("q", 30)) for _ in range(6)])

        ends = [r[1] for r in asyncio.run(main())]
        assert any(isinstance(e, Failed) and e.status == 429 for e in ends)
        assert any(isinstance(e, Finished) for e in ends)
    finally:
        eng.close()


def test_batching_off_runs_one_sequence_at_a_time(export_dir):
    eng = Engine(EngineConfig(model=str(export_dir), max_batch_size=1))
    try:
        async def main():
            return await asyncio.gather(*[collect(eng, completion(f"p{i}", 6)) for i in range(4)])

        for _, end, events in asyncio.run(main()):
            assert isinstance(end, Finished)
            assert all(ev.batch == 1 for ev in events if isinstance(ev, Delta))
    finally:
        eng.close()


def test_a_checkpoint_directory_falls_back_to_pytorch(tiny_checkpoint):
    model = load_served_model(EngineConfig(model=str(tiny_checkpoint)))
    assert model.kind == "torch"


def test_a_model_spec_that_names_nothing_is_a_clear_error(tmp_path):
    from ctxmem.export.errors import ModelSpecError

    with pytest.raises(ModelSpecError, match="nowhere does not exist; --model takes a checkpoint or export"):
        load_served_model(EngineConfig(model=str(tmp_path / "nowhere")))
    (tmp_path / "file").write_text("")
    with pytest.raises(ModelSpecError, match="is a file"):
        load_served_model(EngineConfig(model=str(tmp_path / "file")))
    with pytest.raises(FileNotFoundError, match="neither model.onnx .* nor model.safetensors"):
        load_served_model(EngineConfig(model=str(tmp_path)))


def test_the_server_upgrades_a_full_policy_model_to_a_window_unless_told(export_dir):
    full = load_served_model(EngineConfig(model=str(export_dir), memory=MemoryOverrides(policy="full")))
    assert full.memory.policy == "full"
    window = load_served_model(EngineConfig(model=str(export_dir), memory=MemoryOverrides(window=32, sinks=2))).memory
    assert (window.policy, window.window, window.sinks) == ("sink", 32, 2)


# ---- the pieces ------------------------------------------------------------------------------------
def test_session_cache_is_lru_bounded_in_entries_and_bytes():
    def item(n: int) -> CachedConversation:
        return CachedConversation("v", None, [], None, n)

    cache = SessionCache(max_bytes=100, max_entries=2)
    cache.put("a", item(10))
    cache.put("b", item(10))
    cache.put("c", item(10))
    assert cache.take("a") is None and len(cache) == 2
    cache.put("d", item(95))
    assert len(cache) == 1 and cache.nbytes == 95
    cache.put("e", item(101))  # larger than the whole cache: not kept
    assert cache.take("e") is None


def test_swapping_a_model_out_drops_only_its_conversation_states():
    from ctxmem.serving.metrics import Registry
    from ctxmem.serving.scheduler import Scheduler

    scheduler = Scheduler(EngineConfig(model="unused"), Registry())
    try:
        scheduler.cache.put("old-1", CachedConversation("old", None, [], None, 10))
        scheduler.cache.put("new-1", CachedConversation("new", None, [], None, 20))
        scheduler.cache.put("old-2", CachedConversation("old", None, [], None, 30))
        scheduler.drop_version("old")
        assert len(scheduler.cache) == 1 and scheduler.cache.nbytes == 20
        assert scheduler.cache.take("new-1").version == "new"
    finally:
        scheduler.stop()


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0


def test_reuse_refuses_to_rewind_into_evicted_tokens(engine):
    """After eviction the cache holds [sinks | recent]; rewinding past the recent tail would need
    tokens that are gone, so that is a miss, never a wrong state."""
    from ctxmem.memory import ContextMemory, MemoryConfig

    memory = ContextMemory(engine.model.generator.backend, MemoryConfig(policy="sink", window=16, sinks=2))
    history = list(range(10, 60))
    state = memory.start(1)
    memory.feed(state, [history])
    assert int(state.seen[0]) - int(state.lengths()[0]) > 0
    entry = CachedConversation("v", memory.config, history, state, 0)
    assert reuse(entry, history[:-5] + [1, 2], memory)[1] == len(history) - 5  # inside the tail: rewound
    entry = CachedConversation("v", memory.config, history, state, 0)
    assert reuse(entry, history[:20] + [1], memory) is None  # into evicted tokens: rebuild


def test_rewind_forgets_exactly_the_last_tokens(engine):
    from ctxmem.memory import ContextMemory

    memory = ContextMemory(engine.model.generator.backend, engine.model.memory)
    state = memory.start(1)
    memory.feed(state, [[5, 6, 7, 8, 9]])
    back = rewind(memory, state, 2)
    assert back.kept_tokens(0) == [5, 6, 7] and int(back.seen[0]) == 3
    full = memory.start(1)
    a = memory.feed(back, [[1]])
    b = memory.feed(full, [[5, 6, 7, 1]])
    # same tokens, prefilled in one piece or two: equal up to fp32 rounding of different GEMM shapes
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_reconfigure_to_another_model_rolls_over_while_a_request_is_in_flight(export_dir, tiny_checkpoint):
    eng = Engine(EngineConfig(model=str(export_dir)))
    try:
        async def main():
            gen = eng.generate(completion("in flight", 300))
            first = await gen.__anext__()
            swap = asyncio.create_task(asyncio.to_thread(
                eng.reconfigure, eng.config.model_copy(update={"model": str(tiny_checkpoint)})))
            rest = [ev for chunk in [first] + [c async for c in gen] for ev in chunk]
            return await swap, rest[-1]

        info, end = asyncio.run(main())
        assert info["changed"] is True and info["kind"] == "torch"
        assert isinstance(end, Finished) and end.usage.completion_tokens == 300
        assert isinstance(run(eng, completion("after", 3))[1], Finished)
    finally:
        eng.close()


def test_a_loading_knob_changed_by_reconfigure_reloads_the_same_model(small_export):
    # the spec resolves to the same folder, but how it is loaded changed: the replica loads it again
    # (a changed intra_op_threads or provider used to be accepted and never applied)
    eng = Engine(EngineConfig(model=str(small_export)))
    try:
        greedy = completion("the cat", 24)
        before = run(eng, greedy)[0]
        assert eng.info()["decode_session"] is False
        info = eng.reconfigure(eng.config.model_copy(update={"decode_session": True}))
        assert info["changed"] is True and info["decode_session"] is True
        assert run(eng, greedy)[0] == before  # the decode session gives the same tokens
        info = eng.reconfigure(eng.config.model_copy(update={"max_batch_size": 4}))  # a runtime knob only
        assert "changed" not in info and info["decode_session"] is True
        assert eng.reconfigure(eng.config.model_copy(update={"intra_op_threads": 2}))["changed"] is True
    finally:
        eng.close()


def test_a_paced_stream_sends_its_first_text_at_once_and_the_rest_with_its_end(export_dir, engine, monkeypatch):
    """The scheduler paces a stream (stream_interval_ms): with an interval longer than the request, the
    first text goes out as soon as it is decoded and everything after it with the end - two messages;
    with 0, a message per decode step. The text is the same either way. Messages are counted where the
    scheduler sends them: what `Engine.generate` yields also depends on how fast its consumer reads (a
    consumer that falls behind gets what piled up as one chunk), so its chunks are not counted."""
    from ctxmem.serving import scheduler

    request = completion("pacing", 40, generation={"max_new_tokens": 40, "temperature": 0.0, "stop_token_ids": []})
    sent: list[int] = []  # events per message, in the order the scheduler sent them
    deliver = scheduler._deliver

    def counting(deliveries):
        sent.extend(len(events) for _, events in deliveries)
        deliver(deliveries)

    monkeypatch.setattr(scheduler, "_deliver", counting)

    def run(eng):
        sent.clear()
        chunks = asyncio.run(collect(eng))
        return chunks, list(sent)

    async def collect(eng):
        return [chunk async for chunk in eng.generate(request)]

    paced = Engine(EngineConfig(model=str(export_dir), stream_interval_ms=60_000), model=engine.model)
    eager = Engine(EngineConfig(model=str(export_dir), stream_interval_ms=0), model=engine.model)
    try:
        slow, slow_sent = run(paced)
        every, every_sent = run(eager)
    finally:
        paced.close()
        eager.close()

    def text(chunks):
        return "".join(ev.text for chunk in chunks for ev in chunk if isinstance(ev, Delta))

    # paced: the first text alone, then the rest with the end (the end is never held for the interval)
    assert len(slow_sent) == 2, slow_sent
    assert any(isinstance(ev, Delta) and ev.text for ev in slow[0]), slow
    assert isinstance(slow[-1][-1], Finished) and slow[-1][-1].usage.completion_tokens == 40
    assert len(every_sent) >= 39, every_sent  # unpaced: one message per decode step
    assert text(every) == text(slow)


# ---- no request can hurt the replica -----------------------------------------------------------------
POISON_SEED = 4242
HEALTHY_TOKENS = 300


def test_a_row_whose_logits_go_non_finite_fails_alone_while_the_batch_goes_on(engine, reference, monkeypatch):
    """A fault injected into one row (its logits turn NaN after 3 tokens, so the real sampler has
    nothing to pick from) fails that request with a 500 event; the request sharing its decode steps
    streams on and equals its solo decoding."""
    poison_rows_after(monkeypatch, POISON_SEED, 3)
    # the healthy request is long enough to be still decoding when the poisoned one joins: its tokens
    # reach this consumer in paced messages (the stream interval), not one per decode step
    ref = reference.generate(["the healthy one"], GenerationConfig(max_new_tokens=HEALTHY_TOKENS, temperature=0),
                             memory=engine.model.memory)[0]
    before = _counter(engine, "ctxmem_failed_sequences_total", {"stage": "decode"})

    async def main():
        healthy_events: list[Event] = []

        async def healthy():
            async for chunk in engine.generate(completion("the healthy one", HEALTHY_TOKENS)):
                healthy_events.extend(chunk)

        async def poisoned():
            while sum(ev.tokens for ev in healthy_events if isinstance(ev, Delta)) < 3:
                await asyncio.sleep(0.001)
            poison = completion("poisoned", 30)
            poison["generation"]["seed"] = POISON_SEED
            return await collect(engine, poison)

        _, (_, poison_end, poison_events) = await asyncio.gather(healthy(), poisoned())
        return healthy_events, poison_end, poison_events

    healthy_events, poison_end, poison_events = asyncio.run(main())
    assert isinstance(poison_end, Failed) and poison_end.status == 500 and poison_end.code == "engine_failure"
    assert "NonFiniteLogitsError" in poison_end.message
    assert sum(ev.tokens for ev in poison_events if isinstance(ev, Delta)) == 3  # it had streamed before failing
    end = healthy_events[-1]
    assert isinstance(end, Finished) and end.usage.completion_tokens == HEALTHY_TOKENS
    assert "".join(ev.text for ev in healthy_events if isinstance(ev, Delta)) == ref.text
    assert max(ev.batch for ev in healthy_events if isinstance(ev, Delta)) == 2  # they shared decode steps
    assert _counter(engine, "ctxmem_failed_sequences_total", {"stage": "decode"}) == before + 1
    assert engine.healthy() and engine.scheduler.restarts == 0


def test_extreme_but_valid_sampling_settings_finish(engine):
    """Settings at the ends of their ranges that used to overflow the sampler (5e-324 / T = inf)."""
    greedy, _, _ = run(engine, completion("extreme", 12))
    for generation in ({"temperature": 5e-324, "seed": 0}, {"temperature": 1e-300, "top_p": 1e-12},
                       {"temperature": 2.0, "top_k": 2**31 - 1, "seed": 2**63 - 1},
                       {"temperature": 1.0, "repetition_penalty": 1e-300}, {"repetition_penalty": 100.0}):
        request = completion("extreme", 12)
        request["generation"].update(generation)
        text, end, _ = run(engine, request)
        assert isinstance(end, Finished) and end.usage.completion_tokens >= 1, (generation, end)
        if 0 < generation.get("temperature", 1.0) <= 1e-300:
            assert text == greedy, generation  # a vanishing temperature is greedy


def test_a_dead_scheduler_loop_fails_its_requests_and_is_restarted(export_dir):
    """An exception outside any row kills the loop: its running request fails with a 500 event, the
    supervisor counts the restart and reports the engine down meanwhile, and a request submitted
    while it is down is served by the restarted loop."""
    from ctxmem.serving.events import FINAL
    from ctxmem.serving.metrics import render

    eng = Engine(EngineConfig(model=str(export_dir)))
    sched = eng.scheduler
    armed = {"on": False, "fired": False}
    gauges = sched._gauges

    def dying_gauges():
        if armed["on"] and not armed["fired"]:
            armed["fired"] = True
            raise RuntimeError("injected loop fault")
        gauges()

    seen_down: list[tuple] = []
    queued_meanwhile: list[Event] = []
    fail_in_flight = sched._fail_in_flight

    def observed_fail_in_flight(err):  # before the failure reaches the client, so no race with the test
        seen_down.append((eng.healthy(), sched.alive(), sched.state(), eng.info()["scheduler"]))
        sched.submit(eng.prepare(completion("while down", 6), queued_meanwhile.extend))
        fail_in_flight(err)

    sched._gauges = dying_gauges
    sched._fail_in_flight = observed_fail_in_flight
    try:
        async def main():
            events: list[Event] = []
            async for chunk in eng.generate(completion("killed mid-stream", 200)):
                events.extend(chunk)
                if sum(ev.tokens for ev in events if isinstance(ev, Delta)) >= 3:
                    armed["on"] = True
            return events

        events = asyncio.run(main())
        assert isinstance(events[-1], Failed) and events[-1].status == 500
        assert "injected loop fault" in events[-1].message and events[-1].code == "engine_failure"
        # down while it restarts, yet one death does not make the replica unhealthy (Serve keeps it)
        assert seen_down == [(True, False, "restarting", "restarting")]
        for _ in range(500):  # the restarted loop serves what queued meanwhile
            if queued_meanwhile and isinstance(queued_meanwhile[-1], FINAL):
                break
            time.sleep(0.02)
        assert isinstance(queued_meanwhile[-1], Finished) and queued_meanwhile[-1].usage.completion_tokens == 6
        assert eng.healthy() and sched.state() == "running" and sched.restarts == 1
        assert isinstance(sched.error, RuntimeError)
        assert b"ctxmem_scheduler_restarts_total 1.0" in render([eng.metrics.snapshot()])
        _, end, _ = run(eng, completion("after the restart", 5))
        assert isinstance(end, Finished) and end.usage.completion_tokens == 5
    finally:
        eng.close()
    assert sched.state() == "stopped" and not eng.healthy()


def test_a_scheduler_loop_that_keeps_dying_makes_the_replica_unhealthy(export_dir):
    """Restarting in place is for isolated faults: after 3 deaths in a row the engine reports itself
    unhealthy, so Ray Serve's health check replaces the replica."""
    from ctxmem.serving.scheduler import CRASH_LOOP_DEATHS

    eng = Engine(EngineConfig(model=str(export_dir)))
    sched = eng.scheduler
    health: list[bool] = []

    def always_dying_gauges():
        health.append(eng.healthy())
        raise RuntimeError("injected fault, every step")

    sched._gauges = always_dying_gauges
    try:
        for i in range(CRASH_LOOP_DEATHS):  # each request runs one loop step, which dies
            _, end, _ = run(eng, completion(f"doomed {i}", 50))
            assert isinstance(end, Failed) and "injected fault" in end.message
            for _ in range(500):
                if sched.restarts == i + 1 and (sched.alive() or i + 1 == CRASH_LOOP_DEATHS):
                    break
                time.sleep(0.02)
        assert sched.restarts == CRASH_LOOP_DEATHS and health == [True] * CRASH_LOOP_DEATHS
        assert sched.crash_looping() and not eng.healthy()
    finally:
        eng.close()


def _counter(engine: Engine, name: str, labels: dict[str, str]) -> float:
    for family in engine.metrics.snapshot():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0
