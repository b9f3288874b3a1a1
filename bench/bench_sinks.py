"""Attention sinks trained into the model, side by side: does a model stay good once its stream is
far longer than its window, and does it still recall what it read?

    .venv/bin/python bench/bench_sinks.py                  # train all six variants (~20 min each on 2 cores)
    .venv/bin/python bench/bench_sinks.py --set steps=150  # shorter trainings (config overrides for all)
    .venv/bin/python bench/bench_sinks.py --quick          # tiny model, a few steps: the whole path in minutes
    .venv/bin/python bench/bench_sinks.py --checkpoint token/document=runs/cpu-memory-token/final \\
        --variants token/document                          # measure checkpoints trained before
    .venv/bin/python bench/bench_sinks.py --reuse --results bench/results/sinks.txt   # re-measure, keep the table

Variants are SINK/SAMPLES: SINK is the model's trained-in sink (model.sink) - `none` (whatever
token starts a stream becomes the sink), `token` (a dedicated sink token starts every training
sample and every stream) or `learned` (a learned logit per head in the softmax denominator, so
attention may rest on nothing); SAMPLES is how training cuts samples from the token stream
(data.samples) - `crop` (windows wherever they fall) or `document` (each sample starts at a document
with BOS at position 0, as real LMs are trained). All variants train from the same config
(default infra/train-cpu-memory.yaml: the `small` preset, context 256, Python source with recall
documents mixed in) on the same prepared data (prepared first when the folder is missing), then
each final checkpoint is measured with ctxmem.memory_eval on the validation split - a document-
trained model's stream starts with BOS, as it was trained.

Columns (perplexities over the stream tokens beyond 10x the window, every policy on the same tokens):
    val ppl        the training run's validation perplexity (its own samples)
    recompute(1)   StreamingLLM's quality reference: each token predicted from a fresh prefill of the
                   window before it (sliding window with re-computation)
    sink(4)        4 attention sinks + the window, the serving policy; /rc = its ratio to recompute(1)
    window-only    the window alone (0 sinks); /rc likewise
    sink(1)        token models only: the sink token alone + the window; /rc likewise
    recall<=W      recall accuracy under sink(4), facts asked within the window (mean over distances)
    recall>W       the same beyond the window (the value has been evicted: expected near 0)
    full>W         recall with as much context as the model holds, facts beyond the window
Targets: sink(4)/rc <= 1.10 for every variant; sink(1)/rc <= 1.10 for `token`; window-only/rc <=
1.10 for `learned`; recall<=W >= 0.90. Each variant's full table, memory_eval.json and the two PNGs
are in OUT/VARIANT/memory_eval/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SINKS = ("none", "token", "learned")
SAMPLES = ("crop", "document")
ALL_VARIANTS = [f"{sink}/{samples}" for samples in SAMPLES for sink in SINKS]
TARGET = 1.10  # sink perplexity beyond 10x the window / recompute(chunk=1) on the same tokens
RECALL_TARGET = 0.90

# --quick: the tiny preset for a few steps on a small corpus; every number is meaningless, every path runs
QUICK_OVERRIDES = ["steps=3", "eval.interval=3", "eval.samples=8", "checkpoint.interval=3", "optim.warmup_steps=1"]
QUICK_MEMORY = dict(window=60, sinks=4, length=700, distances=[48, 96], trials=4, reference_tokens=32)


@dataclass
class Measured:
    variant: str
    checkpoint: Path
    val_ppl: float | None
    result: Any  # ctxmem.memory_eval.MemoryEvalResult


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="training config every variant starts from (default infra/train-cpu-memory.yaml; "
                        "--quick: infra/train-tiny.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every variant, as `ctxmem train` takes them (e.g. steps=100)")
    p.add_argument("--variants", nargs="+", default=ALL_VARIANTS, metavar="SINK/SAMPLES",
                   help=f"which to compare (default all six: {' '.join(ALL_VARIANTS)})")
    p.add_argument("--checkpoint", action="append", default=[], metavar="VARIANT=PATH",
                   help="measure this checkpoint for VARIANT instead of training it (repeatable)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the config's data.path)")
    p.add_argument("--corpus", default="stdlib recall:0.8",
                   help="corpora prepared into --data when it does not exist (default 'stdlib recall:0.8'; "
                        "--quick: 'chatterbot recall:0.2')")
    p.add_argument("--out", default=None, help="runs and results of each variant (default runs/bench-sinks[-quick])")
    p.add_argument("--reuse", action="store_true", help="measure OUT/VARIANT/final where it exists instead of training")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept (default: the config's eval.memory.window)")
    p.add_argument("--sinks", type=int, default=None, help="sinks of the sink policy (default: eval.memory.sinks)")
    p.add_argument("--length", type=int, default=None, help="stream tokens (default: eval.memory.length, else 20x the window)")
    p.add_argument("--trials", type=int, default=None, help="recall facts per distance and policy (default: eval.memory.trials)")
    p.add_argument("--results", default=None, help="also write the table (with this command line) to this file")
    p.add_argument("--quick", action="store_true", help="tiny preset, a few steps, small corpus: a smoke run")
    args = p.parse_args(argv)
    for v in args.variants:
        _split_variant(v, p)
    args.given = {}
    for item in args.checkpoint:
        variant, sep, path = item.partition("=")
        if not sep:
            p.error(f"--checkpoint {item!r}: expected VARIANT=PATH, e.g. token/document=runs/x/final")
        _split_variant(variant, p)
        args.given[variant] = Path(path)
    return args


def _split_variant(variant: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    sink, _, samples = variant.partition("/")
    if sink not in SINKS or samples not in SAMPLES:
        parser.error(f"variant {variant!r}: expected SINK/SAMPLES with SINK in {SINKS} and SAMPLES in {SAMPLES}")
    return sink, samples


def base_config(args: argparse.Namespace):
    from ctxmem.training.config import TrainConfig

    config = args.config or str(REPO / "infra" / ("train-tiny.yaml" if args.quick else "train-cpu-memory.yaml"))
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.set)
    return TrainConfig.load(config, overrides)


def ensure_data(path: Path, corpus: str):
    from ctxmem.training.data import TokenData, prepare

    if not (path / "meta.json").exists():
        print(f"preparing {corpus!r} into {path}", file=sys.stderr, flush=True)
        prepare(corpus.split(), path, progress=False)
    return TokenData(path)


def train_variant(cfg, variant: str, out: Path, data_path: Path, reuse: bool) -> tuple[Path, float | None]:
    """The final checkpoint of `variant` trained from `cfg`, and its validation perplexity."""
    from ctxmem.training.trainer import train

    final = out / variant.replace("/", "-") / "final"
    if reuse and final.exists():
        return final, _val_ppl(final)
    sink, samples = variant.split("/")
    run = cfg.replace(**{"model.sink": sink, "data.samples": samples, "data.path": str(data_path),
                         "out": str(final.parent), "eval.memory.enabled": False,
                         "tracking.run_name": f"bench-sinks-{sink}-{samples}"})
    print(f"training {variant} into {final.parent}", file=sys.stderr, flush=True)
    result = train(run, overwrite=True, progress=False)
    if result.status != "completed":
        raise SystemExit(f"training {variant} ended {result.status}; resume it or run again")
    return result.final, result.val_ppl


def _val_ppl(final: Path) -> float | None:
    run_file = final / "mlflow_run.json"
    return json.loads(run_file.read_text()).get("val_ppl") if run_file.exists() else None


def measure(cfg, variant: str, checkpoint: Path, data, settings: dict[str, Any], out: Path):
    """memory_eval of one checkpoint on the validation stream (BOS first for document samples), plus
    sink(1) for a token model (its sink token alone + the window)."""
    from ctxmem.backend import TorchBackend
    from ctxmem.checkpoint import load_model
    from ctxmem.memory_eval import PolicyRun, evaluate_memory, perplexity_records, streaming_nll
    from ctxmem.training.final_memory_eval import eval_tokens

    sink, samples = variant.split("/")
    model = load_model(checkpoint)
    if model.cfg.sink != sink:
        raise SystemExit(f"--checkpoint {variant}={checkpoint}: that model has sink={model.cfg.sink!r}, not {sink!r}")
    tokenizer = data.tokenizer()
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise SystemExit(f"{checkpoint}: its vocabulary ({model.cfg.vocab_size}) does not hold the data's tokenizer "
                         f"({tokenizer.vocab_size} ids); measure it on the data it was trained on (--data)")
    tokens = eval_tokens(cfg.replace(**{"data.samples": samples}), data)
    digest = hashlib.sha256(tokens.astype("<i8").tobytes()).hexdigest()
    backend = TorchBackend(model, "cpu")
    print(f"measuring {variant} ({checkpoint})", file=sys.stderr, flush=True)
    result = evaluate_memory(backend, tokens, tokenizer, text_hash=digest, window=settings["window"],
                             sinks=settings["sinks"], length=settings["length"], distances=settings["distances"],
                             trials=settings["trials"], reference_tokens=settings["reference_tokens"], seed=cfg.seed)
    if sink == "token" and settings["sinks"] != 1:
        run = PolicyRun("sink", 1, result.window)
        nll = streaming_nll(backend, tokens[: result.length], run, piece=result.window)
        result.streaming.extend(perplexity_records(nll, run, result.window))
    result.save(out / variant.replace("/", "-") / "memory_eval")
    return result


def memory_settings(cfg, args: argparse.Namespace) -> dict[str, Any]:
    m = cfg.eval.memory
    settings = dict(window=m.window, sinks=m.sinks, length=m.length, distances=m.distances, trials=m.trials,
                    reference_tokens=m.reference_tokens)
    if args.quick:
        settings.update(QUICK_MEMORY)
    for key in ("window", "sinks", "length", "trials"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["window"] is None:
        settings["window"] = cfg.model.build(256).max_seq_len // 2
    return settings


# ---- the table ------------------------------------------------------------------------------------
def _beyond(result, policy: str, sinks: int = 0, chunk: int | None = None) -> float | None:
    record = result.beyond(policy, sinks, chunk)
    return record["ppl"] if record else None


def _recall(result, policy: str, sinks: int, inside: bool) -> float | None:
    window = result.window
    values = [r["accuracy"] for r in result.recall if r["policy"] == policy and r["sinks"] == sinks
              and (r["distance"] <= window) == inside]
    return sum(values) / len(values) if values else None


def row(m: Measured, sinks: int) -> dict[str, Any]:
    r = m.result
    rc = _beyond(r, "recompute", 0, 1)
    ratio = lambda x: None if x is None or not rc else x / rc  # noqa: E731
    s4, wo = _beyond(r, "sink", sinks), _beyond(r, "sink", 0)
    s1 = _beyond(r, "sink", 1) if m.variant.startswith("token/") else None
    return {"variant": m.variant, "val_ppl": m.val_ppl, "recompute": rc, "sink": s4, "sink_rc": ratio(s4),
            "window_only": wo, "window_only_rc": ratio(wo), "sink1": s1, "sink1_rc": ratio(s1),
            "recall_in": _recall(r, "sink", sinks, True), "recall_out": _recall(r, "sink", sinks, False),
            "full_out": _recall(r, "full", 0, False)}


def _cell(value, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _verdict(row: dict[str, Any], sinks: int) -> str:
    """Which targets hold, per the variant's kind: sink(S) always; token: sink(1); learned: window-only."""
    checks = [(f"sink({sinks})", row["sink_rc"])]
    if row["variant"].startswith("token/"):
        checks.append(("sink(1)", row["sink1_rc"]))
    if row["variant"].startswith("learned/"):
        checks.append(("window-only", row["window_only_rc"]))
    parts = [f"{name} {'ok' if value is not None and value <= TARGET else 'MISSED'}" for name, value in checks]
    if row["recall_in"] is not None:
        parts.append(f"recall {'ok' if row['recall_in'] >= RECALL_TARGET else 'MISSED'}")
    return ", ".join(parts)


def table(measured: list[Measured], settings: dict[str, Any], header: str) -> str:
    sinks = settings["sinks"]
    rows = [row(m, sinks) for m in measured]
    first = measured[0].result
    lines = [header,
             f"perplexity over stream tokens [{10 * first.window}, {first.length}) - beyond 10x the window of "
             f"{first.window}; /rc = ratio to recompute(chunk=1) on the same tokens (target <= {TARGET:.2f})",
             f"recall: accuracy under sink({sinks}), facts asked within / beyond the window; full>W: the model's "
             f"whole context (target recall<=W >= {RECALL_TARGET:.2f})", ""]
    head = (f"{'variant':<18} {'val ppl':>8} {'recompute(1)':>12} {f'sink({sinks})':>8} {'/rc':>6} "
            f"{'window-only':>11} {'/rc':>6} {'sink(1)':>8} {'/rc':>6} {'recall<=W':>9} {'recall>W':>8} "
            f"{'full>W':>7}  targets")
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<18} {_cell(r['val_ppl'], 8)} {_cell(r['recompute'], 12)} {_cell(r['sink'], 8)} "
                     f"{_cell(r['sink_rc'], 6)} {_cell(r['window_only'], 11)} {_cell(r['window_only_rc'], 6)} "
                     f"{_cell(r['sink1'], 8)} {_cell(r['sink1_rc'], 6)} {_cell(r['recall_in'], 9, 2)} "
                     f"{_cell(r['recall_out'], 8, 2)} {_cell(r['full_out'], 7, 2)}  {_verdict(r, sinks)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: spinning threads crawl on shared cores
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")  # progress on stderr
    cfg = base_config(args)
    out = Path(args.out or ("runs/bench-sinks-quick" if args.quick else "runs/bench-sinks"))
    data_path = Path(args.data) if args.data else (out / "data" if args.quick else Path(cfg.data.path))
    corpus = "chatterbot recall:0.2" if args.quick and args.corpus == "stdlib recall:0.8" else args.corpus
    data = ensure_data(data_path, corpus)
    settings = memory_settings(cfg, args)
    started = time.time()
    measured = []
    for variant in args.variants:
        if variant in args.given:
            checkpoint, val_ppl = args.given[variant], _val_ppl(args.given[variant])
        else:
            checkpoint, val_ppl = train_variant(cfg, variant, out, data_path, args.reuse)
        measured.append(Measured(variant, checkpoint, val_ppl, measure(cfg, variant, checkpoint, data, settings, out)))
    command = "bench/bench_sinks.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    header = (f"$ {command.strip()}\n"
              f"config {cfg.model.preset} preset, context {cfg.model.build(data.vocab_size).max_seq_len}, "
              f"{cfg.steps} steps of {cfg.batch.global_batch} x {cfg.seq_len} tokens; data {data_path} "
              f"({', '.join(c['spec'] for c in data.meta.get('corpora', []))}); "
              f"{time.time() - started:.0f} s for this run")
    text = table(measured, settings, header)
    print(text)
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
