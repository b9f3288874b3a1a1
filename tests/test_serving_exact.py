"""Correctness never depends on routing: a conversation well past the sink window, served from its
cached KV state (X-Session-Id) and rebuilt from its whole history (no session), gives identical
greedy replies at every turn - over the OpenAI HTTP API of the in-process app."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from ctxmem.serving.api import LocalEngineClient, build_api
from ctxmem.serving.config import ServeArgs
from ctxmem.serving.engine import Engine
from ctxmem.serving.store import MemoryStore
from helpers_serving import API_KEY, AUTH

NAME = "tiny"
MEMORY = {"policy": "sink", "sinks": 4, "window": 44}  # 48 slots: the conversation outgrows it by turn 2
TURNS = 10


@pytest.fixture(scope="module")
def sharp_export(tmp_path_factory):
    """A tiny random model with weights scaled up, so its greedy choices hinge on the exact context
    (at the usual 0.02 init a random model's argmax barely depends on what it attends to, and a
    wrong window would go unnoticed); exported through the CLI like any other."""
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.cli import main
    from ctxmem.config import preset
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(1)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, tie_embeddings=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                param.mul_(8)
        # replies in printable ASCII (comparable text, never an end token): other logits are 0, below
        # the best of 95 random printable ones
        printable = torch.zeros(tok.vocab_size, dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0.0
        model.lm_head.weight[printable] *= 20
    ckpt = tmp_path_factory.mktemp("sharp") / "ckpt"
    save_checkpoint(ckpt, model, tok)
    out = ckpt.parent / "export"
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--policy", "sink", "--sinks", "4",
                 "--window", "44"]) == 0
    return out


@pytest.fixture(scope="module")
def app(sharp_export):
    args = ServeArgs(model=str(sharp_export), model_name=NAME, api_keys=[API_KEY], max_tokens_limit=512).resolve()
    engine = Engine(args.engine)
    yield build_api(LocalEngineClient(engine), args, MemoryStore())
    engine.close()


def chat(app, messages, headers):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/chat/completions", headers=headers, json={
                "model": NAME, "messages": messages, "max_tokens": 12, "temperature": 0, **MEMORY})

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    return r.json()


def test_cached_session_and_rebuilt_history_give_the_same_greedy_replies(app):
    history: list[dict] = []
    cached_turns = 0
    for turn in range(TURNS):
        history.append({"role": "user", "content": f"turn {turn}: tell me about the number {turn * 37 % 101}"})
        cached = chat(app, history, {**AUTH, "X-Session-Id": "exact-1"})
        rebuilt = chat(app, history, AUTH)
        a, b = cached["choices"][0]["message"]["content"], rebuilt["choices"][0]["message"]["content"]
        assert a == b, f"turn {turn}: cached {a!r} != rebuilt {b!r}"
        details = cached["usage"].get("prompt_tokens_details") or {}
        cached_turns += bool(details.get("cached_tokens"))
        history.append({"role": "assistant", "content": a})
    prompt_tokens = rebuilt["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * (MEMORY["sinks"] + MEMORY["window"]), "the conversation must go well past the window"
    assert cached_turns >= TURNS - 2, "the session path must actually reuse its KV state"
