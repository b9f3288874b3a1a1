"""`ctxmem` command line: one tool, one subcommand per stage.

Each stage package registers its own subcommands through `register(subparsers)` and imports its
heavy dependencies (deepspeed, onnxruntime, ray, mlflow) only when its command runs, so
`ctxmem --help` stays fast and the core never loads them.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, what it adds) - kept in one list so `ctxmem --help` and the tests agree.
STAGES = (
    ("ctxmem.core_cli", "generate, info, import-hf, export-hf"),
    ("ctxmem.training.cli", "data, train"),
    ("ctxmem.export.cli", "export, registry, eval"),
    ("ctxmem.serving.cli", "serve"),
    ("ctxmem.serving.demo", "demo"),
)


class CLIError(Exception):
    """An error whose message is the whole story for the user (no traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctxmem",
        description="Language models with contextual memory: train (DeepSpeed), export (ONNX), "
                    "register (MLflow), serve (Ray Serve) - with attention-sink KV windows throughout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `ctxmem COMMAND --help` for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, _ in STAGES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # a stage whose optional extras are not installed (or not built yet) adds no commands
            if err.name and err.name.startswith("ctxmem") and err.name != module_name:
                raise
            logging.getLogger("ctxmem.cli").debug("stage %s unavailable: %s", module_name, err)
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - typed project errors become one clear line
        if args.verbose or not _is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def _is_user_error(err: Exception) -> bool:
    """Project errors (config, checkpoint, context, export, registry) are shown without traceback."""
    if isinstance(err, (CLIError, FileNotFoundError)):
        return True
    return type(err).__module__.startswith("ctxmem")


if __name__ == "__main__":
    sys.exit(main())
