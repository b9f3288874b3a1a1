"""A peer engine for bench/bench_decode.py, run in the peer's own virtualenv (its pins conflict with
ctxmem's): builds the peer's model from the bench's Hugging Face folder once, then answers generate
requests, one JSON line in, one out, so the bench can interleave it with the other engines.

    PEER_PYTHON bench/decode_peers.py --engine genai --precision fp32 --hf HF_DIR --out MODEL_DIR [--threads 1]
    stdin:  {"prompts": [[id, ...], ...], "tokens": 64}
    stdout: {"seconds": wall time of the whole generate call, "tokens": [[id, ...], ...]}

Engines: genai (onnxruntime-genai; its model builder, precision fp32/int8/int4, CPU) and optimum
(optimum-onnx ORTModelForCausalLM, fp32). Greedy, no early stop, --threads intra-op threads.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def genai_engine(hf: Path, out: Path, precision: str, threads: int):
    import numpy as np
    import onnxruntime_genai as og

    if not (out / "genai_config.json").exists():
        # the builder's --help crashes in some versions; its options are in its source (builder.py)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-p", precision, "-e", "cpu", "-c", str(out.parent / f".{out.name}-cache")],
                       check=True, stdout=subprocess.DEVNULL)
    config = og.Config(str(out))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def generate(prompts, tokens):
        ids = np.asarray(prompts, dtype=np.int32)
        params = og.GeneratorParams(model)
        length = ids.shape[1] + tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=len(prompts))
        start, cpu = time.perf_counter(), time.process_time()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return seconds, cpu, [[int(t) for t in gen.get_sequence(i)[ids.shape[1]:]] for i in range(len(prompts))]
    return generate


def optimum_engine(hf: Path, out: Path, precision: str, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    if precision != "fp32":
        raise SystemExit("optimum-onnx runs fp32 here")
    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    if not (out / "model.onnx").exists():
        ORTModelForCausalLM.from_pretrained(str(hf), export=True, use_cache=True).save_pretrained(str(out))
    model = ORTModelForCausalLM.from_pretrained(str(out), session_options=options, provider="CPUExecutionProvider",
                                                use_cache=True)

    def generate(prompts, tokens):
        ids = torch.tensor(prompts)
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            done = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        return seconds, cpu, done[:, ids.shape[1]:].tolist()
    return generate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=["genai", "optimum"], required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--hf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    build = genai_engine if args.engine == "genai" else optimum_engine
    generate = build(args.hf, args.out, args.precision, args.threads)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        seconds, cpu, tokens = generate(request["prompts"], request["tokens"])
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
