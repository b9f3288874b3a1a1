"""Decode throughput, one run side by side, on the same Llama weights:

    ctxmem ONNX Runtime (fused graph fp32 / int8 / int4 - greedy batches decode in the backend's greedy
    loop, OrtBackend.decode_greedy -, fp32 / int8 "step by step" without it and with the opt-in decode session,
    and the traced fp32 graph the fused one replaced), ctxmem torch eager, Hugging Face transformers eager generate, and the peers a user would pick
    instead: onnxruntime-genai (its model builder, fp32 / int8 / int4) and optimum-onnx (fp32)

    .venv/bin/python bench/bench_decode.py [--tokens 64] [--prompt 16] [--batches 1 8] [--rounds 5]
                                           [--threads 1] [--sink-tokens 1000] [--sink-window 124]
                                           [--no-peers] [--no-eager] [--profile] [--clock wall|cpu]

A random LlamaForCausalLM is built with transformers and saved with save_pretrained (plus a tiny
byte-level BPE tokenizer: genai's builder wants one; ids are what count), imported with
ctxmem.hf.import_hf, exported (fp32 fused and traced, verified) and quantised (int8, int4,
accuracy-checked); the peers build their own models from the same folder. Everything is cached
under .cache/bench/. Peers run in their own virtualenvs (.cache/bench/peers/<name>, created on
first use; they see this environment's packages, their own pins first), each as a worker process
answering generate requests, so every engine runs in the same interleaved rounds; a peer that
cannot be installed or built is a printed note, not a failure.

Each engine generates --tokens tokens greedily after a --prompt-token prompt (every row the same
length, no early stop) under the `full` memory policy; tokens/s = batch * tokens / wall time of the
whole generate call (prefill included), the median of --rounds interleaved rounds after one warm-up.
"greedy" = rows whose tokens equal transformers' (fp32 reference). Then the sink check: ctxmem ORT
fp32 under sink(4 + --sink-window) for --sink-tokens tokens against `full` inside the window, each
with the greedy loop (the window slides inside its runs) and step by step; a timed sample of `full`
inside the window repeats its generate to about --sink-tokens tokens.
--profile prints where a decode step's time goes (ONNX Runtime's per-op profiler; session.run
against the Python around it). Targets: issue 10.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench" / "decode"
PEERS = REPO / ".cache" / "bench" / "peers"
# A small Llama (GQA, untied embeddings): large enough that the matmuls are real work, small
# enough that the run takes a few minutes on two CPU cores.
LLAMA = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=False, hidden_act="silu", bos_token_id=257, eos_token_id=258)
# peer name -> (pip requirement, worker engine, precisions)
PEER_SPECS = {"genai": ("onnxruntime-genai", "genai", ("fp32", "int8", "int4")),
              "optimum": ("optimum-onnx[onnxruntime]", "optimum", ("fp32",))}
SINKS = 4  # the sink check: sink(SINKS + --sink-window) far past the window vs full inside it


def build(cache: Path) -> dict[str, Path]:
    """HF dir -> ctxmem checkpoint -> fp32 exports (fused, traced) -> int8, int4 (each skipped when cached)."""
    paths = {"hf": cache / "hf", "ckpt": cache / "ckpt", "fp32": cache / "onnx-fp32", "traced": cache / "onnx-traced",
             "int8": cache / "onnx-int8", "int4": cache / "onnx-int4"}
    stamp = cache / "config.json"
    if stamp.exists() and json.loads(stamp.read_text()) != LLAMA:
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(LLAMA))
    if not (paths["hf"] / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(paths["hf"], safe_serialization=True)
    if not (paths["hf"] / "tokenizer.json").exists():
        _save_tiny_bpe(paths["hf"])
    if not (paths["ckpt"] / "model.safetensors").exists():
        from ctxmem.hf import import_hf
        from ctxmem.tokenizer import ByteTokenizer

        import_hf(paths["hf"], paths["ckpt"])
        ByteTokenizer().save(paths["ckpt"] / "tokenizer.json")  # ids 0..262 < vocab 2048; prompts are ids anyway
    from ctxmem.export.onnx_export import derive_variant, export_onnx

    for name, graph in (("fp32", "fused"), ("traced", "traced")):
        if _built_graph(paths[name]) != graph:
            export_onnx(paths["ckpt"], paths[name], graph=graph)
    for name in ("int8", "int4"):
        if _built_graph(paths[name]) != "fused":
            derive_variant(paths["fp32"], paths[name], name)
    return paths


def _built_graph(export: Path) -> str | None:
    """Which graph a cached export holds (None: none, or one from before the fused graph or from an
    older contract than this ctxmem writes for it)."""
    from ctxmem.export.contract import CONTRACT_VERSION, TRACED_CONTRACT_VERSION

    config = export / "runtime_config.json"
    if not config.exists():
        return None
    data = json.loads(config.read_text())
    graph = data.get("optimization", {}).get("graph")
    want = TRACED_CONTRACT_VERSION if graph == "traced" else CONTRACT_VERSION
    return graph if data.get("contract", {}).get("version") == want else None


def _save_tiny_bpe(hf: Path) -> None:
    """A byte-level BPE with no merges (256 tokens): onnxruntime-genai's builder copies a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(hf / "tokenizer.json"))
    PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json")).save_pretrained(str(hf))


# ---- peers ----------------------------------------------------------------------------------------
def peer_python(name: str) -> Path | None:
    """The python of peer `name`'s virtualenv, created on first use; None (with a note) when it fails."""
    requirement = PEER_SPECS[name][0]
    env = PEERS / name
    python = env / "bin" / "python"
    if (env / ".ready").exists():
        return python
    print(f"note: creating the {name} environment in {env} (pip install {requirement}; once)", flush=True)
    try:
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
        site = next((env / "lib").glob("python*/site-packages"))
        # this environment's packages (torch, transformers, onnx) stay visible behind the peer's own pins
        base = [p for p in sys.path if p.endswith("site-packages")]
        (site / "ctxmem_base.pth").write_text("\n".join(base) + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], check=True, capture_output=True,
                       timeout=1800)
    except (subprocess.SubprocessError, OSError, StopIteration) as err:
        detail = getattr(err, "stderr", b"") or b""
        print(f"note: peer {name} unavailable ({type(err).__name__}: {detail.decode(errors='replace')[-300:]})")
        return None
    (env / ".ready").write_text(requirement + "\n")
    return python


class PeerWorker:
    """A peer engine in its own process (bench/decode_peers.py): generate() sends one request."""

    def __init__(self, python: Path, engine: str, precision: str, hf: Path, out: Path, threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = open(out.parent / f"{out.name}.log", "w")  # the peer's warnings, out of the table
        self.proc = subprocess.Popen([str(python), str(REPO / "bench" / "decode_peers.py"), "--engine", engine,
                                      "--precision", precision, "--hf", str(hf), "--out", str(out),
                                      "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        line = self.proc.stdout.readline()
        if not line.startswith('{"ready"'):
            self.proc.kill()
            self.log.close()
            raise RuntimeError(Path(self.log.name).read_text()[-400:].strip() or "the worker exited")

    def generate(self, prompts, tokens) -> tuple[float, list[list[int]]]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["cpu_seconds" if CLOCK[0] == "cpu" else "seconds"], reply["tokens"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def start_peers(paths, args) -> dict[str, PeerWorker]:
    workers = {}
    if args.no_peers:
        return workers
    for name, (_, engine, precisions) in PEER_SPECS.items():
        python = peer_python(name)
        if python is None:
            continue
        for precision in precisions:
            label = f"{'onnxruntime-genai' if name == 'genai' else 'optimum-onnx'} {precision}"
            try:
                workers[label] = PeerWorker(python, engine, precision, paths["hf"], CACHE / f"{name}-{precision}",
                                            args.threads)
            except (RuntimeError, OSError) as err:
                print(f"note: {label} unavailable ({str(err).splitlines()[-1][:300] if str(err) else err})")
    return workers


# ---- the run --------------------------------------------------------------------------------------
def run(args) -> tuple[list[dict], list[dict]]:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    paths = build(CACHE)
    from transformers import LlamaForCausalLM

    from ctxmem.export.runtime import load_onnx_generator
    from ctxmem.generation import load_generator
    from ctxmem.memory import MemoryConfig
    from ctxmem.sampling import GenerationConfig

    full = MemoryConfig("full")
    onnx = lambda key, split=False, loop=True: load_onnx_generator(  # noqa: E731
        paths[key], memory=full, provider="cpu", intra_op_threads=args.threads, decode_session=split, greedy_loop=loop)
    config = GenerationConfig(max_new_tokens=args.tokens, temperature=0.0, stop_token_ids=[])
    # the default engine decodes greedy batches in the backend's greedy loop (decode_greedy); "step by step":
    # without it, a Python loop step per token. "decode session": the opt-in OrtBackend(decode_session=True),
    # step-by-step decode steps on the decode branch as a session of its own (no If; a second session's memory)
    engines = {"ctxmem ORT fp32": onnx("fp32"), "ctxmem ORT fp32 step by step": onnx("fp32", loop=False),
               "ctxmem ORT fp32 decode session": onnx("fp32", True, False),
               "ctxmem ORT fp32 traced": onnx("traced"), "ctxmem ORT int8": onnx("int8"),
               "ctxmem ORT int8 step by step": onnx("int8", loop=False),
               "ctxmem ORT int8 decode session": onnx("int8", True, False), "ctxmem ORT int4": onnx("int4")}
    calls = {name: (lambda g: lambda prompts: _timed(lambda: [c.token_ids for c in g.generate(prompts, config)]))(gen)
             for name, gen in engines.items()}
    if not args.no_eager:
        eager = load_generator(paths["ckpt"], memory=full)
        calls["ctxmem torch eager"] = lambda prompts: _timed(lambda: [c.token_ids for c in eager.generate(prompts, config)])
    hf = LlamaForCausalLM.from_pretrained(paths["hf"], attn_implementation="eager").eval()

    def hf_generate(prompts):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            seconds, out = _timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                                      min_new_tokens=args.tokens, do_sample=False, pad_token_id=0))
        return seconds, out[:, ids.shape[1]:].tolist()
    calls["transformers eager"] = hf_generate
    peers = start_peers(paths, args)
    calls.update({name: (lambda w: lambda prompts: w.generate(prompts, args.tokens))(w) for name, w in peers.items()})

    sink = MemoryConfig("sink", window=args.sink_window, sinks=SINKS)
    sink_gen, sink_stepped = (load_onnx_generator(paths["fp32"], memory=sink, provider="cpu",
                                                  intra_op_threads=args.threads, greedy_loop=loop) for loop in (True, False))
    inside = args.sink_window + SINKS - args.prompt  # `full` inside the window: prompt + these fill sinks + window
    # each timed sample of `full` inside the window repeats its generate to about as many tokens as the sink
    # run's (one 112-token call is ~50 ms at batch 1: one slow moment on a shared machine moved its median)
    repeats = max(1, round(args.sink_tokens / inside))
    sink_calls = {
        f"sink {SINKS}+{args.sink_window}, {args.sink_tokens} tokens": (sink_gen, args.sink_tokens, 1),
        f"sink {SINKS}+{args.sink_window}, {args.sink_tokens} tokens, step by step": (sink_stepped, args.sink_tokens, 1),
        f"full, {inside} tokens (inside the window)": (engines["ctxmem ORT fp32"], inside, repeats),
        f"full, {inside} tokens (inside the window), step by step": (engines["ctxmem ORT fp32 step by step"], inside,
                                                                     repeats)}

    rng = np.random.default_rng(0)
    prompts = {b: rng.integers(0, 256, size=(b, args.prompt)).tolist() for b in args.batches}
    times, tokens = {}, {}
    for round_ in range(args.rounds + 1):  # round 0 warms every engine up and is not counted
        for batch in args.batches:
            for name, call in calls.items():
                seconds, out = call(prompts[batch])
                if round_:
                    times.setdefault((name, batch), []).append(seconds)
                tokens[(name, batch)] = out
            for name, (gen, n, reps) in sink_calls.items():
                cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
                seconds, _ = _timed(lambda: [gen.generate(prompts[batch], cfg) for _ in range(reps)])
                if round_:
                    times.setdefault((name, batch), []).append(seconds * args.tokens / (n * reps))  # per --tokens tokens
        print(f"round {round_}/{args.rounds} done", file=sys.stderr, flush=True)
    for worker in peers.values():
        worker.close()
    rows = []
    for batch in args.batches:
        reference = tokens[("transformers eager", batch)]
        ours = batch * args.tokens / statistics.median(times[("ctxmem ORT fp32", batch)])
        for name in calls:
            tps = batch * args.tokens / statistics.median(times[(name, batch)])
            same = sum(a == b for a, b in zip(tokens[(name, batch)], reference))
            rows.append({"engine": name, "batch": batch, "tokens_per_s": tps, "x_ctxmem_fp32": tps / ours,
                         "greedy_rows_equal": same, "rows": batch})
    sink_rows = [{"run": name, "batch": batch,
                  "tokens_per_s": batch * args.tokens / statistics.median(times[(name, batch)])}
                 for batch in args.batches for name in sink_calls]
    return rows, sink_rows


# What a call's time is: "wall" (time.perf_counter) or "cpu" (time.process_time of the process
# that generates: this one, or a peer's worker). On a shared machine whose load moves during a run,
# wall time counts the waits for a core and CPU time does not; each engine runs one thread.
CLOCK = ["wall"]


def _timed(fn):
    clock = time.process_time if CLOCK[0] == "cpu" else time.perf_counter
    start = clock()
    out = fn()
    return clock() - start, out


# ---- report ---------------------------------------------------------------------------------------
def table(rows: list[dict], sink_rows: list[dict], args) -> str:
    head = f"{'engine':<32} {'batch':>5} {'tokens/s':>10} {'x ctxmem fp32':>14} {'greedy = HF':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['engine']:<32} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {r['x_ctxmem_fp32']:>14.2f} "
                     f"{r['greedy_rows_equal']:>8}/{r['rows']:<3}")
    lines.append("")
    for r in sink_rows:
        lines.append(f"ctxmem ORT fp32 {r['run']:<40} batch {r['batch']}: {r['tokens_per_s']:9.1f} tokens/s")
    cfg = ", ".join(f"{k}={LLAMA[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size"))
    lines.append(f"(random Llama {cfg}; {args.prompt}-token prompt + {args.tokens} greedy tokens; "
                 f"{args.threads} thread(s) per engine; median of {args.rounds} interleaved rounds; "
                 f"{args.clock} time)")
    return "\n".join(lines)


def targets(rows: list[dict], sink_rows: list[dict]) -> list[str]:
    """Issue 10's targets, each met / NOT met / not measured."""
    tps = {(r["engine"], r["batch"]): r["tokens_per_s"] for r in rows}
    out = []

    def ratio(a, b, batch, want, label):
        if (a, batch) in tps and (b, batch) in tps:
            x = tps[(a, batch)] / tps[(b, batch)]
            out.append(f"{label} at batch {batch}: {'met' if x >= want else 'NOT met'} ({x:.2f}x, target >= {want}x)")
        else:
            out.append(f"{label} at batch {batch}: not measured")
    batches = sorted({r["batch"] for r in rows})
    for batch in batches:
        ratio("ctxmem ORT fp32", "onnxruntime-genai fp32", batch, 1.0, "ctxmem fp32 vs genai fp32")
        ratio("ctxmem ORT int8", "onnxruntime-genai int8", batch, 1.0, "ctxmem int8 vs genai int8")
        ratio("ctxmem ORT int4", "onnxruntime-genai int4", batch, 1.0, "ctxmem int4 vs genai int4 (reported)")
        ratio("ctxmem ORT fp32 decode session", "onnxruntime-genai fp32", batch, 1.0,
              "ctxmem fp32 decode session (opt-in) vs genai fp32")
        ratio("ctxmem ORT int8 decode session", "onnxruntime-genai int8", batch, 1.0,
              "ctxmem int8 decode session (opt-in) vs genai int8")
    if 1 in batches and 8 in batches:
        x = tps[("ctxmem ORT fp32", 8)] / tps[("ctxmem ORT fp32", 1)]
        out.append(f"ctxmem fp32 batch 8 vs batch 1: {'met' if x >= 6 else 'NOT met'} ({x:.2f}x, target >= 6x)")
    for batch in batches:
        # each with the greedy loop, and step by step (the window slides every step either way)
        sink, sink_stepped, full, stepped = [r["tokens_per_s"] for r in sink_rows if r["batch"] == batch]
        out.append(f"sink far past the window vs full inside it, batch {batch}: "
                   f"{'met' if sink >= 0.9 * full else 'NOT met'} ({sink / full:.2f}x, target >= 0.90x; "
                   f"step by step both: {sink_stepped / stepped:.2f}x)")
    return out


def profile(args) -> str:
    """Where one decode step goes (batch 1 and 8, 40 cached tokens): ONNX Runtime's per-op profile of
    the fused and the traced fp32 graphs, and session.run's share of a whole generate call."""
    import numpy as np
    import onnxruntime as ort

    from ctxmem.export.runtime import load_onnx_generator
    from ctxmem.layout import build_layout
    from ctxmem.memory import MemoryConfig
    from ctxmem.sampling import GenerationConfig

    paths = build(CACHE)
    lines = []
    for key in ("fp32", "traced"):
        for batch in args.batches:
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
            options.enable_profiling = True
            options.profile_file_prefix = str(CACHE / f"profile-{key}")
            session = ort.InferenceSession(str(paths[key] / "model.onnx"), options, providers=["CPUExecutionProvider"])
            past = 40
            layout = build_layout(np.broadcast_to(np.arange(past + 1), (batch, past + 1)).copy(),
                                  np.ones((batch, past + 1), bool), 1).with_sinks()
            feed = {"input_ids": np.zeros((batch, 1), np.int64), "positions": layout.positions,
                    "key_positions": layout.key_positions, "allowed": layout.allowed,
                    "sink_positions": layout.sink_positions, "sink_keys": layout.sink_keys}
            for i in range(LLAMA["num_hidden_layers"]):
                for kind in ("key", "value"):
                    head_dim = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
                    feed[f"past_{kind}_{i}"] = np.zeros((batch, LLAMA["num_key_value_heads"], past, head_dim),
                                                        np.float32)
            feed = _declared(session, feed)
            steps = 100
            for _ in range(steps):
                session.run(None, feed)
            per_op, nodes, _ = _kernel_time_by_op(session)
            total = sum(per_op.values())
            lines.append(f"{key} graph, batch {batch}: {sum(nodes.values()) // steps} nodes/step, kernels "
                         f"{total / steps:.0f} us/step (profiled)")
            for op, us in per_op.most_common(8):
                lines.append(f"    {op:<34} {us / steps:8.1f} us  {nodes[op] // steps:4d} nodes  {us / total:6.1%}")
    for batch in args.batches:  # session.run against the whole loop (memory bookkeeping, sampler)
        gen = load_onnx_generator(paths["fp32"], memory=MemoryConfig("full"), provider="cpu",
                                  intra_op_threads=args.threads)
        config = GenerationConfig(max_new_tokens=args.tokens, temperature=0.0, stop_token_ids=[])
        prompts = [[1] * args.prompt] * batch
        inner = gen.backend.session
        spent = [0.0]

        gen.generate(prompts, config)  # makes the greedy loop's session
        # session.run (prefill, general path), run_with_iobinding (a plain decode step in place) and the
        # greedy loop's steps on the decode branch's own session
        inner.run = _adding_time(inner.run, spent, time.perf_counter)
        inner.run_with_iobinding = _adding_time(inner.run_with_iobinding, spent, time.perf_counter)
        greedy = gen.backend._greedy_session
        if greedy is not None and greedy is not inner:
            greedy.run_with_iobinding = _adding_time(greedy.run_with_iobinding, spent, time.perf_counter)
        best = None
        for _ in range(3):
            spent[0] = 0.0
            seconds, _ = _timed(lambda: gen.generate(prompts, config))
            if best is None or seconds < best[0]:
                best = (seconds, spent[0])
        lines.append(f"generate, fused fp32, batch {batch}: {best[0] * 1e3:.1f} ms, session.run {best[1] * 1e3:.1f} ms "
                     f"({best[1] / best[0]:.0%}), Python around it {(best[0] - best[1]) * 1e3:.1f} ms "
                     f"({(best[0] - best[1]) / (args.tokens + 1) * 1e6:.0f} us/step)")
    lines += graph_only(paths, args)
    lines += sink_against_full(paths, args)
    lines += python_outside_the_graph(args)
    return "\n".join(lines)


def _kernel_time_by_op(session) -> tuple:
    """Ends ``session``'s ONNX Runtime profile (SessionOptions.enable_profiling) and reads its trace (then
    removed): kernel microseconds per op type, node runs per op type, and the number of runs."""
    import collections

    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    per_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    runs = sum(1 for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    return per_op, nodes, runs


def _greedy_kernels(export: Path, memory, prompts, config, threads: int) -> str:
    """One greedy generate with the greedy loop's session (the decode branch as a session of its own)
    under ONNX Runtime's profiler: its decode steps' kernel time per step, the four largest op types."""
    import onnxruntime as ort

    from ctxmem.export.runtime import _session_options, decode_branch_model, load_onnx_generator

    def profiled_session():
        options = _session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = str(CACHE / "profile-greedy")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                         str(export.resolve()))
        return ort.InferenceSession(decode_branch_model(export / "model.onnx").SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])

    gen = load_onnx_generator(export, memory=memory, provider="cpu", intra_op_threads=threads)
    gen.backend._make_greedy_session = profiled_session  # the loop's session, made on its first call
    gen.generate(prompts, config)
    per_op, _, steps = _kernel_time_by_op(gen.backend._greedy_session)
    top = ", ".join(f"{op} {us / steps:.0f}" for op, us in per_op.most_common(4))
    return f"{steps} steps, {sum(per_op.values()) / steps:.0f} us a step: {top}"


def _adding_time(run, spent: list, clock):
    """``run`` wrapped to add each call's time by ``clock`` to spent[0] (a session method, timed in place)."""
    def call(*a, **k):
        start = clock()
        try:
            return run(*a, **k)
        finally:
            spent[0] += clock() - start
    return call


def sink_against_full(paths, args) -> list[str]:
    """The sink check's two greedy generates (sink far past the window, full inside it) split into the
    graph's steps (run_with_iobinding on the greedy loop's session, timed around each call) and everything
    else (prefill, memory, compactions, sampler, detokenizer), per generated token, CPU time, min of 3:
    how much of the gap is the graph's attention over a full window against a half-full one on average.
    A third generate, full over the window's last quarter (a long prompt first), gives the graph's steps
    at nearly sink's cache length (its "rest" holds that long prompt's prefill: not comparable). Under each,
    which op types make the graph's steps (ONNX Runtime's per-op profile of the greedy loop's session)."""
    import numpy as np

    from ctxmem.export.runtime import load_onnx_generator
    from ctxmem.memory import MemoryConfig
    from ctxmem.sampling import GenerationConfig

    inside = args.sink_window + SINKS - args.prompt
    late = max(4, inside // 4)  # `full` over the window's last quarter: a cache as long as sink's, nearly
    lines = []
    for batch in args.batches:
        split = {}
        for label, memory, prompt, n in ((f"sink {SINKS}+{args.sink_window}, {args.sink_tokens} tokens",
                                          MemoryConfig("sink", window=args.sink_window, sinks=SINKS), args.prompt,
                                          args.sink_tokens),
                                         (f"full, {inside} tokens", MemoryConfig("full"), args.prompt, inside),
                                         (f"full, {args.prompt + inside - late}-token prompt + {late} tokens",
                                          MemoryConfig("full"), args.prompt + inside - late, late)):
            gen = load_onnx_generator(paths["fp32"], memory=memory, provider="cpu", intra_op_threads=args.threads)
            config = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
            prompts = np.random.default_rng(0).integers(0, 256, size=(batch, prompt)).tolist()
            gen.generate(prompts, config)  # makes the greedy loop's session
            session, spent = gen.backend._greedy_session, [0.0]
            if session is None:  # no greedy run (too few tokens): nothing to split
                continue
            session.run_with_iobinding = _adding_time(session.run_with_iobinding, spent, time.process_time)
            best = None
            for _ in range(3):
                spent[0] = 0.0
                start = time.process_time()
                gen.generate(prompts, config)
                seconds = time.process_time() - start
                if best is None or seconds < best[0]:
                    best = (seconds / n, spent[0] / n)
            split[label] = best
            lines.append(f"greedy generate, {label}, batch {batch}: {best[0] * 1e6:.0f} us per token, the graph's steps "
                         f"{best[1] * 1e6:.0f}, the rest {(best[0] - best[1]) * 1e6:.0f}")
            # then which ops make the graph's steps (a generate of its own: the profiler slows what it times)
            lines.append(f"    its decode steps' kernels (ONNX Runtime's profiler, one generate): "
                         f"{_greedy_kernels(paths['fp32'], memory, prompts, config, args.threads)}")
        if len(split) < 3:
            continue
        (sink_all, sink_graph), (full_all, full_graph), (_, late_graph) = split.values()
        lines.append(f"sink / full tokens/s, batch {batch}: {full_all / sink_all:.2f}x, the graph's steps alone "
                     f"{full_graph / sink_graph:.2f}x, against full's over the window's last quarter "
                     f"{late_graph / sink_graph:.2f}x")
    return lines


def graph_only(paths, args) -> list[str]:
    """One decode step of each graph alone (40 cached tokens, the same input ids), interleaved, min
    of 15 rounds of 20 steps: ours against onnxruntime-genai's graph where the bench built it
    (its GroupQueryAttention graph loads in this onnxruntime too); in place (past and present one
    buffer), also our decode branch as a session of its own (decode_session=True: no If)."""
    import numpy as np
    import onnxruntime as ort

    from ctxmem.export.runtime import create_decode_session
    from ctxmem.layout import build_layout

    past, layers = 40, LLAMA["num_hidden_layers"]
    shape = lambda b: (b, LLAMA["num_key_value_heads"], past, LLAMA["hidden_size"] // LLAMA["num_attention_heads"])  # noqa: E731
    graphs = {"ctxmem fp32": paths["fp32"], "ctxmem fp32 traced": paths["traced"], "ctxmem int8": paths["int8"],
              "genai fp32": CACHE / "genai-fp32", "genai int8": CACHE / "genai-int8"}
    sessions = {}
    for name, folder in graphs.items():
        if (folder / "model.onnx").exists():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = args.threads, 1, 3
            sessions[name] = ort.InferenceSession(str(folder / "model.onnx"), options,
                                                  providers=["CPUExecutionProvider"])
    # the decode branch as a session of its own (OrtBackend's decode_session=True): no If, no condition
    for key in ("fp32", "int8"):
        sessions[f"ctxmem {key} decode session"] = create_decode_session(paths[key] / "model.onnx", args.threads)
    lines = []
    for batch in args.batches:
        feeds = {}
        for name in sessions:
            cache = np.zeros(shape(batch), np.float32)
            if name.startswith("genai"):
                feed = {"input_ids": np.zeros((batch, 1), np.int64),
                        "attention_mask": np.ones((batch, past + 1), np.int64)}
                feed.update({f"past_key_values.{i}.{kind}": cache for i in range(layers) for kind in ("key", "value")})
            else:
                layout = build_layout(np.broadcast_to(np.arange(past + 1), (batch, past + 1)).copy(),
                                      np.ones((batch, past + 1), bool), 1).with_sinks()
                feed = {"input_ids": np.zeros((batch, 1), np.int64), "positions": layout.positions,
                        "key_positions": layout.key_positions, "allowed": layout.allowed,
                        "sink_positions": layout.sink_positions, "sink_keys": layout.sink_keys}
                feed.update({f"past_{kind}_{i}": cache for i in range(layers) for kind in ("key", "value")})
            feeds[name] = _declared(sessions[name], feed)
        calls = {name: (lambda s, f: lambda: s.run(None, f))(session, feeds[name]) for name, session in sessions.items()
                 if "decode session" not in name}
        # in place, as OrtBackend and genai's runtime decode: past and present bound to one buffer of
        # more slots than the cache holds, which GroupQueryAttention appends to (no present copied);
        # the decode sessions run only so
        ours, theirs = ("past_{kind}_{i}", "present_{kind}_{i}"), ("past_key_values.{i}.{kind}", "present.{i}.{kind}")
        for name in ("ctxmem fp32", "ctxmem fp32 decode session", "genai fp32",
                     "ctxmem int8", "ctxmem int8 decode session", "genai int8"):
            if name in sessions:
                names = theirs if name.startswith("genai") else ours
                label = name if "decode session" in name else f"{name} in place"
                calls[label] = _bound_in_place(sessions[name], feeds[name], *names, past + 64)
        best = {name: float("inf") for name in calls}
        for _ in range(15):
            for name, call in calls.items():
                seconds, _ = _timed(lambda: [call() for _ in range(20)])
                best[name] = min(best[name], seconds / 20)
        lines.append(f"graph only, batch {batch}: " + ", ".join(f"{n} {t * 1e6:.0f} us" for n, t in best.items()))
    return lines


def _declared(session, feed: dict) -> dict:
    """The inputs a graph declares: key_positions only under contract v2 (the traced graph). With
    positions from 0 and no window, v2's positions are v3's too (a row's key frame starts at 0)."""
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


def _bound_in_place(session, feed: dict, past_name: str, present_name: str, capacity: int):
    """A call with every past and present bound to one buffer of ``capacity`` slots holding the
    feed's cache (the decode step of OrtBackend's KVBuffer), the logits to an array: the same slot
    is written again at each call (it measures a step, it does not append)."""
    import numpy as np
    import onnxruntime as ort

    binding = session.io_binding()
    outputs = [o.name for o in session.get_outputs()]
    for name, value in feed.items():
        if not name.startswith("past"):
            binding.bind_cpu_input(name, value)
    for i in range(LLAMA["num_hidden_layers"]):
        for kind in ("key", "value"):
            name = past_name.format(i=i, kind=kind)
            cache = feed[name]
            buffer = np.zeros(cache.shape[:2] + (capacity,) + cache.shape[3:], cache.dtype)
            buffer[:, :, :cache.shape[2]] = cache
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(present_name.format(i=i, kind=kind), value)
    logits = np.empty((next(iter(feed.values())).shape[0], 1, LLAMA["vocab_size"]), np.float32)
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    for name in outputs:
        if name.startswith("query"):  # contract v4's query outputs: bound too, as the runtime does
            binding.bind_output(name, "cpu")
    return lambda: session.run_with_iobinding(binding)


def python_outside_the_graph(args) -> list[str]:
    """The loop's own cost per decode step (memory bookkeeping, layout, sampler, detokenizer) with a
    backend that does nothing but hand back a cache of the right size: full inside the window
    against sink far past it."""
    import numpy as np

    from ctxmem.generation import Generator
    from ctxmem.memory import MemoryConfig, NumpyCacheOps
    from ctxmem.sampling import GenerationConfig
    from ctxmem.tokenizer import ByteTokenizer

    heads, dim = LLAMA["num_key_value_heads"], LLAMA["hidden_size"] // LLAMA["num_attention_heads"]

    class NullBackend:
        ops = NumpyCacheOps()
        max_seq_len, vocab_size, uses_rope, sink_token_id = LLAMA["max_position_embeddings"], LLAMA["vocab_size"], True, None
        reads_key_positions = False  # as OrtBackend on a v3/v4 graph: decode layouts come without them

        def forward(self, ids, layout, past, last_only=True):
            cache = np.zeros((ids.shape[0], heads, layout.allowed.shape[2], dim), np.float32)
            return np.zeros((ids.shape[0], self.vocab_size), np.float32), [(cache, cache)] * LLAMA["num_hidden_layers"]

    lines = []
    inside = args.sink_window + SINKS - args.prompt
    for batch in args.batches:
        for label, memory, n in ((f"full, {inside} tokens", MemoryConfig("full"), inside),
                                 (f"sink {SINKS}+{args.sink_window}, {args.sink_tokens} tokens",
                                  MemoryConfig("sink", window=args.sink_window, sinks=SINKS), args.sink_tokens)):
            gen = Generator(NullBackend(), ByteTokenizer(), memory)
            config = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_token_ids=[])
            seconds = min(_timed(lambda: gen.generate([[1] * args.prompt] * batch, config))[0] for _ in range(3))
            lines.append(f"Python outside the graph, {label}, batch {batch}: {seconds / n * 1e6:.0f} us/step")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sink-tokens", type=int, default=1000, help="tokens generated under the sink policy")
    p.add_argument("--sink-window", type=int, default=124, help="its window (beside 4 sinks)")
    p.add_argument("--no-peers", action="store_true", help="skip onnxruntime-genai and optimum-onnx")
    p.add_argument("--no-eager", action="store_true", help="skip ctxmem torch eager")
    p.add_argument("--profile", action="store_true", help="print where a decode step's time goes, then exit")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time a call by the wall clock or by the CPU time of the process that generates "
                        "(steadier on a loaded shared machine: no waiting for a core)")
    args = p.parse_args(argv)
    CLOCK[0] = args.clock
    if args.profile:
        print(profile(args))
        return 0
    rows, sink_rows = run(args)
    print(table(rows, sink_rows, args))
    print("\n".join(targets(rows, sink_rows)))
    if args.json:
        print(json.dumps({"rows": rows, "sink": sink_rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
