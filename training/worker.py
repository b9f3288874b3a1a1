"""Per-process entry point of the launchers (torchrun, DeepSpeed's runner): one rank of a run.

    python -m ctxmem.training.worker --config CONFIG.yaml [KEY=VALUE ...] [--resume [PATH]]

Run it yourself for a multi-node torchrun launch (see training/README.md); `ctxmem train` builds
this command line for --nproc and --hostfile.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctxmem.training.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--resume", nargs="?", const="auto", default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--launcher", default="torchrun")
    parser.add_argument("--resume-verified", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.append(args.resume)  # `--resume key=value`: the flag took an override as its PATH
        args.resume = "auto"
    if args.local_rank is not None:  # DeepSpeed's launcher passes it; the environment has it too
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from .config import TrainConfig
    from .trainer import train

    try:
        cfg = TrainConfig.load(args.config, args.overrides)
        result = train(cfg, args.resume, launcher=args.launcher, overwrite=args.overwrite,
                       resume_verified=args.resume_verified)
    except Exception as err:  # noqa: BLE001 - project errors: one line from rank 0, exit 1
        if not type(err).__module__.startswith("ctxmem"):
            raise
        if rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 1
    return result.exit_code


def _exit_now(code: int) -> None:
    """Leave without interpreter teardown. The run is finished and saved (checkpoints are written
    synchronously, the MLflow run is ended, the process group destroyed); what remains are C++
    destructors of native thread pools, and one of them aborted a finished rank under load
    ("terminate called without an active exception", exit -6), failing a run that had succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
