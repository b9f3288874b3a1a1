"""Serving load test: real HTTP (SSE streams) against Ray Serve on 127.0.0.1, one run, two tables.

    .venv/bin/python bench/bench_serving.py [--model EXPORT_DIR | --preset tiny] [--max-tokens 128]

1. Concurrency 1, 4, 16, 32 with continuous batching on (max_batch_size 32) and off (1): req/s,
   aggregate generated tokens/s, time to first token and inter-token latency p50/p99.
   Target (issue 5): 16 concurrent streams >= 5x the aggregate tokens/s of 1 stream.
2. One long conversation (--turns, default 40) through the chat API with a session id, with the
   conversation KV reuse on and off: per-turn latency and prefilled tokens.
   Target: turn 40 within 1.5x of turn 5 with reuse on.

Batching and KV reuse are switched between phases with a lightweight Serve update (the engine's
user_config), i.e. `reconfigure` on the same replica - the model is loaded once. Every phase is
bounded in requests and in seconds. Without --model, the tiny preset (random weights: latency does
not depend on them) is exported to ONNX once and cached under .cache/bench/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
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


def session_cpu() -> float:
    """CPU seconds used so far by this process and every process it started (Ray's raylet, GCS,
    proxy, replicas): a measure of cost per token that other users of the machine do not distort
    the way they distort wall-clock throughput."""
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
    return sum(cpu.get(p, 0.0) for p in mine)


# ---- the load generator --------------------------------------------------------------------------
async def one_stream(http, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"status": 200, "ttft": first - start, "tokens": tokens, "latency": end - start,
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


# ---- the run -------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="export (or checkpoint) directory; default: tiny preset export")
    parser.add_argument("--preset", default="tiny", help="preset to export when --model is not given")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (ignore_eos: exactly this)")
    parser.add_argument("--rounds", type=int, default=3, help="requests per level = max(8, rounds * concurrency)")
    parser.add_argument("--seconds", type=float, default=60, help="time bound per level")
    parser.add_argument("--levels", default="1,4,16,32", help="concurrency levels")
    parser.add_argument("--turns", type=int, default=40, help="turns of the long conversation")
    parser.add_argument("--turn-tokens", type=int, default=16, help="reply tokens per conversation turn")
    parser.add_argument("--engine-cpus", type=float, default=1.0, help="CPUs reserved for the engine replica")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    model_dir = Path(args.model) if args.model else make_export(args.preset)
    import ray
    from ray import serve

    from ctxmem.net import free_port
    from ctxmem.serving.app import build_app
    from ctxmem.serving.config import ServeArgs

    tmp = Path(tempfile.mkdtemp(prefix="ctxbench-", dir="/tmp"))
    ray.init(num_cpus=os.cpu_count(), object_store_memory=400 * 2**20, include_dashboard=False,
             _temp_dir=str(tmp / "ray"), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    name = "bench"

    def deploy(**engine) -> dict:
        import httpx

        config = ServeArgs.model_validate({
            "model": str(model_dir), "model_name": name, "session_store": f"sqlite:///{tmp}/sessions.sqlite",
            "max_tokens_limit": 4096,
            "engine": {"model": str(model_dir), "max_batch_size": 32, **engine},
            "engine_deployment": {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": args.engine_cpus}},
            "ingress_deployment": {"max_ongoing_requests": 1024, "ray_actor_options": {"num_cpus": 0.25}}})
        serve.run(build_app(config), name="ctxmem", route_prefix="/")
        for _ in range(600):  # the in-place reconfigure is visible on the next health call
            info = httpx.get(url + "/health", timeout=30).json()["engine"]
            if all(info.get(k) == v for k, v in engine.items()):
                return info
            time.sleep(0.1)
        raise RuntimeError(f"engine never reported {engine}")

    try:
        t0 = time.perf_counter()
        info = deploy(max_batch_size=32)
        print(f"# model {model_dir} ({info['kind']}, {info['provider']}, window {info['memory']}); "
              f"Serve up in {time.perf_counter() - t0:.0f}s; {os.cpu_count()} CPUs", file=sys.stderr)
        load_before = os.getloadavg()[0]
        levels = [int(x) for x in args.levels.split(",")]
        rows = []
        for batching in ("on", "off"):
            replica = deploy(max_batch_size=32 if batching == "on" else 1)["replica"]
            asyncio.run(load(url, 2, 4, 8, 30, name))  # warm-up
            for c in levels:
                cpu0 = session_cpu()
                r = asyncio.run(load(url, c, max(8, args.rounds * c), args.max_tokens, args.seconds, name))
                tokens = r["tok_s"] * r.pop("wall")
                r["cpu_ms_per_token"] = 1000 * (session_cpu() - cpu0) / max(tokens, 1)
                rows.append({"batching": batching, "replica": replica, **r})
                print(f"# batching {batching} c={c}: {r['tok_s']:.0f} tok/s", file=sys.stderr)
        print(f"\n## Load (completions, stream, {args.max_tokens} tokens/request, 127.0.0.1; {os.cpu_count()} CPUs, "
              f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after: the machine is shared)\n")
        print("| batching | concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | TTFT p99 ms "
              "| ITL p50 ms | ITL p99 ms | CPU ms/token |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['req_s']:.2f} | "
                  f"{r['tok_s']:.0f} | {1000 * r['ttft_p50']:.1f} | {1000 * r['ttft_p99']:.1f} | "
                  f"{1000 * r['itl_p50']:.2f} | {1000 * r['itl_p99']:.2f} | {r['cpu_ms_per_token']:.2f} |")
        print("\nCPU ms/token: CPU time of the whole session (client, proxy, ingress, engine, Ray) per generated "
              "token - what throughput would be on idle cores: cores / (CPU ms/token) * 1000 tokens/s.")
        on = {r["concurrency"]: r["tok_s"] for r in rows if r["batching"] == "on"}
        off = {r["concurrency"]: r["tok_s"] for r in rows if r["batching"] == "off"}
        cpu_on = {r["concurrency"]: r["cpu_ms_per_token"] for r in rows if r["batching"] == "on"}
        if 1 in on and 16 in on:
            print(f"\n16 streams vs 1 stream, batching on: {on[16] / on[1]:.1f}x aggregate tokens/s (target >= 5x); "
                  f"batching off: {off.get(16, 0) / max(off.get(1, 1e-9), 1e-9):.1f}x; CPU per token at 16 streams "
                  f"{cpu_on[1] / cpu_on[16]:.1f}x lower than at 1")

        convs = {}
        for reuse in ("on", "off"):
            deploy(max_batch_size=32, kv_reuse=reuse == "on")
            convs[reuse] = conversation(url, name, args.turns, args.turn_tokens, f"bench-{reuse}")
        print(f"\n## One {args.turns}-turn conversation (chat, {args.turn_tokens} tokens/turn, window "
              f"{info['memory']['window']}+{info['memory']['sinks']} sinks)\n")
        print("| turn | prompt tokens | evicted | reuse on: ms | CPU ms | prefilled | reuse off: ms | CPU ms | prefilled |")
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
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
