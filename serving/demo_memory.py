"""`ctxmem demo`'s memory segment: a fact given in turn 1 of a conversation is asked for at turn 20,
hundreds of tokens (several windows) later, under the `retrieve` policy and under `sink`, side by side.

The model is bench/models/recall-small (recall-trained; the demo's own CPU-trained model recalls
nothing), exported to ONNX by the demo (`ctxmem export --policy retrieve ...`, contract v4: the graph
gives the queries retrieve scores with) and served by ONNX Runtime; its checkpoint directory works too (PyTorch, about
twice the CPU). It is not chat-trained - under the chat template it answers nothing even inside its window -
so it is served as text (`--chat-template text`: the messages are one running text, each user message
joined by a space, each reply appended) and asked through `/v1/chat/completions` with the whole history,
in one `X-Session-Id` so the engine reuses its KV state and its store. It is served in this process: the
same engine and API app as `ctxmem serve --model EXPORT --chat-template text --policy retrieve ...`, on
uvicorn instead of Ray Serve
(a second Ray application would cost more than the segment itself). One conversation runs under the
server's `retrieve`, the other asks for `sink` with the same sinks and window (the request knobs the
API takes), so the only difference is the store.
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

RECALL_MODEL = Path(__file__).resolve().parents[1] / "bench" / "models" / "recall-small"
NAME = "recall-small"
TURNS = 20
SEED = 0  # which fact and filler (ctxmem.recall_facts.FactGenerator)
MEMORY = {"policy": "retrieve", "window": 64, "sinks": 4, "budget": 32, "store": 1024}
SINK = {"policy": "sink", "window": MEMORY["window"], "sinks": MEMORY["sinks"]}


def serve_command(model: Path = RECALL_MODEL) -> str:
    """The `ctxmem serve` command that serves what this segment serves in process (as text, so that
its chat page can hold the same conversation: README, "The chat page")."""
    flags = " ".join(f"--{k} {v}" for k, v in MEMORY.items())
    return f"ctxmem serve --model {model} --chat-template text {flags}"  # text: the chat page works too


def conversation(seed: int = SEED, turns: int = TURNS) -> tuple[list[str], Any]:
    """Turn 1 states the fact among filler, turns 2..turns-1 are filler, the last asks for it."""
    from ctxmem.recall_facts import FactGenerator

    facts = FactGenerator(seed)
    fact = facts.facts(1)[0]
    return [fact.statement + " " + facts.filler(20)] + [facts.filler(20) for _ in range(turns - 2)] + \
        [fact.question], fact


class _Server:
    """The API app on uvicorn in a thread (127.0.0.1, a free port)."""

    def __init__(self, app):
        import uvicorn

        from ctxmem.net import free_port

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def run_memory_demo(say: Callable[[str], None], model: Path = RECALL_MODEL, turns: int = TURNS,
                    seed: int = SEED) -> dict[str, Any]:
    """Runs the segment, prints it, returns its report (for demo_report.json)."""
    if not ((model / "model.safetensors").exists() or (model / "model.onnx").exists()):
        print(f"  skipped: the recall-trained model is not at {model} (it ships in the repository's bench/)",
              file=sys.stderr)
        return {"skipped": f"no model at {model}"}
    import logging

    from openai import OpenAI

    from .api import LocalEngineClient, build_api
    from .config import ServeArgs
    from .engine import Engine
    from .store import MemoryStore

    for name in ("httpx", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"  served in this process, as `{serve_command(model)}` serves it (uvicorn instead of Ray Serve)",
          file=sys.stderr, flush=True)
    args = ServeArgs(model=str(model), model_name=NAME,
                     engine={"model": str(model), "memory": MEMORY, "chat_template": "text"}).resolve()
    engine = Engine(args.engine)
    texts, fact = conversation(seed, turns)
    try:
        with _Server(build_api(LocalEngineClient(engine), args, MemoryStore())) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
            rows = _converse(client, texts)
    finally:
        engine.close()
    return _report(say, str(model), texts, fact, rows)


def _converse(client, texts: list[str]) -> list[dict[str, Any]]:
    """Both conversations, turn by turn: per turn and policy the reply and its usage."""
    history: dict[str, list[dict[str, str]]] = {"retrieve": [], "sink": []}
    rows = []
    print("\n  turn  prompt tokens | retrieve: evicted  put back | sink: evicted", file=sys.stderr)
    for turn, text in enumerate(texts, 1):
        last = turn == len(texts)
        row: dict[str, Any] = {"turn": turn, "user": text}
        for policy in ("retrieve", "sink"):
            history[policy].append({"role": "user", "content": text})
            reply = client.chat.completions.create(
                model=NAME, messages=history[policy], max_tokens=6 if last else 3, temperature=0,
                stop=["."] if last else None, extra_headers={"X-Session-Id": f"demo-memory-{policy}"},
                extra_body=SINK if policy == "sink" else None)
            answer = reply.choices[0].message.content
            history[policy].append({"role": "assistant", "content": answer})
            row[policy] = {"reply": answer, "usage": reply.usage.model_dump()}
        r, s = row["retrieve"]["usage"], row["sink"]["usage"]
        print(f"  {turn:4d}  {r['prompt_tokens']:13d} | {r['evicted_tokens']:17d}  {r.get('recalled_tokens', 0):8d}"
              f" | {s['evicted_tokens']:13d}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _report(say: Callable[[str], None], model: str, texts: list[str], fact, rows: list[dict[str, Any]]) -> dict[str, Any]:
    last = rows[-1]
    r, s = last["retrieve"], last["sink"]
    recalled = r["usage"].get("recalled") or []
    distance = r["usage"]["prompt_tokens"] - texts[0].index(fact.answer)  # bytes = tokens
    say(f"turn {len(rows)} asks {texts[-1]!r}; the fact {fact.statement!r} was given in turn 1, "
        f"{distance} tokens earlier (the model attends to {MEMORY['sinks']} sinks + a window of {MEMORY['window']})")
    print(f"  retrieve answers {r['reply']!r} (expected {fact.answer!r}): "
          f"{'recalled' if r['reply'].startswith(fact.answer) else 'not recalled'}; "
          f"{r['usage']['evicted_tokens']} tokens evicted, {r['usage'].get('recalled_tokens', 0)} put back for "
          "this answer:", file=sys.stderr)
    for part in recalled:
        print(f"    tokens {part['start']}-{part['start'] + part['tokens'] - 1}: {part['text']!r}", file=sys.stderr)
    print(f"  sink answers     {s['reply']!r}: {'recalled' if s['reply'].startswith(fact.answer) else 'not recalled'}"
          f"; {s['usage']['evicted_tokens']} tokens evicted, nothing kept to put back", file=sys.stderr, flush=True)
    return {"model": model, "memory": MEMORY, "fact": fact.statement, "question": texts[-1],
            "expected": fact.answer, "distance": distance, "turns": rows,
            "retrieve": {"answer": r["reply"], "recalled": r["reply"].startswith(fact.answer),
                         "evicted_tokens": r["usage"]["evicted_tokens"], "put_back": recalled},
            "sink": {"answer": s["reply"], "recalled": s["reply"].startswith(fact.answer),
                     "evicted_tokens": s["usage"]["evicted_tokens"]}}


if __name__ == "__main__":  # the segment alone: python -m ctxmem.serving.demo_memory [MODEL_DIR (an export too)]
    started = time.monotonic()
    run_memory_demo(lambda m: print(f"\n[demo] {m}", file=sys.stderr), Path(sys.argv[1]) if sys.argv[1:] else RECALL_MODEL)
    print(f"{time.monotonic() - started:.1f}s", file=sys.stderr)
