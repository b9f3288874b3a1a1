"""`ctxmem export`, `ctxmem registry {register,evaluate-memory,promote,list}` and `ctxmem eval`.

Only argparse here at import time: torch, onnx, onnxruntime and mlflow load inside the handlers.
Handlers return exit codes; user errors are the typed exceptions of export/errors.py, which
ctxmem.cli prints as one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .eval_memory_cli import add_memory_eval

log = logging.getLogger("ctxmem.export")


def register(sub: argparse._SubParsersAction) -> None:
    _add_export(sub)
    _add_registry(sub)
    _add_eval(sub)


def _uri_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db as `ctxmem train`)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (+ runtime config, tokenizer, verification)",
                       description="Write model.onnx (+ model.onnx.data), runtime_config.json, tokenizer.json and "
                                   "verification.json to --out. SPEC is a checkpoint directory, runs:/<id>/<path> "
                                   "or models:/NAME@ALIAS. See export/README.md.")
    p.add_argument("--model", required=True, metavar="SPEC", help="checkpoint directory, runs:/..., models:/...")
    p.add_argument("--out", required=True, help="export directory to write (an existing export is replaced)")
    variant = p.add_mutually_exclusive_group()
    variant.add_argument("--int8", action="store_true", help="int8 weights, MatMulNBits (CPU serving)")
    variant.add_argument("--int4", action="store_true", help="int4 weights, MatMulNBits (CPU serving)")
    variant.add_argument("--fp16", action="store_true", help="float16 weights and cache (GPU serving)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18; default 18)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="structured check against PyTorch (names, shapes, values, greedy tokens); default on")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens compared by --verify (default 64)")
    p.add_argument("--eval-data", default=None,
                   help="data for the int8/int4/fp16 accuracy check: a `ctxmem data prepare` folder or a text file "
                        "(default: text sampled from the fp32 model)")
    p.add_argument("--policy", choices=("full", "sink", "recompute", "retrieve"), default=None,
                   help="memory policy written to the runtime config (default: the checkpoint's generation_config)")
    p.add_argument("--window", type=int, default=None, help="runtime config: recent tokens kept (sink) / window (recompute)")
    p.add_argument("--sinks", type=int, default=None, help="runtime config: attention-sink tokens (sink policy)")
    p.add_argument("--chunk", type=int, default=None, help="runtime config: tokens dropped per re-prefill (recompute)")
    p.add_argument("--budget", type=int, default=None,
                   help="runtime config: evicted tokens put back (retrieve; default 32, whole 16-token blocks)")
    p.add_argument("--store", type=int, default=None,
                   help="runtime config: evicted tokens kept per stream, oldest blocks dropped first (retrieve; "
                        "default 2048)")
    _uri_arg(p)
    p.set_defaults(func=cmd_export)


def _add_registry(sub) -> None:
    p = sub.add_parser("registry", help="MLflow model registry: register, evaluate-memory, promote (gated aliases), "
                                        "list",
                       description="Register verified exports, record their memory evaluation, move aliases "
                                   "(challenger -> champion) through a gate, and list versions with their aliases "
                                   "and metrics.")
    rs = p.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    r = rs.add_parser("register", help="verify an export and register it as a new model version")
    r.add_argument("--export", required=True, help="export directory written by `ctxmem export`")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--checkpoint", default=None,
                   help="checkpoint to verify against (default: the source recorded in the runtime config)")
    r.add_argument("--eval-data", default=None, help="measure val loss/perplexity of the export on this data "
                                                     "(default: the training run's, from mlflow_run.json)")
    r.add_argument("--alias", default=None, help="then promote the new version to this alias (gated), e.g. challenger")
    r.add_argument("--reverify", action="store_true",
                   help="re-run the structured check against the checkpoint even if verification.json passed")
    r.add_argument("--eval-windows", type=int, default=32, help="windows of 128 tokens measured by --eval-data")
    r.add_argument("--allow-unverified", action="store_true",
                   help="register even if verification failed or is missing (tagged; promotion will refuse it)")
    r.add_argument("--description", default=None, help="model version description shown in the registry")
    _no_memory_gate_arg(r)
    _uri_arg(r)
    r.set_defaults(func=cmd_register)

    em = rs.add_parser("evaluate-memory", help="record a memory evaluation (eval memory) on a model version",
                       description="Run `ctxmem eval memory` on the version's export (--text / --data), or take "
                                   "an existing memory_eval.json (--result), and record it on the version: metrics "
                                   "and memory_eval/ artifacts in its run, the summary the champion gate reads as "
                                   "the version tag ctxmem.memory_eval.")
    em.add_argument("--name", required=True, help="registered model name")
    which = em.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None, help="version number to evaluate")
    which.add_argument("--from-alias", default=None, help="evaluate the version an alias points at (challenger)")
    source = em.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", default=None, help="UTF-8 text file to measure the version's export on")
    source.add_argument("--data", default=None, help="`ctxmem data prepare` folder (its validation split)")
    source.add_argument("--result", default=None,
                        help="an existing memory_eval.json or its folder (PNGs beside it), or runs:/RUN_ID/memory_eval "
                             "(training's end-of-run evaluation, eval.memory)")
    em.add_argument("--window", type=int, default=None, help="recent tokens kept (default: half the model's context)")
    em.add_argument("--sinks", type=int, default=None, help="attention sinks of the sink policy (default 4)")
    em.add_argument("--length", type=int, default=None, help="stream tokens (default: 20x the window)")
    em.add_argument("--distances", type=int, nargs="+", default=None, metavar="D", help="recall distances in tokens")
    em.add_argument("--trials", type=int, default=None, help="recall facts per distance and policy (default 32)")
    em.add_argument("--reference-tokens", type=int, default=None,
                    help="positions before 10x the window measured by the recompute(chunk=1) reference (default 1024)")
    em.add_argument("--seed", type=int, default=None, help="seed of the recall facts (default 0)")
    em.add_argument("--provider", default=None, help="ONNX Runtime provider: cpu, cuda (default: auto)")
    em.add_argument("--out", default=None, help="also keep memory_eval.json and the PNGs in this folder")
    _uri_arg(em)
    em.set_defaults(func=cmd_evaluate_memory)

    pr = rs.add_parser("promote", help="point an alias at a version, through the promotion gate")
    pr.add_argument("--name", required=True, help="registered model name")
    which = pr.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", default=None, help="version number to promote")
    which.add_argument("--from-alias", default=None, help="promote the version another alias points at (challenger)")
    pr.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    pr.add_argument("--tolerance", type=float, default=0.02,
                    help="champion gate: how much worse (relative) validation perplexity may be (default 0.02)")
    pr.add_argument("--force", action="store_true", help="override a refusal (needs --reason; recorded)")
    pr.add_argument("--reason", default=None, help="why --force overrides the gate (recorded as a tag)")
    _no_memory_gate_arg(pr)
    _uri_arg(pr)
    pr.set_defaults(func=cmd_promote)

    ls = rs.add_parser("list", help="versions, aliases, verification and metrics")
    ls.add_argument("--name", default=None, help="one registered model (default: all)")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    _uri_arg(ls)
    ls.set_defaults(func=cmd_list)


def _no_memory_gate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-memory-gate", dest="memory_gate", action="store_false",
                   help="champion gate: skip the memory evaluation check (sink perplexity past the window vs "
                        "recompute and vs the champion); warned and recorded in the promotion decision")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation perplexity, or (eval memory) quality and recall past the window",
                       description="Mean next-token loss over non-overlapping windows of DATA (a `ctxmem data "
                                   "prepare` folder: its validation split; or a text file). `ctxmem eval memory`: "
                                   "streaming perplexity per memory policy and recall by distance.")
    p.add_argument("--model", required=True, metavar="SPEC", help="checkpoint or export directory, runs:/, models:/")
    p.add_argument("--data", default=None, help="prepared data folder or text file (required for perplexity)")
    p.add_argument("--block", type=int, default=None, help="window length (default: the model's context)")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows (default: all)")
    p.add_argument("--provider", default=None, help="ONNX Runtime provider for exports: cpu, cuda (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _uri_arg(p)
    p.set_defaults(func=cmd_eval)
    add_memory_eval(p)  # `ctxmem eval memory` (export/eval_memory_cli.py)


# ---- handlers -------------------------------------------------------------------------------------
def _memory(args, ckpt):
    """The memory policy written to the runtime config: the checkpoint's saved one (its
    generation_config.json) with --policy/--window/--sinks/--chunk applied through the core's one
    override path (unset flags keep the saved values). None when no flag is given: export_onnx then
    writes the saved policy as it is.

    A checkpoint that saved `full` (the default: it keeps no window) given a window flag but no
    --policy gets the windowed policy these flags describe: sink where the model has rotary
    positions, else recompute - as `--window` has always meant for `ctxmem export`."""
    from ctxmem.checkpoint import CONFIG, CheckpointError, load_generation_defaults
    from ctxmem.config import ConfigError, ModelConfig
    from ctxmem.memory import MemoryConfig

    flags = dict(window=args.window, sinks=args.sinks, chunk=args.chunk, budget=args.budget, store=args.store)
    if args.policy is None and all(v is None for v in flags.values()):
        return None
    try:
        cfg = ModelConfig.load(ckpt / CONFIG)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    uses_rope = cfg.pos == "rope"
    saved = MemoryConfig(**load_generation_defaults(ckpt).get("memory", {}))
    policy = args.policy
    if policy is None and saved.policy == "full":
        policy = "sink" if uses_rope else "recompute"
    return saved.with_overrides(cfg.max_seq_len, uses_rope, policy=policy, **flags)


def cmd_export(args) -> int:
    from .errors import ModelSpecError
    from .onnx_export import export_onnx
    from .resolve import resolve_model
    from .runtime import RUNTIME_CONFIG
    from .verify import read_report, summarize

    ckpt = resolve_model(args.model, tracking_uri=args.tracking_uri)
    if (ckpt / RUNTIME_CONFIG).is_file():
        raise ModelSpecError(f"{args.model} is already an ONNX export; --model takes the checkpoint it came from")
    run_id = args.model[len("runs:/"):].split("/", 1)[0] if args.model.startswith("runs:/") else None
    try:
        out = export_onnx(ckpt, args.out, opset=args.opset, verify=args.verify, int8=args.int8, int4=args.int4,
                          fp16=args.fp16,
                          memory=_memory(args, ckpt), source_run_id=run_id, eval_data=args.eval_data,
                          verify_tokens=args.tokens)
    finally:
        report = read_report(args.out)
        if report:
            print(f"verification: {summarize(report)}", file=sys.stderr)
    print(out)
    return 0


def cmd_register(args) -> int:
    from .registry import promote, register_export

    result = register_export(args.export, args.name, tracking_uri=args.tracking_uri, checkpoint=args.checkpoint,
                             eval_data=args.eval_data, allow_unverified=args.allow_unverified,
                             description=args.description, reverify=args.reverify,
                             eval_windows=args.eval_windows)
    ppl = f", val_ppl {result['val_ppl']:.4f}" if result.get("val_ppl") is not None else ""
    print(f"registered {result['name']} version {result['version']} (verification {result['verification']}{ppl}; "
          f"run {result['run_id']})")
    if args.alias:
        record = promote(args.name, args.alias, version=result["version"], tracking_uri=args.tracking_uri,
                         memory_gate=args.memory_gate)
        print(f"{args.name}@{record['alias']} -> version {record['version']}")
    return 0


def cmd_promote(args) -> int:
    from .registry import promote

    record = promote(args.name, args.alias, version=args.version, from_alias=args.from_alias, force=args.force,
                     reason=args.reason, tolerance=args.tolerance, tracking_uri=args.tracking_uri,
                     memory_gate=args.memory_gate)
    forced = f" (forced: {record['reason']}; gate said: {'; '.join(record['gate'])})" if record["forced"] else ""
    previous = f" (was version {record['previous_version']})" if record["previous_version"] else ""
    skipped = " (memory gate skipped: --no-memory-gate)" if record.get("memory_gate", "").startswith("skipped") else ""
    print(f"{args.name}@{record['alias']} -> version {record['version']}{previous}{forced}{skipped}")
    return 0


def cmd_evaluate_memory(args) -> int:
    from .registry_memory import record_memory_eval

    result, summary = record_memory_eval(
        args.name, args.version, from_alias=args.from_alias, text=args.text, data=args.data, result_file=args.result,
        tracking_uri=args.tracking_uri, provider=args.provider, out=args.out, window=args.window, sinks=args.sinks,
        length=args.length, distances=args.distances, trials=args.trials, seed=args.seed,
        reference_tokens=args.reference_tokens)
    print(result.table())
    if summary["sink_ppl"] is not None and summary["recompute_ppl"] is not None:
        ratio = f"sink ppl beyond 10x the window {summary['sink_ppl']:.4f} = " \
                f"{summary['sink_ppl'] / summary['recompute_ppl']:.3f}x recompute(chunk=1); "
    else:
        ratio = "no sink/recompute perplexity beyond 10x the window (the champion gate will refuse it); "
    print(f"recorded on {args.name} version {summary['version']}: {ratio}text sha256 {summary['text_sha256'][:12]}; "
          f"run {summary['run_id']}")
    return 0


def cmd_list(args) -> int:
    from .registry import format_table, list_versions

    rows = list_versions(args.name, tracking_uri=args.tracking_uri)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(format_table(rows) if rows else "no registered models")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate

    result = evaluate(args.model, args.data, block=args.block, batch=args.batch, max_windows=args.max_windows,
                      provider=args.provider, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f}  perplexity {result.ppl:.4f}  ({result.tokens} tokens in {result.windows} "
              f"windows of {result.block}, {result.data})")
    return 0
