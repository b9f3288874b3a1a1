"""Serving benchmarks: real HTTP (SSE streams) against Ray Serve on 127.0.0.1, one run, a table per phase.

    .venv/bin/python bench/bench_serving.py [--model EXPORT_DIR | --preset tiny] [--phases ...] [--quick]

Phases (`--phases`, comma-separated; default all but `soak`):

load          concurrency 1, 4, 16, 32 with continuous batching on (max_batch_size 32) and off (1): req/s,
              aggregate tokens/s, time to first token, inter-token latency p50/p99, session CPU per token
              (and by process: client, proxy, ingress, engine, Ray).
              Targets (issue 11): 16 streams >= 5x one stream's tokens/s; <= 0.15 ms CPU/token (tiny).
cost          where the CPU per token comes from, at 16 streams: 1-token requests (what a request costs
              whatever its length), --max-tokens requests with a message a second, with the default
              adaptive stream interval and with the earlier rule's 160 ms (10 ms per stream): CPU ms per
              request by process, text messages per request.
engine        the engine's own batched decode at batch 16, no HTTP, in this process (set up as an engine
              replica's: its allocator setting), the median of 3 runs: tokens/s, against the load phase's
              HTTP tokens/s at 16 streams (target: HTTP >= 0.8x).
inproc        the same API app over an Engine in one process on uvicorn, no Ray (a child process), with the
              load phase's requests at --levels: tokens/s and CPU ms per token of that server and of this
              client - the stack without Ray Serve's proxy and ingress -> engine hop, against `load`.
colocated     `load`'s requests at --levels with the engine inside the HTTP replica (ServeArgs.colocate_engine:
              one Serve deployment, no ingress -> engine hop) and with the split deployments, alternately
              (--colocated-cycles): tokens/s, CPU ms per token by process, medians.
direct        Ray Serve's direct ingress (RAY_SERVE_ENABLE_DIRECT_INGRESS=1 for the whole run: the ingress
              replica serves HTTP itself on a port of its own, Serve's proxy on the head node still runs):
              `load`'s requests at --levels through the proxy and straight to the replica's port, colocated
              and split, and colocated direct with the replica's user code on its HTTP server's event loop
              (what ServeArgs.direct_ingress deploys), alternately (--colocated-cycles): tokens/s, CPU ms
              per token by process, medians.
conversation  one long conversation (--turns) through the chat API with a session id, KV reuse on and
              off: per-turn latency and prefilled tokens (target: turn 40 within 1.5x of turn 5).
sessions      --session-replicas engine replicas, --conversations conversations x --session-turns turns
              at once (chat, a session id each), session-affinity router on and off: KV hit rate of the
              turns after the first (target: >= 90% with 4 replicas, 16 x 10).
long-prompt   --long-streams streams decode while one --long-prompt-token prompt arrives: the streams'
              inter-token latency p50/p99 while it is prefilled, against the same streams alone
              (target: p99 <= 2x).
soak          --soak-clients clients for --soak-seconds (streamed and plain completions, chat, sessions):
              requests by status; target 0 5xx.

Batching and KV reuse are switched between phases with a lightweight Serve update (the engine's
user_config), i.e. `reconfigure` on the same replica - the model is loaded once. Every phase is
bounded in requests and in seconds; `--quick` shrinks every phase to a toy size (a smoke run, the
test suite runs it) and `--plan` only prints what a run would do. Without --model, the preset (random
weights: latency does not depend on them) is exported to ONNX once and cached under .cache/bench/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_export(preset_name: str) -> Path:
    out = REPO / ".cache" / "bench" / f"{preset_name}-export"
    if (out / "runtime_config.json").exists():
        return out
    import torch

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.config import preset
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.model import Transformer
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    ckpt = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    save_checkpoint(ckpt, Transformer(preset(preset_name, vocab_size=tok.vocab_size)), tok)
    export_onnx(ckpt, out, verify=False)
    shutil.rmtree(ckpt, ignore_errors=True)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


ROLES = ("client", "proxy", "ingress", "engine", "ray")  # what session_cpu_by_pid calls each process


def _role(pid: int) -> str:
    """Which part of the session a process is: this process is the load generator (the client); Ray
    Serve names its actors' processes (`ray::ProxyActor`, `ray::ServeReplica:<app>:<deployment>`);
    the rest is Ray itself (raylet, GCS, controller, agents, idle workers)."""
    if pid == os.getpid():
        return "client"
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return "ray"
    if "ProxyActor" in cmdline:
        return "proxy"
    if cmdline.startswith("ray::ServeReplica:"):  # ray::ServeReplica:<app>:<deployment>[.<method> while in one]
        deployment = re.match(r"[\w-]*", cmdline.split(":", 4)[-1]).group()
        # Server: the HTTP replica with the engine inside (colocate_engine), counted as the ingress
        return {"Ingress": "ingress", "Engine": "engine", "Server": "ingress"}.get(deployment, "ray")
    return "ray"


def session_cpu_by_pid() -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds used so far) for this process and every process it started (Ray's
    raylet, GCS, proxy, replicas): a measure of cost per token that other users of the machine do not
    distort the way they distort wall-clock throughput."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(pid)] = int(fields[1])
        cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / tick
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in mine:
                mine.add(child)
                frontier.append(child)
    return {p: (_role(p), cpu[p]) for p in mine if p in cpu}


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds used between two `session_cpu_by_pid` snapshots, by each process's role at the end (Ray
    reuses idle workers for new replicas, so a process can change role in between)."""
    out = dict.fromkeys(ROLES, 0.0)
    for pid, (role, cpu) in after.items():
        out[role] += cpu - before.get(pid, (role, 0.0))[1]
    return out


def session_cpu() -> float:
    """CPU seconds of the whole session so far."""
    return sum(cpu for _, cpu in session_cpu_by_pid().values())


async def sse_lines(response):
    """The lines of a server-sent event stream. SSE ends lines only at CR or LF; httpx's aiter_lines
    also splits at U+0085, U+2028 and the like, which a random model's text may contain."""
    buffer = b""
    async for data in response.aiter_bytes():
        buffer += data
        *lines, buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        for line in lines:
            yield line.decode()
    if buffer:
        yield buffer.decode()


# ---- the load generator --------------------------------------------------------------------------
async def one_stream(http, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = texts = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in sse_lines(r):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                first = first or now
                last = now
                texts += 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"status": 200, "ttft": first - start, "tokens": tokens, "latency": end - start, "texts": texts,
            # mean gap between tokens after the first (what a reader of the stream sees)
            "itl": ((last or end) - first) / max(tokens - 1, 1)}


async def load(url: str, concurrency: int, requests: int, max_tokens: int, seconds: float, model: str) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    results: list[dict] = []
    counter = iter(range(requests))
    deadline = time.perf_counter() + seconds

    async def worker(http):
        for i in counter:
            if time.perf_counter() > deadline:
                return
            body = {"model": model, "prompt": f"request {i}: once upon a time", "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": i, "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True}
            results.append(await one_stream(http, url, body))

    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        start = time.perf_counter()
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok), "wall": wall,
            "req_s": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "texts": sum(r["texts"] for r in ok) / max(len(ok), 1),
            "ttft_p50": pct([r["ttft"] for r in ok], 0.5), "ttft_p99": pct([r["ttft"] for r in ok], 0.99),
            "itl_p50": pct([r["itl"] for r in ok], 0.5), "itl_p99": pct([r["itl"] for r in ok], 0.99)}


def conversation(url: str, model: str, turns: int, max_tokens: int, session: str) -> list[dict]:
    import httpx

    messages, out = [], []
    with httpx.Client(base_url=url, timeout=120) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"turn {turn}: tell me what happens next in the story"})
            cpu0, start = session_cpu(), time.perf_counter()
            r = http.post("/v1/chat/completions", headers={"X-Session-Id": session}, json={
                "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True})
            elapsed, cpu = time.perf_counter() - start, session_cpu() - cpu0
            r.raise_for_status()
            body = r.json()
            usage = body["usage"]
            out.append({"turn": turn + 1, "latency": elapsed, "cpu": cpu, "prompt": usage["prompt_tokens"],
                        "prefill": usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"],
                        "evicted": usage["evicted_tokens"]})
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return out


async def timed_stream(http, url: str, body: dict) -> tuple[float, list[float]]:
    """One streamed completion: when it was sent and the arrival time of each text-carrying message."""
    sent, arrivals = time.perf_counter(), []
    async with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"stream failed: {r.status_code} {await r.aread()!r}")
        async for line in sse_lines(r):
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    arrivals.append(time.perf_counter())
    return sent, arrivals


async def long_prompt(url: str, model: str, streams: int, stream_tokens: int, prompt_tokens: int | None,
                      baseline_s: float) -> dict:
    """`streams` streams decode (one request each at a time, restarted when done); with `prompt_tokens`,
    one prompt that long (byte tokenizer: one token per character) is sent once they run, and the
    streams are measured while it is prefilled (sent -> its first token); without, for `baseline_s`.
    Run with stream_interval_ms 0, so each SSE message carries one decode step's token: an inter-token
    latency is the gap between two messages of a request; a request started in the window adds its
    time to first token (a stream that cannot start is stalled too)."""
    import httpx

    stop = asyncio.Event()
    itl: list[float] = []
    ttft: list[float] = []
    window = {"start": float("inf"), "end": float("inf")}

    async def streamer(http, i):
        n = 0
        while not stop.is_set():
            body = {"model": model, "prompt": f"stream {i}.{n}: once upon a time", "max_tokens": stream_tokens,
                    "temperature": 1.0, "seed": i * 1000 + n, "ignore_eos": True}
            sent, arrivals = await timed_stream(http, url, body)
            start, end = window["start"], window["end"]
            itl.extend(b - a for a, b in zip(arrivals, arrivals[1:]) if start <= a and b <= end)
            if arrivals and start <= sent and arrivals[0] <= end:
                ttft.append(arrivals[0] - sent)
            n += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=streams + 2), timeout=600) as http:
        tasks = [asyncio.create_task(streamer(http, i)) for i in range(streams)]
        await asyncio.sleep(1.0)  # every stream decoding
        result = {"prompt_tokens": prompt_tokens or 0, "ttft": float("nan")}
        window["start"] = time.perf_counter()
        if prompt_tokens:
            text = "".join(chr(97 + (i * 7) % 26) for i in range(prompt_tokens))
            sent, arrivals = await timed_stream(http, url, {"model": model, "prompt": text, "max_tokens": 1,
                                                            "temperature": 0})
            window["end"] = arrivals[0] if arrivals else time.perf_counter()
            result["ttft"] = window["end"] - sent
        else:
            await asyncio.sleep(baseline_s)
            window["end"] = time.perf_counter()
        stop.set()
        await asyncio.gather(*tasks)
    result.update(gaps=len(itl), itl_p50=pct(itl, 0.5), itl_p99=pct(itl, 0.99), starts=len(ttft),
                  stream_ttft_p99=pct(ttft, 0.99))
    return result


async def sessions(url: str, model: str, conversations: int, turns: int, max_tokens: int, tag: str) -> dict:
    """`conversations` chats at once, `turns` turns each, every request with its X-Session-Id (the
    client sends the whole history; the engine reuses the KV state where it has it)."""
    import httpx

    hits, later, errors, prompt, cached = 0, 0, 0, 0, 0

    async def one(http, c):
        nonlocal hits, later, errors, prompt, cached
        messages = []
        for t in range(turns):
            messages.append({"role": "user", "content": f"turn {t}: tell me more about the number {c * 37 + t}"})
            r = await http.post("/v1/chat/completions", headers={"X-Session-Id": f"{tag}-{c}"}, json={
                "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                errors += 1
                return
            body = r.json()
            if t:
                usage = body["usage"]
                later += 1
                hits += usage["prompt_tokens_details"]["cached_tokens"] > 0
                prompt += usage["prompt_tokens"]
                cached += usage["prompt_tokens_details"]["cached_tokens"]
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})

    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=conversations)) as http:
        start = time.perf_counter()
        await asyncio.gather(*[one(http, c) for c in range(conversations)])
        wall = time.perf_counter() - start
    return {"turns": later, "hits": hits, "hit_rate": hits / max(later, 1), "errors": errors, "wall": wall,
            "cached_share": cached / max(prompt, 1), "prefilled": prompt - cached}


async def soak(url: str, model: str, clients: int, seconds: float) -> dict:
    """`clients` clients send requests back to back for `seconds`: streamed and plain completions,
    stateless chats and server-held session turns, in turn. Counts answers by status."""
    import httpx

    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds

    async def client(http, c):
        sid = None
        n = 0
        while time.perf_counter() < deadline:
            kind = (c + n) % 4
            n += 1
            try:
                if kind == 0:
                    async with http.stream("POST", "/v1/completions", json={
                            "model": model, "prompt": f"client {c}", "max_tokens": 16, "stream": True}) as r:
                        async for _ in r.aiter_bytes():
                            pass
                elif kind == 1:
                    r = await http.post("/v1/completions", json={"model": model, "prompt": f"c{c}", "max_tokens": 8})
                elif kind == 2:
                    r = await http.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": f"hi from {c}"}], "max_tokens": 8})
                else:
                    if sid is None:
                        r = await http.post("/v1/sessions", json={})
                        if r.status_code in (200, 201):
                            sid = r.json()["id"]
                    if sid is not None:
                        r = await http.post(f"/v1/sessions/{sid}/messages", json={"content": f"turn {n}",
                                                                                   "max_tokens": 8})
                status = r.status_code
            except httpx.HTTPError:
                status = 0  # connection failure: counted as an error too
            statuses[status] = statuses.get(status, 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*[client(http, c) for c in range(clients)])
    return statuses


def engine_streams(model_dir: Path, streams: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """Tokens/s and CPU ms per token of the engine with its scheduler, sampler and stream pacing
    (`Engine.generate`, `streams` streams at temperature 1, `requests` each), in this process, no Ray:
    between the bare decode (engine_decode) and HTTP."""
    from ctxmem.serving.config import EngineConfig
    from ctxmem.serving.engine import Engine
    from ctxmem.serving.events import Delta

    engine = Engine(EngineConfig(model=str(model_dir), max_batch_size=32))

    async def one(i: int) -> int:
        request = {"kind": "completion", "prompt": f"request {i}: once upon a time", "generation": {
            "max_new_tokens": max_tokens, "temperature": 1.0, "seed": i, "stop_token_ids": []}}
        return sum(ev.tokens for chunk in [c async for c in engine.generate(request)] for ev in chunk
                   if isinstance(ev, Delta))

    async def run(rounds: int) -> int:
        return sum([sum(await asyncio.gather(*[one(r * streams + i) for i in range(streams)])) for r in range(rounds)])

    try:
        asyncio.run(run(1))  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        tokens = asyncio.run(run(requests))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        engine.close()
    return tokens / wall, 1000 * cpu / max(tokens, 1)


def engine_decode(model_dir: Path, batch: int, steps: int, repeats: int = 3) -> tuple[float, float, list[float]]:
    """Tokens/s and CPU ms per token of the engine's own batched decode (ContextMemory over the served
    model, greedy argmax), no HTTP: what the serving stack adds is the rest. In a process set up as an
    engine replica's is (keep_freed_memory: without it every cache copy faults its pages in again and
    the bare decode reads slower than the engine it is the baseline for); the medians of ``repeats``
    runs (one run moves by +-20% on a shared machine), and every run's tokens/s."""
    import numpy as np

    from ctxmem.memory import ContextMemory
    from ctxmem.serving.config import EngineConfig
    from ctxmem.serving.engine import keep_freed_memory
    from ctxmem.serving.loading import load_served_model

    keep_freed_memory()
    model = load_served_model(EngineConfig(model=str(model_dir)))
    memory = ContextMemory(model.generator.backend, model.memory)
    runs = []
    for _ in range(repeats):
        states = []
        for b in range(batch):
            state = memory.start(1)
            memory.feed(state, [[3 + (b * 7 + i) % 200 for i in range(20)]])
            states.append(state)
        state = memory.merge(states)
        ids = np.full((batch, 1), 5, dtype=np.int64)
        memory.feed(state, ids)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            logits = memory.feed(state, ids)
            ids = logits.argmax(axis=-1)[:, None].astype(np.int64)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        runs.append((batch * steps / wall, 1000 * cpu / (batch * steps)))
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), [r[0] for r in runs])


def inproc_server(model_dir: Path, port: int) -> None:
    """`--inproc-server PORT`: the API app (serving/api.py) over an Engine in this process on uvicorn,
    127.0.0.1, no Ray - what a Serve replica runs, without Serve's proxy and the ingress -> engine hop.
    Blocks until terminated."""
    import uvicorn

    from ctxmem.serving.api import LocalEngineClient, build_api
    from ctxmem.serving.config import EngineConfig, ServeArgs
    from ctxmem.serving.engine import Engine
    from ctxmem.serving.store import MemoryStore

    args = ServeArgs.model_validate({"model": str(model_dir), "model_name": "bench", "max_tokens_limit": 4096,
                                     "session_store": "memory://"}).resolve()
    engine = Engine(EngineConfig(model=str(model_dir), max_batch_size=32))
    uvicorn.run(build_api(LocalEngineClient(engine), args, MemoryStore()), host="127.0.0.1", port=port,
                log_level="warning", access_log=False)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) one process has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def inproc(model_dir: Path, levels: list[int], rounds: int, max_tokens: int, seconds: float, name: str) -> list[dict]:
    """`load`'s measurement against inproc_server in a child process: per level, tokens/s and CPU ms per
    generated token of the server process and of this client."""
    import httpx

    from ctxmem.net import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--inproc-server", str(port),
                               "--model", str(model_dir)])
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise RuntimeError(f"the in-process server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        asyncio.run(load(url, 2, 4, 8, 30, name))  # warm-up
        rows = []
        for c in levels:
            server0, client0 = process_cpu(server.pid), time.process_time()
            r = asyncio.run(load(url, c, max(8, rounds * c), max_tokens, seconds, name))
            tokens = max(r["tok_s"] * r.pop("wall"), 1)
            r["server_ms"] = 1000 * (process_cpu(server.pid) - server0) / tokens
            r["client_ms"] = 1000 * (time.process_time() - client0) / tokens
            rows.append(r)
        return rows
    finally:
        server.terminate()
        server.wait(30)


# ---- the run -------------------------------------------------------------------------------------
def direct_url(app_name: str) -> str:
    """The ingress replica's own HTTP address under direct ingress (one replica: the first target)."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    for _ in range(600):
        for group in ray.get(controller.get_target_groups.remote(app_name)):
            if str(group.protocol).endswith("HTTP") and group.app_name == app_name and group.targets:
                target = group.targets[0]
                return f"http://{target.ip}:{target.port}"
        time.sleep(0.1)
    raise RuntimeError(f"no direct-ingress target for {app_name}")


PHASES = ("load", "cost", "engine", "inproc", "colocated", "direct", "conversation", "sessions", "long-prompt", "soak")
QUICK = {"levels": "1", "rounds": 1, "colocated_cycles": 1, "seconds": 10, "max_tokens": 4, "turns": 3, "turn_tokens": 2,
         "conversations": 4, "session_turns": 3, "session_replicas": 2, "long_prompt": 2000, "long_streams": 2,
         "long_stream_tokens": 8, "long_baseline_seconds": 2, "soak_clients": 8, "soak_seconds": 3, "engine_steps": 5}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="export (or checkpoint) directory; default: tiny preset export")
    parser.add_argument("--preset", default="tiny", help="preset to export when --model is not given")
    parser.add_argument("--phases", default="load,engine,conversation,sessions,long-prompt",
                        help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="every phase at a toy size (a smoke run, ~1-2 min)")
    parser.add_argument("--plan", action="store_true", help="print what would run, then exit")
    parser.add_argument("--max-tokens", type=int, default=128, help="load: tokens per request (exactly this)")
    parser.add_argument("--rounds", type=int, default=3, help="load: requests per level = max(8, rounds * concurrency)")
    parser.add_argument("--seconds", type=float, default=60, help="load: time bound per level")
    parser.add_argument("--levels", default="1,4,16,32", help="load and inproc: concurrency levels")
    parser.add_argument("--engine-steps", type=int, default=200, help="engine: decode steps at batch 16")
    parser.add_argument("--turns", type=int, default=40, help="conversation: turns")
    parser.add_argument("--turn-tokens", type=int, default=16, help="conversation and sessions: reply tokens per turn")
    parser.add_argument("--session-replicas", type=int, default=4, help="sessions: engine replicas")
    parser.add_argument("--conversations", type=int, default=16, help="sessions: conversations at once")
    parser.add_argument("--session-turns", type=int, default=10, help="sessions: turns per conversation")
    parser.add_argument("--long-prompt", type=int, default=20000, help="long-prompt: prompt tokens")
    parser.add_argument("--long-streams", type=int, default=8, help="long-prompt: streams decoding meanwhile")
    parser.add_argument("--long-stream-tokens", type=int, default=256, help="long-prompt: tokens per stream request")
    parser.add_argument("--long-baseline-seconds", type=float, default=8,
                        help="long-prompt: how long the streams are measured alone")
    parser.add_argument("--soak-clients", type=int, default=64, help="soak: concurrent clients")
    parser.add_argument("--soak-seconds", type=float, default=60, help="soak: duration")
    parser.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs reserved for the engine replica(s)")
    parser.add_argument("--colocated-cycles", type=int, default=2,
                        help="colocated: split and colocated deployments measured alternately this many times")
    parser.add_argument("--inproc-server", type=int, default=None, help=argparse.SUPPRESS)  # the inproc phase's child
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        if args.phases == parser.get_default("phases"):
            args.phases = ",".join(PHASES)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plan:
        source = args.model or f"the {args.preset} preset, exported to .cache/bench/{args.preset}-export"
        print(f"# plan: model {source}; phases {', '.join(args.phases)}")
        for key, value in sorted(vars(args).items()):
            print(f"#   {key} = {value}")
        return 0
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model_dir = Path(args.model) if args.model else make_export(args.preset)
    if args.inproc_server:
        inproc_server(model_dir, args.inproc_server)
        return 0
    inproc_rows = []
    if "inproc" in args.phases:  # before Ray starts: this process is then the client alone
        inproc_rows = inproc(model_dir, [int(x) for x in args.levels.split(",")], args.rounds, args.max_tokens,
                             args.seconds, "bench")
    import httpx
    import ray
    from ray import serve

    from ctxmem.net import free_port
    from ctxmem.serving.app import build_app_with_router
    from ctxmem.serving.config import ServeArgs

    tmp = Path(tempfile.mkdtemp(prefix="ctxbench-", dir="/tmp"))
    if "direct" in args.phases:
        # Serve reads these once per process (controller, proxy, replicas), which inherit this driver's
        # environment through the local cluster it starts: direct ingress is on for the whole run, so
        # the direct phase measures the proxied paths in the same cluster as its baseline
        # (a replica's port from Serve's default range; a stopped one frees its port at once: redeploys)
        from ctxmem.serving.app import direct_ingress_cluster_env

        os.environ.update(direct_ingress_cluster_env())
    ray.init(num_cpus=max(os.cpu_count(), 4), object_store_memory=400 * 2**20, include_dashboard=False,
             _temp_dir=str(tmp / "ray"), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    name = "bench"

    running = None  # (ServeArgs, affinity) of the application deployed now

    def deploy(replicas: int = 1, affinity: bool = True, colocate: bool = False, env: dict | None = None,
               **engine) -> dict:
        nonlocal running
        # env: the engine replicas' environment (with colocate, the one replica's)
        engine_actor = {"num_cpus": args.engine_cpus / replicas, **({"runtime_env": {"env_vars": env}} if env else {})}
        config = ServeArgs.model_validate({
            "model": str(model_dir), "model_name": name, "session_store": f"sqlite:///{tmp}/sessions.sqlite",
            "max_tokens_limit": 4096, "colocate_engine": colocate,
            "engine": {"model": str(model_dir), "max_batch_size": 32, **engine},
            "engine_deployment": {"num_replicas": replicas, "max_ongoing_requests": 256,
                                  "ray_actor_options": engine_actor},
            "ingress_deployment": {"max_ongoing_requests": 1024, "ray_actor_options": {"num_cpus": 0.25}}})
        # serve.run replaces every replica (Serve gives each imperative deploy a new version): ~5 s here,
        # so the configuration already running is not deployed again
        if running != (config, affinity):
            serve.run(build_app_with_router(config, session_affinity=affinity), name="ctxmem", route_prefix="/")
            running = (config, affinity)
        for _ in range(600):  # the engine's health reports what it was configured with
            info = httpx.get(url + "/health", timeout=30).json().get("engine", {})
            if all(info.get(k) == v for k, v in engine.items()):
                return info
            time.sleep(0.1)
        raise RuntimeError(f"engine never reported {engine}")

    def header(title: str) -> None:
        print(f"\n## {title}\n")

    def alternately(variants, levels: list[int], deploy_variant) -> dict[tuple[str, int], list[dict]]:
        """An A/B in one run and one cluster: each variant deployed in turn (deploy_variant(variant) -> the
        URL to load), --colocated-cycles times, `load`'s requests at each level; per (variant, level) the
        runs, each with the CPU ms per token of every process role (so each variant is measured under the
        same stretch of the machine's load as the others)."""
        results: dict[tuple[str, int], list[dict]] = {}
        for _ in range(args.colocated_cycles):
            for variant in variants:
                target = deploy_variant(variant)
                asyncio.run(load(target, 2, 4, 8, 30, name))  # warm-up
                for c in levels:
                    cpu0 = session_cpu_by_pid()
                    r = asyncio.run(load(target, c, max(8, args.rounds * c), args.max_tokens, args.seconds, name))
                    tokens = max(r["tok_s"] * r.pop("wall"), 1)
                    used = cpu_by_role(cpu0, session_cpu_by_pid())
                    results.setdefault((variant, c), []).append({**r, "roles": {k: 1000 * used[k] / tokens
                                                                                for k in ROLES}})
        return results

    try:
        t0 = time.perf_counter()
        info = deploy(max_batch_size=32)
        print(f"# model {model_dir} ({info.get('kind')}, {info.get('provider')}, memory {info.get('memory')}); "
              f"Serve up in {time.perf_counter() - t0:.0f}s; {os.cpu_count()} CPUs; phases {', '.join(args.phases)}",
              file=sys.stderr)
        load_before = os.getloadavg()[0]
        on: dict[int, float] = {}
        decode = None  # the engine phase's batch-16 decode, tokens/s
        cpu_on: dict[int, float] = {}
        if "load" in args.phases:
            levels = [int(x) for x in args.levels.split(",")]
            rows = []
            for batching in ("on", "off"):
                deploy(max_batch_size=32 if batching == "on" else 1)
                asyncio.run(load(url, 2, 4, 8, 30, name))  # warm-up
                for c in levels:
                    cpu0 = session_cpu_by_pid()
                    r = asyncio.run(load(url, c, max(8, args.rounds * c), args.max_tokens, args.seconds, name))
                    tokens = r["tok_s"] * r.pop("wall")
                    used = cpu_by_role(cpu0, session_cpu_by_pid())
                    r["cpu_roles"] = {k: 1000 * used[k] / max(tokens, 1) for k in ROLES}
                    r["cpu_ms_per_token"] = sum(r["cpu_roles"].values())
                    rows.append({"batching": batching, **r})
                    print(f"# batching {batching} c={c}: {r['tok_s']:.0f} tok/s", file=sys.stderr)
            header(f"Load (completions, stream, {args.max_tokens} tokens/request, 127.0.0.1; {os.cpu_count()} CPUs, "
                   f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after: the machine is shared)")
            print("| batching | concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms "
                  "| ITL p50 ms | ITL p99 ms | CPU ms/token |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | "
                      f"{r['tok_s']:.0f} | {1000 * r['ttft_p50']:.1f} | {1000 * r['ttft_p99']:.1f} | "
                      f"{1000 * r['itl_p50']:.2f} | {1000 * r['itl_p99']:.2f} | {r['cpu_ms_per_token']:.2f} |")
            print("\nCPU ms/token: CPU time of the whole session (client, proxy, ingress, engine, Ray) per generated "
                  "token - what throughput would be on idle cores: cores / (CPU ms/token) * 1000 tokens/s.")
            print("\nWhere it goes, CPU ms per generated token by process (client: this load generator; server: "
                  "the rest - Serve's HTTP proxy, the ingress and engine replicas, Ray's own processes):\n")
            print("| batching | concurrency | " + " | ".join(ROLES) + " | server | total |")
            print("|---|---|" + "---|" * (len(ROLES) + 2))
            for r in rows:
                roles = r["cpu_roles"]
                print(f"| {r['batching']} | {r['concurrency']} | " + " | ".join(f"{roles[k]:.3f}" for k in ROLES)
                      + f" | {r['cpu_ms_per_token'] - roles['client']:.3f} | {r['cpu_ms_per_token']:.3f} |")
            on = {r["concurrency"]: r["tok_s"] for r in rows if r["batching"] == "on"}
            off = {r["concurrency"]: r["tok_s"] for r in rows if r["batching"] == "off"}
            cpu_on = {r["concurrency"]: r["cpu_ms_per_token"] for r in rows if r["batching"] == "on"}
            if 1 in on and 16 in on:
                print(f"\n16 streams vs 1 stream, batching on: {on[16] / on[1]:.1f}x aggregate tokens/s (target >= 5x); "
                      f"batching off: {off.get(16, 0) / max(off.get(1, 1e-9), 1e-9):.1f}x; CPU per token at 16 "
                      f"streams {cpu_on[16]:.2f} ms (target <= 0.15 on tiny), {cpu_on[1] / cpu_on[16]:.1f}x lower "
                      "than at 1")

        if "cost" in args.phases:
            # the 10 ms-per-stream row is the adaptive rule before ADAPTIVE_MS_PER_SEQ became 20 (what it gave at
            # 16 streams), run here beside the default for an A/B in one run
            cases = [("1 token", 1, None), (f"{args.max_tokens} tokens, a message a second", args.max_tokens, 1000.0),
                     (f"{args.max_tokens} tokens, adaptive interval (default)", args.max_tokens, None),
                     (f"{args.max_tokens} tokens, 160 ms interval (10 ms per stream, the earlier rule)", args.max_tokens,
                      160.0)]
            costs = []
            for label, tokens, interval in cases:
                deploy(max_batch_size=32, stream_interval_ms=interval)
                n = max(16, args.rounds * 16) * (4 if tokens == 1 else 1)
                cpu0 = session_cpu_by_pid()
                r = asyncio.run(load(url, 16, n, tokens, args.seconds, name))
                used = cpu_by_role(cpu0, session_cpu_by_pid())
                costs.append((label, tokens, r, {k: 1000 * used[k] / max(r["requests"], 1) for k in ROLES}))
            header(f"Where the CPU goes (16 streams, completions, stream; 1-min load average {os.getloadavg()[0]:.1f})")
            print("| requests of | requests | text messages / request | " + " | ".join(ROLES)
                  + " | CPU ms / request | CPU ms / token |")
            print("|---|---|---|" + "---|" * (len(ROLES) + 2))
            for label, tokens, r, per in costs:
                total = sum(per.values())
                print(f"| {label} | {r['requests']} | {r['texts']:.1f} | " + " | ".join(f"{per[k]:.2f}" for k in ROLES)
                      + f" | {total:.2f} | {total / tokens:.3f} |")
            (_, _, one, fixed), (_, n_tok, few, sparse), (_, _, many, paced), (_, _, old, before) = costs
            fixed_ms, sparse_ms, paced_ms = sum(fixed.values()), sum(sparse.values()), sum(paced.values())
            # a message's cost from the row with the most messages per request against a message a second (the
            # adaptive row alone may send too few more to tell)
            dense = max((many, paced_ms), (old, sum(before.values())), key=lambda x: x[0]["texts"])
            extra = dense[0]["texts"] - few["texts"]
            print(f"\nA request costs {fixed_ms:.1f} ms of CPU whatever its length; each further token "
                  f"{(sparse_ms - fixed_ms) / max(n_tok - 1, 1):.3f} ms (a message a second), each further message "
                  + (f"{(dense[1] - sparse_ms) / extra:.2f} ms" if extra > 0.5 else "- (too few to tell)")
                  + f" ({extra:.1f} more per request than a message a second)")
            print(f"Adaptive interval (default) against 10 ms per stream: {paced_ms / n_tok:.3f} against "
                  f"{sum(before.values()) / n_tok:.3f} ms CPU/token ({many['texts']:.1f} against {old['texts']:.1f} "
                  f"messages a request), {paced_ms / max(sum(before.values()), 1e-9):.2f}x")

        if "engine" in args.phases:
            decode, decode_cpu, decode_runs = engine_decode(model_dir, 16, args.engine_steps)
            header(f"The engine's own batched decode (batch 16, no HTTP, this process; median of "
                   f"{len(decode_runs)} runs: {', '.join(f'{r:.0f}' for r in decode_runs)} tokens/s)")
            print("| engine tokens/s at batch 16 | its CPU ms/token | HTTP tokens/s at 16 streams | HTTP / engine "
                  "| HTTP session CPU ms/token |")
            print("|---|---|---|---|---|")
            http16 = on.get(16)
            print(f"| {decode:.0f} | {decode_cpu:.3f} | {http16:.0f} | {http16 / decode:.2f}x (target >= 0.8x) | "
                  f"{cpu_on[16]:.3f} |" if http16 else
                  f"| {decode:.0f} | {decode_cpu:.3f} | - (the load phase did not run level 16) | - | - |")
            paced, paced_cpu = engine_streams(model_dir, 16, max(1, args.rounds), args.max_tokens)
            print(f"\nThe engine with its scheduler, sampler and stream pacing (Engine.generate, 16 streams x "
                  f"{args.max_tokens} tokens at temperature 1, no Ray, this process): {paced:.0f} tokens/s, "
                  f"{paced_cpu:.3f} ms CPU/token")

        if "inproc" in args.phases:
            header(f"The same API and engine in one process, no Ray (uvicorn, completions, stream, {args.max_tokens} "
                   "tokens/request)")
            print("| concurrency | requests | errors | tokens/s | TTFT p50 ms | server CPU ms/token | client CPU ms/token "
                  "| total | with Ray (load phase) |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in inproc_rows:
                with_ray = cpu_on.get(r["concurrency"])
                print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['tok_s']:.0f} | {1000 * r['ttft_p50']:.1f} "
                      f"| {r['server_ms']:.3f} | {r['client_ms']:.3f} | {r['server_ms'] + r['client_ms']:.3f} | "
                      + (f"{with_ray:.3f} |" if with_ray else "- |"))
            print("\nWhat Ray Serve's hops cost per token is the difference: the proxy, the ingress replica's Serve "
                  "machinery, the handle call and the engine replica's.")

        if "colocated" in args.phases:
            # split (Ingress + Engine) and colocated deployments alternately, --colocated-cycles times: an A/B in
            # one run, each variant measured under the same stretch of the machine's load
            levels = [int(x) for x in args.levels.split(",")]

            def split_or_colocated(variant: str) -> str:
                deploy(colocate=variant == "colocated", max_batch_size=32)
                return url

            results = alternately(("split", "colocated"), levels, split_or_colocated)
            header(f"The engine inside the HTTP replica (colocate_engine: one Serve deployment) against the split "
                   f"deployments, alternately, {args.colocated_cycles} cycles (completions, stream, {args.max_tokens} "
                   f"tokens/request; 1-min load average {os.getloadavg()[0]:.1f})")
            print("| deployments | concurrency | run | tokens/s | TTFT p50 ms | client | proxy | HTTP replica "
                  "| engine replica | ray | CPU ms/token |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for (variant, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "split")):
                for i, r in enumerate(runs):
                    roles = r["roles"]
                    print(f"| {variant} | {c} | {i + 1} | {r['tok_s']:.0f} | {1000 * r['ttft_p50']:.1f} | "
                          f"{roles['client']:.3f} | {roles['proxy']:.3f} | {roles['ingress']:.3f} | "
                          f"{roles['engine']:.3f} | {roles['ray']:.3f} | {sum(roles.values()):.3f} |")

            def median(variant, c, key):
                runs = results.get((variant, c), [])
                return statistics.median(sum(r["roles"].values()) if key == "cpu" else r[key] for r in runs)

            for c in levels:
                print(f"\n{c} stream(s), medians: colocated {median('colocated', c, 'cpu'):.3f} against split "
                      f"{median('split', c, 'cpu'):.3f} ms CPU/token "
                      f"({median('colocated', c, 'cpu') / median('split', c, 'cpu'):.2f}x); tokens/s "
                      f"{median('colocated', c, 'tok_s'):.0f} against {median('split', c, 'tok_s'):.0f}", end="")
            if decode and 16 in levels:
                print(f"\nHTTP at 16 streams / the engine's own batch-16 decode ({decode:.0f} tokens/s): colocated "
                      f"{median('colocated', 16, 'tok_s') / decode:.2f}x, split {median('split', 16, 'tok_s') / decode:.2f}x "
                      "(target >= 0.8x on small)", end="")
            if 1 in levels and 16 in levels:
                print(f"\n16 streams vs 1 stream: colocated {median('colocated', 16, 'tok_s') / median('colocated', 1, 'tok_s'):.1f}x, "
                      f"split {median('split', 16, 'tok_s') / median('split', 1, 'tok_s'):.1f}x", end="")
            print()

        if "direct" in args.phases:
            # through Serve's proxy and straight to the ingress replica's own port, with the engine inside the
            # HTTP replica and split, alternately, --colocated-cycles times (an A/B in one run, one cluster)
            levels = [int(x) for x in args.levels.split(",")]
            # "one loop": Serve runs the replica's user code on the loop its HTTP server runs on
            # (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0) instead of handing every ASGI message between two
            variants = ("split", "colocated", "colocated direct", "colocated direct one loop", "split direct")
            if args.quick:  # a smoke run: what ServeArgs.direct_ingress deploys, answering on its own port
                variants = ("colocated direct one loop",)
            one_loop = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}

            def direct_or_proxied(variant: str) -> str:
                deploy(colocate=variant.startswith("colocated"), max_batch_size=32,
                       env=one_loop if variant.endswith("one loop") else None)
                return direct_url("ctxmem") if "direct" in variant else url

            results = alternately(variants, levels, direct_or_proxied)
            header(f"Direct ingress (the HTTP replica serves its own port) against Serve's proxy, colocated and split, "
                   f"alternately, {args.colocated_cycles} cycles (completions, stream, {args.max_tokens} tokens/request; "
                   f"1-min load average {os.getloadavg()[0]:.1f})")
            print("| set-up | concurrency | run | requests | errors | tokens/s | TTFT p50 ms | client | proxy "
                  "| HTTP replica | engine replica | ray | CPU ms/token |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for (variant, c), runs in sorted(results.items(), key=lambda kv: (kv[0][1], variants.index(kv[0][0]))):
                for i, r in enumerate(runs):
                    roles = r["roles"]
                    print(f"| {variant} | {c} | {i + 1} | {r['requests']} | {r['errors']} | {r['tok_s']:.0f} | "
                          f"{1000 * r['ttft_p50']:.1f} | {roles['client']:.3f} | {roles['proxy']:.3f} | "
                          f"{roles['ingress']:.3f} | {roles['engine']:.3f} | {roles['ray']:.3f} | "
                          f"{sum(roles.values()):.3f} |")

            def dmedian(variant, c, key):
                return statistics.median(sum(r["roles"].values()) if key == "cpu" else r[key]
                                         for r in results[(variant, c)])

            for c in levels:
                print(f"\n{c} stream(s), medians, CPU ms/token (tokens/s): " + ", ".join(
                    f"{v} {dmedian(v, c, 'cpu'):.3f} ({dmedian(v, c, 'tok_s'):.0f})" for v in variants), end="")
            if 1 in levels and 16 in levels:
                print("\n16 streams vs 1 stream: " + ", ".join(
                    f"{v} {dmedian(v, 16, 'tok_s') / dmedian(v, 1, 'tok_s'):.1f}x" for v in variants), end="")
            if decode and 16 in levels:
                print(f"\nHTTP at 16 streams / the engine's own batch-16 decode ({decode:.0f} tokens/s): " + ", ".join(
                    f"{v} {dmedian(v, 16, 'tok_s') / decode:.2f}x" for v in variants), end="")
            print()

        if "conversation" in args.phases:
            convs = {}
            for reuse in ("on", "off"):
                deploy(max_batch_size=32, kv_reuse=reuse == "on")
                convs[reuse] = conversation(url, name, args.turns, args.turn_tokens, f"bench-{reuse}")
            header(f"One {args.turns}-turn conversation (chat, {args.turn_tokens} tokens/turn, window "
                   f"{info['memory']['window']}+{info['memory']['sinks']} sinks)")
            print("| turn | prompt tokens | evicted | reuse on: ms | CPU ms | prefilled | reuse off: ms | CPU ms "
                  "| prefilled |")
            print("|---|---|---|---|---|---|---|---|---|")
            marks = sorted({1, 2, 5, 10, 20, 30, args.turns} & set(range(1, args.turns + 1)))
            for t in marks:
                a, b = convs["on"][t - 1], convs["off"][t - 1]
                print(f"| {t} | {a['prompt']} | {a['evicted']} | {1000 * a['latency']:.1f} | {1000 * a['cpu']:.0f} | "
                      f"{a['prefill']} | {1000 * b['latency']:.1f} | {1000 * b['cpu']:.0f} | {b['prefill']} |")

            def around(rows_, turn, key):  # median of 5 turns around `turn` (1-based): one slow call is noise
                i = turn - 1
                return statistics.median(r[key] for r in rows_[max(0, i - 2):i + 3])

            if args.turns >= 8:
                last = args.turns - 2  # the window of 5 ends at the last turn
                for reuse in ("on", "off"):
                    rows_ = convs[reuse]
                    print(f"\nKV reuse {reuse}: turn ~{args.turns} / turn ~5 = "
                          f"{around(rows_, last, 'latency') / around(rows_, 5, 'latency'):.2f}x latency, "
                          f"{around(rows_, last, 'cpu') / around(rows_, 5, 'cpu'):.2f}x CPU (medians of 5 turns)", end="")
                print("  (target with reuse on: latency <= 1.5x)")

        if "sessions" in args.phases:
            results = {}
            for affinity in (True, False):
                deploy(replicas=args.session_replicas, affinity=affinity, max_batch_size=32, kv_reuse=True)
                results[affinity] = asyncio.run(sessions(url, name, args.conversations, args.session_turns,
                                                         args.turn_tokens, f"aff-{affinity}"))
            header(f"Sessions across {args.session_replicas} engine replicas ({args.conversations} conversations x "
                   f"{args.session_turns} turns at once, chat with X-Session-Id, {args.turn_tokens} tokens/turn)")
            print("| router | turns after the first | KV hits | hit rate | prompt tokens reused | prompt tokens "
                  "prefilled | errors | wall s |")
            print("|---|---|---|---|---|---|---|---|")
            for affinity, r in results.items():
                print(f"| {'session affinity' if affinity else 'power of two choices'} | {r['turns']} | {r['hits']} | "
                      f"{100 * r['hit_rate']:.0f}% | {100 * r['cached_share']:.0f}% | {r['prefilled']} | {r['errors']} | "
                      f"{r['wall']:.1f} |")
            print("\n(a hit reuses some prefix; without affinity a turn often lands on a replica holding an older "
                  "prefix of its conversation, so fewer of its tokens are reused)")
            print(f"\nKV hit rate with session affinity: {100 * results[True]['hit_rate']:.0f}% (target >= 90%); "
                  f"Serve's default router: {100 * results[False]['hit_rate']:.0f}%")

        if "long-prompt" in args.phases:
            deploy(max_batch_size=32, kv_reuse=True, stream_interval_ms=0)
            alone = asyncio.run(long_prompt(url, name, args.long_streams, args.long_stream_tokens, None,
                                           args.long_baseline_seconds))
            mixed = asyncio.run(long_prompt(url, name, args.long_streams, args.long_stream_tokens, args.long_prompt, 0))
            header(f"A {args.long_prompt}-token prompt arrives while {args.long_streams} streams decode "
                   f"({args.long_stream_tokens} tokens per stream request, stream_interval_ms 0: a message per token)")
            print(f"| {args.long_streams} streams | token gaps | ITL p50 ms | ITL p99 ms | stream requests started | their TTFT p99 ms "
                  "| long prompt: time to first token s |")
            print("|---|---|---|---|---|---|---|")
            for label, r in (("alone", alone), ("while the long prompt is prefilled", mixed)):
                print(f"| {label} | {r['gaps']} | {1000 * r['itl_p50']:.2f} | {1000 * r['itl_p99']:.2f} | {r['starts']} | "
                      f"{1000 * r['stream_ttft_p99']:.1f} | {r['ttft']:.1f} |")
            print(f"\nITL p99 with the long prompt / without: {mixed['itl_p99'] / alone['itl_p99']:.2f}x (target <= 2x)")

        if "soak" in args.phases:
            deploy(max_batch_size=32, kv_reuse=True)
            statuses = asyncio.run(soak(url, name, args.soak_clients, args.soak_seconds))
            total = sum(statuses.values())
            five = sum(n for code, n in statuses.items() if code >= 500 or code == 0)
            header(f"Soak: {args.soak_clients} clients for {args.soak_seconds:.0f} s (streamed and plain completions, "
                   "chat, session turns)")
            print("| status | answers |")
            print("|---|---|")
            for code, n in sorted(statuses.items()):
                print(f"| {code or 'connection error'} | {n} |")
            print(f"\n{total} requests, {five} 5xx or connection errors (target 0), "
                  f"{total / args.soak_seconds:.1f} req/s")
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
