"""Core subcommands: generate, info, import-hf, export-hf."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("ctxmem.generate")


class GenerateArgumentError(ValueError):
    """Options of `ctxmem generate` that do not go together (shown as one line, no traceback)."""

# Where each --backend comes from; imported only when chosen, so the core never loads onnxruntime.
BACKENDS = {"torch": ("ctxmem.generation", "load_generator"),
            "onnx": ("ctxmem.export.resolve", "open_onnx_generator")}  # dirs, runs:/, models:/


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate", help="generate text from a checkpoint or an ONNX export",
        description="Generate a continuation. Only the generated text goes to stdout (so it pipes); "
                    "logs and the summary go to stderr. Options left unset take the model's saved "
                    "defaults (generation_config.json or the export's runtime config).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--model", required=True, help="checkpoint directory (torch) or export directory (onnx)")
    g.add_argument("--prompt", default="-", help="prompt text; '-' reads it from stdin")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    g.add_argument("--backend", choices=["auto", *sorted(BACKENDS)], default="auto",
                   help="torch: eager PyTorch on a checkpoint; onnx: ONNX Runtime on an export; auto: onnx for "
                        "an export folder (it holds runtime_config.json) or a models:/ or runs:/ URI, else torch")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate (default 64)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (the default)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None, help=">1 discourages repeats (1 = off)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable); not printed")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--policy", choices=["full", "sink", "recompute", "retrieve"], default=None,
                   help="what the KV cache does past the window: full = error at the model's context; "
                        "sink = keep --sinks first tokens + --window recent ones (constant cost); "
                        "recompute = drop --chunk oldest tokens and re-prefill the window; "
                        "retrieve = sink, plus the --budget most relevant evicted tokens put back every "
                        "8 tokens (a bounded store of what left the window)")
    g.add_argument("--window", type=int, default=None, help="recent tokens kept (sink) / window size (recompute)")
    g.add_argument("--sinks", type=int, default=None, help="attention-sink tokens kept at the start (sink policy)")
    g.add_argument("--chunk", type=int, default=None, help="tokens dropped per re-prefill (recompute policy)")
    g.add_argument("--budget", type=int, default=None,
                   help="evicted tokens put back, in whole 16-token blocks (retrieve policy; default 32)")
    g.add_argument("--store", type=int, default=None,
                   help="evicted tokens kept per stream, oldest blocks dropped first (retrieve; default 2048)")
    g.add_argument("--device", default="cpu", help="torch device for --backend torch (cpu, cuda)")
    g.add_argument("--decode-session", action="store_true",
                   help="--backend onnx on CPU: decode steps on a second ONNX Runtime session holding only the "
                        "graph's one-token branch (5-11%% faster per token measured, the same tokens; about "
                        "1.5x the resident memory: the weights are loaded and packed twice)")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe presets, a checkpoint or an export, and the installed stack",
                       description="Without --model: the model presets and the installed stack. With --model: "
                                   "the checkpoint's config, parameter count, tokenizer and saved defaults.")
    i.add_argument("--model", default=None, help="checkpoint or export directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    imp = sub.add_parser("import-hf", help="convert a local Hugging Face Llama-family checkpoint",
                         description="Convert what `save_pretrained` wrote (config.json, safetensors, "
                                     "tokenizer.json) into a ctxmem checkpoint. No hub access.")
    imp.add_argument("hf_dir", help="Hugging Face model directory")
    imp.add_argument("--out", required=True, help="ctxmem checkpoint directory to write")
    imp.set_defaults(func=cmd_import_hf)

    exp = sub.add_parser("export-hf", help="write a ctxmem checkpoint in Hugging Face Llama layout",
                         description="The reverse of import-hf: LlamaForCausalLM.from_pretrained reads the result.")
    exp.add_argument("model", help="ctxmem checkpoint directory")
    exp.add_argument("--out", required=True, help="Hugging Face directory to write")
    exp.set_defaults(func=cmd_export_hf)


def chosen_backend(backend: str, model: str) -> str:
    """`--backend auto`: what the model names - a registry URI or an export folder (its runtime config,
    written by `ctxmem export`) runs on ONNX Runtime, anything else is a checkpoint for torch."""
    if backend != "auto":
        return backend
    if model.startswith(("models:/", "runs:/")) or (Path(model) / "runtime_config.json").is_file():
        return "onnx"
    return "torch"


def _build_generator(args):
    import importlib

    args.backend = chosen_backend(args.backend, args.model)
    module, name = BACKENDS[args.backend]
    loader = getattr(importlib.import_module(module), name)
    if args.backend == "torch":
        if args.decode_session:
            raise GenerateArgumentError("--decode-session is an ONNX Runtime option: use it with --backend onnx")
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise GenerateArgumentError(f"--device {args.device}: torch sees no CUDA device here "
                                        "(torch.cuda.is_available() is False); use --device cpu")
        generator = loader(args.model, device=args.device)
    else:
        if args.device != "cpu":
            raise GenerateArgumentError(f"--device {args.device} is for --backend torch; --backend onnx takes CUDA "
                                        "where this onnxruntime has it (onnxruntime-gpu)")
        generator = loader(args.model, decode_session=args.decode_session)
    backend = generator.backend
    # fails now, naming the setting, on a bad combination
    generator.memory_config = generator.memory_config.with_overrides(
        backend.max_seq_len, backend.uses_rope, policy=args.policy, window=args.window, sinks=args.sinks,
        chunk=args.chunk, budget=args.budget, store=args.store)
    return generator


def cmd_generate(args) -> int:
    from dataclasses import replace

    from .chat_template import ChatTemplate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    generator = _build_generator(args)
    config = generator.defaults.with_overrides(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        template = ChatTemplate(generator.tokenizer)
        prompt_ids = template.render(messages, add_generation_prompt=True)
        # plain-text templates (tokenizers without our chat tokens) end a turn with a text marker
        config = replace(config, stop=list(dict.fromkeys([*config.stop, *template.stop_strings])))
    else:
        prompt_ids = generator.encode(prompt)
    mem = generator.memory_config
    log.info("backend=%s policy=%s window=%s sinks=%s prompt_tokens=%d", getattr(generator.backend, "name", args.backend),
             mem.policy, mem.window, mem.sinks, len(prompt_ids))
    start, count, reason = time.perf_counter(), 0, "length"
    for deltas in generator.stream([prompt_ids], config):
        for d in deltas:
            count += 1
            if d.text:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            reason = d.finish_reason or reason
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    log.info("generated %d tokens in %.2fs (%.1f tok/s), finish_reason=%s", count, elapsed,
             count / max(elapsed, 1e-9), reason)
    return 0


def cmd_info(args) -> int:
    from importlib import metadata

    from .config import PRESETS, preset

    if args.model is None:
        stack = {}
        for dist in ("torch", "deepspeed", "onnx", "onnxruntime", "onnxruntime-gpu", "ray", "mlflow", "transformers"):
            try:
                stack[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        presets = {name: preset(name).num_params() for name in PRESETS}
        if args.json:
            print(json.dumps({"presets": presets, "stack": stack}, indent=2))
            return 0
        print("presets (parameters at the preset's default vocab):")
        for name, n in presets.items():
            c = preset(name)
            print(f"  {name:9s} {n / 1e6:8.2f}M  d_model={c.d_model} layers={c.n_layers} heads={c.n_heads}/"
                  f"{c.n_kv_heads} ffn={c.ffn} norm={c.norm} pos={c.pos} context={c.max_seq_len}")
        print("installed stack: " + ", ".join(f"{k} {v}" for k, v in stack.items()))
        return 0
    model_dir = Path(args.model)
    info: dict = {"path": str(model_dir)}
    from .checkpoint import CONFIG, GENERATION, TOKENIZER, CheckpointError
    from .config import ModelConfig

    if (model_dir / CONFIG).exists():
        cfg = ModelConfig.load(model_dir / CONFIG)
        info.update(kind="checkpoint", config=cfg.to_dict(), parameters=cfg.num_params())
    files = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{model_dir} is not a directory with a checkpoint or an export")
    info["files"] = files
    for name in (GENERATION, "runtime_config.json", "mlflow_run.json", "verification.json"):
        if (model_dir / name).exists():
            info[name] = json.loads((model_dir / name).read_text())
    if (model_dir / TOKENIZER).exists():
        from .tokenizer import load_tokenizer

        tok = load_tokenizer(model_dir / TOKENIZER)
        info["tokenizer"] = {"type": type(tok).__name__, "vocab_size": tok.vocab_size}
    print(json.dumps(info, indent=2))
    return 0


def cmd_import_hf(args) -> int:
    from .hf import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(out)
    return 0


def cmd_export_hf(args) -> int:
    from .hf import export_hf

    print(export_hf(args.model, args.out))
    return 0
