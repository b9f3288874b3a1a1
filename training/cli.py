"""`ctxmem data prepare` and `ctxmem train`. Heavy libraries load inside the handlers only."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import TrainingError

TRAIN_EPILOG = """\
overrides: KEY=VALUE pairs with dotted keys into the config, e.g.
  steps=200 zero.stage=3 zero.offload_optimizer=true optim.lr=3e-4 out=runs/exp1

examples:
  ctxmem data prepare --corpus chatterbot --tokenizer byte --out data/chat
  ctxmem train --config infra/train-cpu-demo.yaml
  ctxmem train --config infra/train-tiny.yaml --nproc 2 zero.stage=3
  ctxmem train --config runs/demo/config.yaml --resume
  ctxmem train --config runs/demo/config.yaml --resume --nproc 2     (continue on another number of ranks)
  ctxmem train --config infra/train-gpu-124m.yaml --hostfile infra/hostfile.example
  ctxmem train --config infra/train-ray-cpu.yaml --ray --num-workers 2
  ctxmem train --sync-mlflow runs/demo --tracking-uri http://mlflow:5000
"""


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="prepare tokenised training data",
                                 description="Tokenise corpora into memory-mapped shards with a train/validation split.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    prep = data_sub.add_parser(
        "prepare", help="tokenise corpora into shards + tokenizer.json",
        description="Read corpora (embedded names or paths), train or pick a tokenizer, and write "
                    "train/validation token shards, meta.json and tokenizer.json to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="corpora: chatterbot (English dialogues, the default), chatterbot:LANG[,LANG] or chatterbot:all, "
               "stdlib (Python's standard library sources), recall[:FRACTION|:N] (synthetic key-value recall "
               "documents: FRACTION of the mix, default 0.1, or N documents alone), "
               "or paths to .txt/.md/.py files, .jsonl files "
               "({\"text\": ...} or {\"messages\": [...]} per line), chatterbot-style .yml, or folders of them.")
    prep.add_argument("--corpus", nargs="+", default=None, metavar="NAME_OR_PATH",
                      help="corpora to read (default: chatterbot)")
    prep.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                      help="byte: fixed 263-id byte tokenizer; bpe: train a byte-level BPE (default: byte)")
    prep.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of text held out (default 0.05)")
    prep.add_argument("--seed", type=int, default=0, help="document shuffle seed (default 0)")
    prep.add_argument("--out", required=True, help="folder to write (replaced only if it is a prepared folder)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.set_defaults(func=_cmd_prepare)
    data.set_defaults(func=lambda args: _missing_subcommand(data))

    train = subparsers.add_parser(
        "train", help="train with DeepSpeed (ZeRO 0-3, offload) on CPU or GPU; torchrun, multi-node or Ray",
        description="Train a ctxmem model from a training config (infra/*.yaml). Writes DeepSpeed checkpoints, "
                    "a consolidated ctxmem checkpoint in OUT/final, metrics, and an MLflow run.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    train.add_argument("--config", help="training config YAML (see infra/)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                       help="continue from the newest checkpoint in OUT, or from PATH (a checkpoint or run folder); "
                            "a checkpoint of another number of ranks is resharded")
    train.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds checkpoints")
    where = train.add_mutually_exclusive_group()
    where.add_argument("--nproc", type=int, default=1, help="local rank processes, started by torchrun (default 1: this process)")
    where.add_argument("--hostfile", help="multi-node: DeepSpeed launcher over the hosts of this file")
    where.add_argument("--ray", action="store_true", help="run on Ray Train (TorchTrainer)")
    train.add_argument("--launcher-args", default="", help="extra DeepSpeed launcher options with --hostfile, quoted")
    train.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default 2)")
    train.add_argument("--use-gpu", action="store_true", help="one GPU per Ray worker")
    train.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    train.add_argument("--sync-mlflow", metavar="OUT", default=None,
                       help="replay OUT's MLflow journal (records kept while the server was unreachable)")
    train.add_argument("--tracking-uri", default=None, help="with --sync-mlflow: the store to send to")
    train.set_defaults(func=_cmd_train)


def _missing_subcommand(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    result = prepare(args.corpus or [], args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     val_fraction=args.val_fraction, seed=args.seed, progress=not args.no_progress)
    print(result.summary())
    return 0


def _hostfile_slots(path: str) -> int:
    slots = 0
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
        try:
            slots += int(parts.get("slots", "1"))
        except ValueError:
            raise TrainingError(f"--hostfile {path}: bad line {line!r} (expected 'HOSTNAME slots=N')") from None
    return slots


def _cmd_train(args: argparse.Namespace) -> int:
    # Before torch loads: OpenMP threads that spin while waiting crawl on shared cores.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray stays on 127.0.0.1
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume key=value`: the flag took an override as its PATH
        args.resume = "auto"
    if args.sync_mlflow:
        from .tracking import sync

        run_id = sync(Path(args.sync_mlflow), args.tracking_uri)
        print(f"MLflow run {run_id}: journal of {args.sync_mlflow} replayed")
        return 0
    if not args.config:
        raise TrainingError("ctxmem train needs --config CONFIG.yaml (shipped configs: infra/train-*.yaml)")
    from .config import TrainConfig
    from .trainer import preflight

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.nproc < 1 or args.num_workers < 1:
        raise TrainingError("--nproc and --num-workers must be >= 1")
    if args.ray:
        world = args.num_workers
    elif args.hostfile:
        if not Path(args.hostfile).is_file():
            raise TrainingError(f"--hostfile {args.hostfile} does not exist")
        world = _hostfile_slots(args.hostfile)
    else:
        world = args.nproc
    # refuse bad input before anything starts or is written (devices are checked where the ranks run)
    preflight(cfg, world, args.resume, args.overwrite, check_device=not (args.ray or args.hostfile))

    if args.ray:
        from .launch import run_ray

        metrics = run_ray(cfg, args.resume, args.num_workers, args.use_gpu, args.overwrite, args.ray_address)
        print(json.dumps(metrics, default=str))
        return 0 if metrics.get("status") == "completed" else 130
    from .launch import run_deepspeed, run_local, worker_args

    if args.hostfile:
        wargs = worker_args(args.config, args.overrides, args.resume, args.overwrite, "deepspeed")
        return run_deepspeed(args.hostfile, wargs, args.launcher_args.split())
    if args.nproc > 1:
        return run_local(args.nproc, worker_args(args.config, args.overrides, args.resume, args.overwrite, "local"))
    from .trainer import train

    result = train(cfg, args.resume, launcher="local", overwrite=args.overwrite, resume_verified=True)
    return result.exit_code
