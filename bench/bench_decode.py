"""Decode throughput, one run side by side, on the same Llama weights:

    ctxmem torch eager | ctxmem ONNX Runtime fp32 | ONNX Runtime int8 | Hugging Face transformers eager generate

    .venv/bin/python bench/bench_decode.py [--tokens 64] [--prompt 16] [--batches 1 8] [--threads 1]

A random LlamaForCausalLM is built with transformers and saved with save_pretrained, imported with
ctxmem.hf.import_hf, exported to ONNX (fp32, verified) and quantised (int8, accuracy-checked);
everything is cached under .cache/bench/decode/. Each engine generates --tokens tokens greedily after
a --prompt-token prompt (every row the same length: no padding), under the `full` memory policy;
tokens/s = batch * tokens / wall time of the whole generate call (prefill included), best of
--repeats after one warm-up. Every engine runs on --threads intra-op threads (ONNX Runtime's
default per replica is 1). Target (issue 4): ctxmem ORT >= 3x transformers at batch 1 on CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench" / "decode"
# A small Llama (GQA, untied embeddings): large enough that the matmuls are real work, small
# enough that the run takes about a minute on two CPU cores.
LLAMA = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
             tie_word_embeddings=False, hidden_act="silu", bos_token_id=257, eos_token_id=258)


def build(cache: Path) -> dict[str, Path]:
    """HF dir -> ctxmem checkpoint -> fp32 export -> int8 export (each step skipped when cached)."""
    paths = {"hf": cache / "hf", "ckpt": cache / "ckpt", "fp32": cache / "onnx-fp32", "int8": cache / "onnx-int8"}
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
    if not (paths["ckpt"] / "model.safetensors").exists():
        from ctxmem.hf import import_hf
        from ctxmem.tokenizer import ByteTokenizer

        import_hf(paths["hf"], paths["ckpt"])
        ByteTokenizer().save(paths["ckpt"] / "tokenizer.json")  # ids 0..262 < vocab 2048; prompts are ids anyway
    if not (paths["fp32"] / "runtime_config.json").exists():
        from ctxmem.export.onnx_export import export_onnx

        export_onnx(paths["ckpt"], paths["fp32"])
    if not (paths["int8"] / "runtime_config.json").exists():
        from ctxmem.export.onnx_export import derive_variant

        derive_variant(paths["fp32"], paths["int8"], "int8")
    return paths


def _best(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (allocations, ORT arena, HF caches)
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def run(args) -> list[dict]:
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
    engines = {
        "ctxmem torch eager": load_generator(paths["ckpt"], memory=full),
        "ctxmem ORT fp32": load_onnx_generator(paths["fp32"], memory=full, provider="cpu",
                                               intra_op_threads=args.threads),
        "ctxmem ORT int8": load_onnx_generator(paths["int8"], memory=full, provider="cpu",
                                               intra_op_threads=args.threads),
    }
    hf = LlamaForCausalLM.from_pretrained(paths["hf"], attn_implementation="eager").eval()
    config = GenerationConfig(max_new_tokens=args.tokens, temperature=0.0, stop_token_ids=[])
    rng = np.random.default_rng(0)
    rows, tokens_seen = [], {}
    for batch in args.batches:
        prompts = rng.integers(0, 256, size=(batch, args.prompt)).tolist()
        for name, gen in engines.items():
            seconds, done = _best(lambda: gen.generate(prompts, config), args.repeats)
            tokens_seen[(name, batch)] = [c.token_ids for c in done]
            rows.append({"engine": name, "batch": batch, "seconds": seconds})
        ids = torch.tensor(prompts)

        def hf_generate():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                   min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        seconds, out = _best(hf_generate, args.repeats)
        tokens_seen[("transformers", batch)] = out[:, args.prompt:].tolist()
        rows.append({"engine": "transformers eager generate", "batch": batch, "seconds": seconds})
    for row in rows:
        row["tokens_per_s"] = row["batch"] * args.tokens / row["seconds"]
        hf_row = next(r for r in rows if r["batch"] == row["batch"] and r["engine"].startswith("transformers"))
        torch_row = next(r for r in rows if r["batch"] == row["batch"] and r["engine"] == "ctxmem torch eager")
        row["x_transformers"] = row["tokens_per_s"] / (row["batch"] * args.tokens / hf_row["seconds"])
        row["x_torch"] = row["tokens_per_s"] / (row["batch"] * args.tokens / torch_row["seconds"])
        ref = tokens_seen[("transformers", row["batch"])]
        key = "transformers" if row["engine"].startswith("transformers") else row["engine"]
        row["same_tokens_as_hf"] = tokens_seen[(key, row["batch"])] == ref
    return rows


def memory_floor(paths: dict[str, Path]) -> str:
    """Batch-1 decode reads every weight once per token: compare one ORT fp32 graph step with the
    time this machine takes to stream the same number of bytes (a numpy sum, one thread)."""
    import numpy as np

    from ctxmem.export.runtime import OrtBackend
    from ctxmem.layout import build_layout

    nbytes = (paths["fp32"] / "model.onnx.data").stat().st_size
    data = np.ones(nbytes // 4, dtype=np.float32)
    backend = OrtBackend(paths["fp32"], provider="cpu")
    c = backend.contract
    past = [(np.zeros((1, c.n_kv_heads, 40, c.head_dim), np.float32),) * 2] * c.n_layers
    layout = build_layout(np.arange(41)[None], np.ones((1, 41), bool), 1)  # one decode step after 40 tokens
    step = lambda: backend.run(np.zeros((1, 1), np.int64), layout, past)  # noqa: E731
    read, graph = _best(lambda: [data.sum() for _ in range(20)], 3)[0] / 20, _best(lambda: [step() for _ in range(20)], 3)[0] / 20
    return (f"batch-1 floor: one ORT fp32 graph step takes {graph * 1e3:.2f} ms; streaming its {nbytes / 2**20:.1f} MiB "
            f"of fp32 weights once takes {read * 1e3:.2f} ms on this machine (int8 reads a quarter of that)")


def table(rows: list[dict], args) -> str:
    head = f"{'engine':<28} {'batch':>5} {'tokens/s':>10} {'x transformers':>15} {'x torch eager':>14} {'greedy = HF':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['engine']:<28} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {r['x_transformers']:>15.2f} "
                     f"{r['x_torch']:>14.2f} {'yes' if r['same_tokens_as_hf'] else 'no':>12}")
    cfg = ", ".join(f"{k}={LLAMA[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                  "num_key_value_heads", "intermediate_size", "vocab_size"))
    lines.append(f"(random Llama {cfg}; {args.prompt}-token prompt + {args.tokens} greedy tokens; "
                 f"{args.threads} thread(s) per engine; best of {args.repeats})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = p.parse_args(argv)
    rows = run(args)
    print(table(rows, args))
    print(memory_floor(build(CACHE)))
    if args.json:
        print(json.dumps(rows))
    batch1 = next(r for r in rows if r["batch"] == 1 and r["engine"] == "ctxmem ORT fp32") if 1 in args.batches else None
    if batch1 is not None:
        verdict = "met" if batch1["x_transformers"] >= 3 else "NOT met"
        print(f"target ctxmem ORT >= 3x transformers at batch 1: {verdict} ({batch1['x_transformers']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
