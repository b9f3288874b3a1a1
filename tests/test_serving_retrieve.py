"""The `retrieve` memory policy in serving (issue 14): a fact given early in a conversation is answered
many windows later, the response says what memory did (evicted tokens, and the evicted tokens put
back with their text), and a conversation moved to another replica - rebuilt there from its history -
gives the same replies as on the replica that kept its state.

The model is bench/models/recall-small (recall-trained, byte tokenizer, context 256), served from
its checkpoint (the PyTorch backend) with 4 sinks, a window of 64 and 32 tokens put back. It is not
chat-trained (under the chat template it answers nothing, even inside its window), so the
conversation is raw text through the completions path: each turn's prompt is the whole conversation
so far, the replies included, and the session id lets the engine reuse its state.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.recall_facts import FactGenerator
from ctxmem.serving.config import EngineConfig, MemoryOverrides, RequestMemory
from ctxmem.serving.engine import Engine
from ctxmem.serving.errors import APIError
from ctxmem.serving.events import Delta, Finished
from ctxmem.serving.kv_reuse import CachedConversation, reuse
from ctxmem.serving.limits import check_memory, outside
from ctxmem.serving.metrics import render
from ctxmem.serving.protocol import parse_completion, usage
from helpers_serving import REPO

RECALL_MODEL = REPO / "bench" / "models" / "recall-small"
WINDOW, SINKS, BUDGET, STORE = 64, 4, 32, 512
SINK = {"policy": "sink", "window": WINDOW, "sinks": SINKS}  # the same window without the store


def engine_config(**extra) -> EngineConfig:
    return EngineConfig(model=str(RECALL_MODEL), memory=MemoryOverrides(
        policy="retrieve", window=WINDOW, sinks=SINKS, budget=BUDGET, store=STORE), **extra)


@pytest.fixture(scope="module")
def replicas():
    """Two engines of one deployment: each keeps its own conversation states."""
    a, b = Engine(engine_config()), Engine(engine_config())
    yield a, b
    a.close()
    b.close()


async def _collect(engine: Engine, request: dict) -> tuple[str, Finished]:
    text, last = [], None
    async for chunk in engine.generate(request):
        for ev in chunk:
            last = ev
            if isinstance(ev, Delta):
                text.append(ev.text)
    assert isinstance(last, Finished), last
    return "".join(text), last


def run(engine: Engine, prompt: str, sid: str | None, max_tokens: int, memory: dict | None = None,
        stop: list[str] | None = None) -> tuple[str, Finished]:
    request = {"kind": "completion", "prompt": prompt, "session_id": sid, "memory": memory,
               "generation": {"max_new_tokens": max_tokens, "temperature": 0.0, "stop": stop or []}}
    return asyncio.run(_collect(engine, request))


def conversation(seed: int, turns: int) -> tuple[list[str], str]:
    """Turn 1 states a fact among filler, the next turns are filler, the last asks for the fact."""
    facts = FactGenerator(seed)
    fact = facts.facts(1)[0]
    return [fact.statement + " " + facts.filler(20)] + [facts.filler(20) for _ in range(turns - 2)] + \
        [fact.question], fact.answer


def chat(engine: Engine, texts: list[str], sid: str, memory: dict | None = None) -> tuple[str, list[Finished]]:
    """The turns through one session; returns the whole text and every turn's end."""
    history, ends = "", []
    for i, text in enumerate(texts):
        history += (" " if history else "") + text
        last = i == len(texts) - 1
        reply, end = run(engine, history, sid, 6 if last else 3, memory, ["."] if last else None)
        history += reply
        ends.append(end)
    return history, ends


def test_a_fact_from_turn_1_is_recalled_turns_later_under_retrieve_and_lost_under_sink(replicas):
    a, _ = replicas
    texts, answer = conversation(seed=0, turns=10)
    history, ends = chat(a, texts, "recall")
    last = ends[-1].usage
    assert history.endswith(answer), history[-80:]
    # the question is far past the window: hundreds of tokens evicted, some of them put back
    assert last.prompt_tokens > 4 * WINDOW and last.evicted_tokens > 3 * WINDOW
    assert all(e.cache == "hit" for e in ends[1:]) and last.cached_tokens > last.prompt_tokens - 48
    # what was put back for the answer holds the fact, its value included
    assert 0 < last.recalled_tokens <= 2 * BUDGET  # the union over the reply's tokens
    assert any(answer.strip() in r.text for r in last.recalled), last.recalled
    start = texts[0].index(answer)  # bytes = tokens: the value's index in the conversation
    assert any(r.start <= start < r.start + r.tokens for r in last.recalled), (start, last.recalled)
    body = usage(ends[-1])
    assert body["recalled_tokens"] == last.recalled_tokens and body["recalled"][0]["text"] == last.recalled[0].text
    assert body["evicted_tokens"] == last.evicted_tokens

    # the same conversation under sink (same window, no store): the fact is gone, nothing is recalled
    sink_history, sink_ends = chat(a, texts, "sink", SINK)
    assert not sink_history.endswith(answer)
    assert sink_ends[-1].usage.recalled is None and "recalled" not in usage(sink_ends[-1])
    assert sink_ends[-1].usage.evicted_tokens > 0


def test_a_conversation_moved_to_another_replica_gives_the_same_reply_and_store(replicas):
    """Replica A served the turns so far and holds the state; B never saw the conversation and
    rebuilds it from the history. The next turn is the same on both (greedy), and so are the stores."""
    a, b = replicas
    texts, answer = conversation(seed=1, turns=7)
    history, _ = chat(a, texts[:-1], "moved")
    prompt = history + " " + texts[-1]
    on_a, end_a = run(a, prompt, "moved", 6, stop=["."])
    on_b, end_b = run(b, prompt, "moved", 6, stop=["."])
    assert end_a.cache == "hit" and end_b.cache == "miss" and end_b.usage.cached_tokens == 0
    assert on_a == on_b and on_a.startswith(answer)
    assert end_a.usage.evicted_tokens == end_b.usage.evicted_tokens > 2 * WINDOW
    assert end_a.usage.recalled == end_b.usage.recalled and end_a.usage.recalled_tokens > 0
    kept_a, kept_b = a.scheduler.cache.take("moved"), b.scheduler.cache.take("moved")
    assert kept_a.history == kept_b.history
    sa, sb = kept_a.state.stores[0], kept_b.state.stores[0]
    assert (sa.lo, sa.hi, sa.chosen) == (sb.lo, sb.hi, sb.chosen)
    assert np.array_equal(sa.ids, sb.ids)
    every = [(block, 0) for block in range((sa.lo - SINKS) // 16, (sa.hi - 1 - SINKS) // 16 + 1)]  # 16: block
    got_a, got_b = sa.gather(every), sb.gather(every)  # stream indices, k, v, ids of every stored token
    assert np.array_equal(got_a[0], got_b[0]) and len(got_a[0]) == sa.hi - sa.lo
    np.testing.assert_allclose(got_a[1], got_b[1], atol=1e-4)  # pieced prefill vs token by token
    # the store is bounded: STORE tokens whatever the conversation's length, counted with the state
    assert sa.hi - sa.lo <= STORE and kept_a.store_nbytes == sa.nbytes
    assert kept_a.nbytes > kept_a.store_nbytes
    # /metrics' gauge of the kept stores' bytes
    a.scheduler.cache.put("moved", kept_a)
    a.scheduler._gauges()
    scraped = dict(line.split() for line in render([a.metrics.snapshot()]).decode().splitlines()
                   if line and not line.startswith("#"))
    assert float(scraped["ctxmem_kv_cache_store_bytes"]) == a.scheduler.cache.store_bytes >= sa.nbytes
    assert float(scraped["ctxmem_recalled_tokens_total"]) > 0


def test_an_edited_history_past_the_window_is_rebuilt_not_rewound(replicas):
    """A retrieve state past its window cannot be rewound (its store moved with the tokens): the
    engine rebuilds from the prompt and answers exactly what a replica without the state answers."""
    a, b = replicas
    texts, _ = conversation(seed=2, turns=4)
    history, _ = chat(a, texts, "edit")
    edited = history[:-3] + " The river waits near the hill."  # the last reply rewritten
    on_a, end_a = run(a, edited, "edit", 4)
    on_b, end_b = run(b, edited, None, 4)
    assert end_a.cache == "miss" and end_a.usage.cached_tokens == 0
    assert (on_a, end_a.usage.evicted_tokens, end_a.usage.recalled) == (on_b, end_b.usage.evicted_tokens,
                                                                        end_b.usage.recalled)


def test_reuse_falls_back_to_a_rebuild_where_rewind_refuses(replicas):
    a, _ = replicas
    memory = ContextMemory(a.model.generator.backend, a.model.memory)
    history = list(range(40, 40 + WINDOW + 40))
    state = memory.start(1)
    memory.feed(state, [history])
    assert state.stores[0] is not None  # past the window: its store holds evicted tokens
    entry = CachedConversation("v", memory.config, history, state, 0)
    assert reuse(entry, history + [1, 2], memory)[1] == len(history)  # an extension: reused as is
    entry = CachedConversation("v", memory.config, history, state, 0)
    assert reuse(entry, history[:-3] + [1], memory) is None  # would rewind: rebuild instead of failing


def test_a_request_sets_the_budget_and_keeps_the_servers_store_bound(replicas):
    """On a retrieve server a request may change the budget (a knob the server must allow, like window
    and sinks) but never the store's bound; on a sink server a budget alone is a 400 naming it."""
    a, _ = replicas
    assert (a.model.memory.policy, a.model.memory.store) == ("retrieve", STORE)
    got = Engine._memory(a.model, {"budget": 16})
    assert (got.policy, got.store, got.budget, got.window, got.sinks) == ("retrieve", STORE, 16, WINDOW, SINKS)
    assert Engine._memory(a.model, SINK).policy == "sink"
    with pytest.raises(APIError) as err:
        Engine._memory(a.model, {"budget": 10_000})  # more than the context leaves
    assert err.value.status == 400 and err.value.param == "budget"
    with pytest.raises(APIError) as err:
        Engine._memory(a.model, {**SINK, "budget": 16})
    assert err.value.status == 400 and err.value.param == "budget"

    _, payload = parse_completion({"model": "m", "prompt": "x", "policy": "retrieve", "budget": 16}, 64, 16)
    assert payload["memory"] == {"policy": "retrieve", "budget": 16}
    allowed = RequestMemory()
    assert "retrieve" in allowed.policies and outside(payload["memory"], allowed) == ["budget"]
    with pytest.raises(APIError) as err:
        check_memory(payload["memory"], allowed, {"policy": "sink"})
    assert err.value.param == "budget" and "not allowed" in err.value.message
    check_memory(payload["memory"], RequestMemory(budgets=[16]))  # listed: allowed
    check_memory(payload["memory"], allowed, {"policy": "retrieve", "budget": 16})  # the server's own: allowed
    assert MemoryOverrides(policy="retrieve", store=512).store == 512


def test_the_serve_command_line_sets_the_retrieve_policy():
    import argparse

    from ctxmem.serving.cli import register, serve_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", str(RECALL_MODEL), "--policy", "retrieve", "--window", "64",
                              "--budget", "32", "--store", "512", "--every", "4"])
    memory = serve_args(args).engine.memory
    assert (memory.policy, memory.window, memory.budget, memory.store, memory.every, memory.sinks) == \
        ("retrieve", 64, 32, 512, 4, None)
    assert serve_args(parser.parse_args(["serve", "--model", "m"])).engine.memory is None
    # a text model's conversation as one running text (the chat page on recall-small)
    assert serve_args(args).engine.chat_template == "model"
    assert serve_args(parser.parse_args(["serve", "--model", "m", "--chat-template", "text"])).engine.chat_template == \
        "text"
    with pytest.raises(ValueError, match="chat_template"):
        EngineConfig(model="m", chat_template="chat")
    assert MemoryConfig(policy="retrieve", window=64, budget=32, store=512).resolve(256).capacity == 100


def test_on_onnx_runtime_a_moved_conversation_gives_the_same_reply(tiny_export):
    """The production path: the tiny export (contract v4: its graph gives the queries) under retrieve on
    two engines, choosing every 4 tokens (a rebuilt prompt is fed in pieces cut there). Sampled at
    temperature 1 with a seed (the random model's greedy text is empty), so the replies compare many
    tokens; equal logits give equal samples."""
    config = EngineConfig(model=str(tiny_export), memory=MemoryOverrides(policy="retrieve", window=60, sinks=4,
                                                                         budget=32, store=256, every=4))
    a, b = Engine(config), Engine(config)
    try:
        assert a.model.kind == "onnx" and (a.model.memory.policy, a.model.memory.every) == ("retrieve", 4)

        def turn(engine, prompt, sid, max_tokens):
            request = {"kind": "completion", "prompt": prompt, "session_id": sid, "generation": {
                "max_new_tokens": max_tokens, "temperature": 1.0, "seed": 7, "stop_token_ids": []}}
            return asyncio.run(_collect(engine, request))

        # the random model's sampled bytes need not be valid UTF-8, so its text would not read back as
        # the same tokens: the turns before the last keep no reply (one token, never fed back)
        history = ""
        for i in range(4):
            history += f" Turn {i}: the river walks past the hill, the wind forgets the room."
            turn(a, history, "ort", 1)
        prompt = history + " Turn 4: and then?"
        on_a, end_a = turn(a, prompt, "ort", 16)
        on_b, end_b = turn(b, prompt, "ort", 16)
        assert (end_a.cache, end_b.cache) == ("hit", "miss")
        assert end_a.usage.evicted_tokens > 2 * 60 and end_a.usage.recalled_tokens > 0
        assert on_a == on_b and len(on_a) > 0
        assert (end_a.usage.evicted_tokens, end_a.usage.recalled) == (end_b.usage.evicted_tokens, end_b.usage.recalled)
    finally:
        a.close()
        b.close()


def test_the_recall_log_keeps_the_union_of_put_back_blocks_as_runs_with_their_text():
    """RecallLog without a model: blocks noted over several steps (one growing, one dropped from the
    store later) become runs of consecutive tokens, in conversation indices (the stream prefix off)."""
    from ctxmem.serving.recall import RecallLog

    class Store:  # StreamStore's chosen and gather, over a stream whose token at index t is t
        def __init__(self, chosen, hi):
            self.chosen, self.hi = chosen, hi

        def gather(self, chosen):
            t = np.concatenate([np.arange(4 + 16 * b, min(4 + 16 * (b + 1), self.hi)) for b, _ in chosen])
            return t, None, None, t

    log = RecallLog(offset=2)
    log.note(None)  # nothing evicted yet
    log.note(Store(((1, 16), (2, 10)), hi=46))  # block 2 still filling
    log.note(Store(((1, 16), (2, 10)), hi=46))  # the same choice: nothing new
    log.note(Store(((2, 16), (5, 16)), hi=100))  # block 2 grown; block 1 no longer chosen, still reported
    runs = log.ranges(lambda ids: ",".join(map(str, ids)))
    assert [(r.start, r.tokens) for r in runs] == [(20 - 2, 32), (84 - 2, 16)]
    assert runs[0].text.split(",")[0] == "20" and runs[1].text.split(",")[-1] == "99"
    assert RecallLog(0).ranges(str) == ()
