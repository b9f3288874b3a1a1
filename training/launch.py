"""Launchers: each starts `trainer.train` on every rank; none changes what a rank computes.

    in-process   `ctxmem train` with --nproc 1 (the default): this process is rank 0 of 1
    torchrun     `--nproc N`: N local processes started by torchrun (run in this process), on 127.0.0.1
    DeepSpeed    `--hostfile FILE`: DeepSpeed's multi-node launcher (pdsh/ssh) on the hosts of FILE
    Ray Train    `--ray --num-workers N [--use-gpu]`: `TorchTrainer` on a local or existing Ray cluster

Each process started by a launcher runs `python -m ctxmem.training.worker` with the same config
and overrides, so every rank resolves the same TrainConfig. (torchrun by hand works too, for
multi-node launches: see training/README.md.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from ctxmem.net import free_port, unreachable

from .config import TrainConfig
from .errors import TrainingError

WORKER = "ctxmem.training.worker"


def worker_args(config: str, overrides: list[str], resume: str | None, overwrite: bool, launcher: str) -> list[str]:
    args = ["--config", str(config), *overrides, "--launcher", launcher, "--resume-verified"]
    if resume:
        args += ["--resume", resume]
    if overwrite:
        args.append("--overwrite")
    return args


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # OpenMP threads that spin while they wait make CPU training crawl when cores are shared
    # (measured: 0.05 s -> 3 s per tiny step); passive waiting costs little on an idle machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run(cmd: list[str]) -> int:
    """Run a launcher (DeepSpeed's runner) in the foreground, in its own session so that a terminal's
    Ctrl-C reaches it once, through us."""
    proc = subprocess.Popen(cmd, env=_child_env(), start_new_session=True)

    def forward(signum, frame):
        proc.send_signal(signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# Seconds torchrun gives the ranks to finish after a signal or a failed rank, before SIGKILL: long
# enough for every rank to write its checkpoint partition (torchrun's own default is 30 s).
SHUTDOWN_GRACE_S = 120


def torchrun_args(nproc: int, args: list[str]) -> list[str]:
    """`torchrun` arguments for N ranks of the worker on this machine, rendezvous on loopback."""
    return ["--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.5",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--module", WORKER, *args]


def run_local(nproc: int, args: list[str]) -> int:
    """`--nproc N`: N ranks on this machine, started and watched by torchrun (`torch.distributed.run`,
    run in this process).

    torchrun starts each rank in its own session, so a terminal's Ctrl-C reaches this process only
    and torchrun passes it (or a SIGTERM) to every rank once: each rank finishes its step, saves a
    checkpoint and exits. If a rank fails, torchrun stops the others (SIGTERM, SIGKILL after
    SHUTDOWN_GRACE_S). Returns 128 + the signal after a signal, else the first failed rank's code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # torchrun hands its own environment to the ranks: these are set for the run and removed after it
    added = {key: value for key, value in (("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))),
                                           ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_S)))
             if key not in os.environ}
    os.environ.update(added)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # torchrun replaces them
    try:
        run(get_args_parser().parse_args(torchrun_args(nproc, args)))
        return 0
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode >= 0 else 128 - failure.exitcode  # -9: killed by SIGKILL
        print(f"rank {rank} exited with code {failure.exitcode}; torchrun stopped the other ranks",
              file=sys.stderr, flush=True)
        return code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for key in added:
            os.environ.pop(key, None)


def deepspeed_command(hostfile: str, args: list[str], launcher_args: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", hostfile, *(launcher_args or []),
            "--module", WORKER, *args]


def run_deepspeed(hostfile: str, args: list[str], launcher_args: list[str] | None = None) -> int:
    if not Path(hostfile).is_file():
        raise TrainingError(f"--hostfile {hostfile} does not exist (format: one 'HOSTNAME slots=N' line per node)")
    return _run(deepspeed_command(hostfile, args, launcher_args))


# ---- Ray Train -----------------------------------------------------------------------------------
_PROPAGATED_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "MLFLOW_TRACKING_URI", "OMP_WAIT_POLICY",
                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _ray_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the same `trainer.train`, in the group Ray created."""
    for key, value in loop_config["env"].items():
        os.environ.setdefault(key, value)
    import ray.train

    from .trainer import train

    ctx = ray.train.get_context()
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))

    def report(metrics: dict, final: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(final)) if final is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)  # every worker reports: it is a barrier

    cfg = TrainConfig.from_dict(loop_config["config"])
    train(cfg, loop_config["resume"], launcher="ray", overwrite=loop_config["overwrite"],
          resume_verified=True, report=report, progress=False)


def run_ray(cfg: TrainConfig, resume: str | None, num_workers: int, use_gpu: bool, overwrite: bool,
            address: str | None = None) -> dict[str, Any]:
    """Train with Ray Train's TorchTrainer; returns the metrics rank 0 reported."""
    # A local Ray instance listens on 127.0.0.1 only unless told otherwise.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = cfg.with_absolute_paths()  # Ray workers do not share this process's working directory
    from . import tracking

    if cfg.tracking.enabled:  # resolve the default store here: a worker's cwd is not ours
        cfg = cfg.replace(**{"tracking.uri": tracking.default_uri(cfg.tracking.uri)})
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            problem = unreachable(address)
            if problem:
                raise TrainingError(f"{problem}, or drop --ray-address and unset RAY_ADDRESS to train on a "
                                    "local Ray")
            ray.init(address=address)
        else:
            ray.init(address="local", include_dashboard=False, configure_logging=False)
        started = True
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"config": cfg.to_dict(), "resume": resume, "overwrite": overwrite,
                               "env": {k: os.environ[k] for k in _PROPAGATED_ENV if k in os.environ}},
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(name=f"ctxmem-{Path(cfg.out).name}", storage_path=str(Path(cfg.out) / "ray")),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray wraps worker errors; surface the user-facing one
            inner = _user_error(err)
            if inner is not None:
                raise TrainingError(str(inner)) from None
            raise
        return dict(result.metrics or {})
    finally:
        if started:
            ray.shutdown()


def _user_error(err: BaseException) -> BaseException | None:
    """The project error inside Ray's wrapping, if there is one."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if type(e).__module__.startswith("ctxmem"):
            return e
        stack.extend([e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
                     if isinstance(getattr(e, "worker_failures", None), dict) else [e.__cause__, e.__context__])
    text = str(err)
    for marker in ("TrainingError: ", "DataError: ", "ResumeError: ", "TrainConfigError: "):
        if marker in text:
            return TrainingError(text.split(marker, 1)[1].splitlines()[0])
    return None
