"""`ctxmem eval memory`: streaming perplexity and recall by distance of a checkpoint or an export
(ctxmem.memory_eval), printed as a table, saved as memory_eval.json + two PNGs with --out, and
logged to MLflow when a tracking URI is given (--tracking-uri or $MLFLOW_TRACKING_URI).

`ctxmem eval` keeps its meaning (validation perplexity, `what` defaults to `perplexity`); this
module adds the `what` positional and the memory options to that parser. Only argparse at import
time; torch, onnxruntime and mlflow load inside the handler.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("ctxmem.export")

EXPERIMENT = "ctxmem-eval"
MAX_EVAL_TOKENS = 1 << 22  # a prepared folder's validation split is read up to this many tokens


def add_memory_eval(parser: argparse.ArgumentParser) -> None:
    """Turn the `ctxmem eval` parser into `ctxmem eval [perplexity|memory]`."""
    parser.add_argument("what", nargs="?", choices=("perplexity", "memory"), default="perplexity",
                        help="perplexity: validation loss over windows (default); memory: streaming perplexity "
                             "past the window per memory policy and recall by distance")
    memory = parser.add_argument_group("memory (ctxmem eval memory)")
    memory.add_argument("--text", default=None, help="UTF-8 text file to evaluate on (or --data)")
    memory.add_argument("--window", type=int, default=None,
                        help="recent tokens every policy keeps (default: half the model's context)")
    memory.add_argument("--sinks", type=int, default=4, help="attention sinks of the sink policy (default 4)")
    memory.add_argument("--budget", type=int, default=32,
                        help="evicted tokens the retrieve policy puts back (default 32; 0 leaves retrieve out)")
    memory.add_argument("--length", type=int, default=None, help="stream tokens (default: 20x the window)")
    memory.add_argument("--distances", type=int, nargs="+", default=None, metavar="D",
                        help="recall distances in tokens (default: spread inside and beyond the window)")
    memory.add_argument("--trials", type=int, default=32, help="recall facts per distance and policy (default 32)")
    memory.add_argument("--reference-tokens", type=int, default=1024,
                        help="positions before 10x the window measured by the slow recompute(chunk=1) "
                             "reference, evenly spaced (default 1024); beyond 10x it measures every position")
    memory.add_argument("--seed", type=int, default=0, help="seed of the recall facts and filler (default 0)")
    memory.add_argument("--out", default=None, help="folder for memory_eval.json and the two PNGs")
    memory.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment of the run (default {EXPERIMENT}); a run is logged only "
                             "when --tracking-uri or $MLFLOW_TRACKING_URI is set")
    perplexity = parser.get_default("func")  # the existing `ctxmem eval` handler

    def dispatch(args: argparse.Namespace) -> int:
        if args.what == "memory":
            return cmd_eval_memory(args)
        if args.data is None:
            parser.error("the following arguments are required: --data")
        return perplexity(args)

    parser.set_defaults(func=dispatch)


def cmd_eval_memory(args: argparse.Namespace) -> int:
    from ctxmem.memory_eval import evaluate_memory
    from ctxmem.paths import TRACKING_URI_ENV

    from .errors import EvalError
    from .evaluate import open_backend

    if (args.text is None) == (args.data is None):
        raise EvalError("ctxmem eval memory needs exactly one of --text FILE or --data DIR")
    backend, tokenizer, kind = open_backend(args.model, args.provider, args.tracking_uri)
    tokens, sha, source = load_eval_tokens(args.text or args.data, tokenizer)
    result = evaluate_memory(backend, tokens, tokenizer, text_hash=sha, window=args.window, sinks=args.sinks,
                             length=args.length, distances=args.distances, trials=args.trials, seed=args.seed,
                             reference_tokens=args.reference_tokens, budget=args.budget)
    paths = result.save(args.out) if args.out else {}
    print(result.to_json() if args.json else result.table())
    for name, path in paths.items():
        log.info("wrote %s (%s)", path, name)
    uri = args.tracking_uri or os.environ.get(TRACKING_URI_ENV)  # set explicitly: no default store here
    if uri:
        params = {"model": args.model, "backend": kind, "source": source, "text_sha256": sha,
                  "window": result.window, "sinks": args.sinks, "length": result.length, "trials": args.trials,
                  "seed": args.seed, "reference_tokens": args.reference_tokens, "budget": args.budget}
        run_id = log_memory_eval(result, uri, args.experiment, params, paths)
        log.info("logged the memory evaluation to %s (run %s)", uri, run_id)
    return 0


def load_eval_tokens(source: str, tokenizer) -> tuple[Any, str, str]:
    """(token ids, sha256, description) of a text file (hash of its text) or of a prepared data
    folder's validation split (hash of its token ids, int64 little-endian)."""
    import hashlib

    import numpy as np

    from ctxmem.memory_eval import text_sha256

    from .errors import EvalError

    path = Path(source)
    if path.is_dir():
        from .evaluate import validation_split

        arrays = validation_split(path, 1).arrays
        tokens = np.concatenate([np.asarray(a[:MAX_EVAL_TOKENS], dtype=np.int64) for a in arrays])[:MAX_EVAL_TOKENS]
        digest = hashlib.sha256(tokens.astype("<i8").tobytes()).hexdigest()
        return tokens, digest, f"{path} (validation split, {len(tokens)} tokens)"
    if not path.is_file():
        raise EvalError(f"{path} does not exist; give a UTF-8 text file (--text) or a `ctxmem data prepare` "
                        "folder (--data)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{path} is not a readable UTF-8 text file ({err})") from None
    tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
    return tokens, text_sha256(text), f"{path} ({len(tokens)} tokens)"


def log_memory_eval(result, uri: str, experiment: str, params: dict[str, Any], paths: dict[str, Path]) -> str:
    """One MLflow run: params, the flat metrics, memory_eval.json and the PNGs. Returns its id."""
    import datetime as _dt

    from mlflow.entities import Metric, Param

    from ctxmem.paths import default_artifact_location

    from .store import mlflow_client

    with mlflow_client(uri) as client:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=default_artifact_location(uri))
        run = client.create_run(experiment_id, tags={"ctxmem.kind": "memory-eval",
                                                     "mlflow.runName": f"eval-memory-{Path(str(params['model'])).name}"})
        run_id = run.info.run_id
        try:
            now = int(_dt.datetime.now().timestamp() * 1000)
            client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                             metrics=[Metric(k, float(v), now, 0) for k, v in result.metrics().items()])
            with tempfile.TemporaryDirectory(prefix="ctxmem-memory-eval-") as tmp:
                files = paths or result.save(tmp)  # without --out, the files are written for MLflow only
                for path in files.values():
                    client.log_artifact(run_id, str(path), "memory_eval")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
    return run_id
