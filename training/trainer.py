"""The training function: one code path for one process, torchrun ranks, DeepSpeed's multi-node
launcher and Ray Train workers. It reads its rank from the environment (or from an existing
torch.distributed group, as Ray Train creates) and applies DeepSpeed from outside the model.

Per optimizer step s (0-based) on W ranks with A micro-steps each:
    rank r, micro-step m reads its windows from data.BatchPlan (independent of W)
    loss  = mean cross-entropy over its micro-batch; engine.backward scales it by 1/A and
            DeepSpeed averages gradients over ranks, so the update is that of the global mean loss
    one all-reduce carries [sum of micro losses, stop requested] to every rank: the logged loss is
    the global-batch mean and every rank agrees on when to stop after a signal
Dropout randomness is seeded per micro-batch from (seed, step, micro_step * W + rank), the slot
BatchPlan fills with the same windows at every world size: each micro-batch draws its own masks, a
resumed run draws what an uninterrupted one would without saving RNG states, and N ranks draw what
one process draws for the same windows. The learning rate is torch's LambdaLR over
`OptimSection.lr_at`, stepped by DeepSpeed at each optimizer step; the logged lr is the one it set.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ctxmem.net import free_port

from . import checkpoints as ckpt
from .config import TrainConfig
from .errors import TrainingError

log = logging.getLogger("ctxmem.training")

FINAL = "final"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


@dataclass
class TrainResult:
    status: str  # "completed" or "interrupted"
    step: int
    out: Path
    final: Path | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    mlflow: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    consolidated_max_abs_diff: float | None = None
    memory_eval: dict[str, Any] | None = None  # eval.memory: {"json", "metrics"} or {"error"}


# ---- environment ---------------------------------------------------------------------------------
def dropout_seed(seed: int, step: int, slot: int) -> int:
    """The torch seed for the dropout of micro-batch `slot` (= micro_step * world + rank) of optimizer
    step `step`: distinct for every (seed, step, slot), the same on every machine and world size."""
    digest = hashlib.blake2b(f"{seed}/{step}/{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextlib.contextmanager
def process_environment(single: bool):
    """Env for DeepSpeed: the CPU accelerator when there is no GPU, and, for a single process
    started without a launcher, RANK/WORLD_SIZE/MASTER_* on loopback (else DeepSpeed looks for MPI).
    What this sets is removed again afterwards, so runs can follow each other in one process."""
    import torch

    added: list[str] = []

    def put(key: str, value: str) -> None:
        if key not in os.environ:
            os.environ[key] = value
            added.append(key)
    if not torch.cuda.is_available():
        put("DS_ACCELERATOR", "cpu")
    if single:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
            put(key, value)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class StopSignal:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, exit. A second signal aborts."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Ray Train runs the loop in a thread; Ray handles its own shutdown
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        if os.environ.get("RANK", "0") == "0":
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                  "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()


# ---- checks that need no DeepSpeed ----------------------------------------------------------------
def preflight(cfg: TrainConfig, world_size: int, resume: str | None, overwrite: bool = False,
              check_hashes: bool = True, check_device: bool = True) -> ckpt.ResumePoint | None:
    """Everything that can be refused before any process starts or any file is written.
    `check_device=False` where the launching machine is not where ranks run (Ray head, login node)."""
    from .data import TokenData

    cfg.accumulation(world_size)
    if check_device:
        cfg.runtime(_cuda_available(cfg), True)
    data = TokenData(cfg.data.path)
    training_splits(cfg, data)
    if cfg.eval.memory.enabled:
        from .final_memory_eval import check_memory_eval

        check_memory_eval(cfg, data)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out={out} is a file; give a folder")
    point = None
    if resume:
        root, tag = ckpt.locate(resume, out)
        point = ckpt.verify(root, tag, check_hashes=check_hashes)
        model_cfg = model_config(cfg, data)
        ckpt.check_compatible(point, zero_stage=cfg.zero.stage,
                              model_config=model_cfg.to_dict(), global_batch=cfg.batch.global_batch,
                              seq_len=cfg.seq_len, seed=cfg.seed)
        if point.step >= cfg.steps:
            raise TrainingError(f"--resume: {point.folder} is at step {point.step}, the config ends at steps="
                                f"{cfg.steps}; raise steps= to train further")
    elif ckpt.existing_checkpoints(out) and not overwrite:
        tags = ckpt.existing_checkpoints(out)
        raise TrainingError(f"{out} already holds checkpoints (newest {tags[-1]}); continue that run with "
                            f"--resume, start over with --overwrite, or choose another out=")
    return point


def model_config(cfg: TrainConfig, data):
    """The ModelConfig this run trains: the model section for the data's tokenizer, and - for
    data.samples=document, whose every sample starts with BOS - that BOS id, so inference starts
    every stream with it too (ModelConfig.stream_prefix)."""
    model_cfg = cfg.model.build(data.vocab_size)
    if cfg.data.samples == "document" and data.tokenizer().bos_id is not None:
        model_cfg = model_cfg.replace(bos_token_id=int(data.tokenizer().bos_id))
    return model_cfg


def training_splits(cfg: TrainConfig, data) -> tuple[Any, Any]:
    """(train, val) Splits as the config samples them: data.samples, and the model's sink token
    (sink=token) in front of every sample. The validation split is cut the same way, so the two
    losses compare."""
    from .data import sample_prefix

    model_cfg = model_config(cfg, data)
    prefix = sample_prefix(cfg.data.samples, model_cfg.sink_token_id, data.tokenizer().bos_id)
    return tuple(data.split(name, cfg.seq_len, prefix, cfg.data.samples) for name in ("train", "val"))


def _cuda_available(cfg: TrainConfig) -> bool:
    import torch

    return cfg.device != "cpu" and torch.cuda.is_available()


# ---- the training function -------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: str | None = None, *, launcher: str = "local", overwrite: bool = False,
          resume_verified: bool = False, report: Callable[[dict, Path | None], None] | None = None,
          progress: bool | None = None) -> TrainResult:
    """Run (or continue) training on this process's rank. Every rank calls it."""
    import torch

    # DeepSpeed 0.19 calls a collective torch 2.13 deprecated, once per step: not the user's concern.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated", category=FutureWarning)
    single = "RANK" not in os.environ and not _dist_ready()
    with process_environment(single):
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        rank_env = int(os.environ.get("RANK", "0"))
        # Refuse bad input before DeepSpeed starts: only rank 0 hashes the checkpoint files.
        point = preflight(cfg, world_env, resume, overwrite, check_hashes=rank_env == 0 and not resume_verified)
        import deepspeed

        device_kind = "cuda" if _cuda_available(cfg) else "cpu"
        if device_kind == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        owns_group = not torch.distributed.is_initialized()
        deepspeed.init_distributed(dist_backend="nccl" if device_kind == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
        try:
            return _Run(cfg, point, launcher, report, progress).run()
        finally:
            if owns_group and torch.distributed.is_initialized():
                import deepspeed.comm

                deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups


def _dist_ready() -> bool:
    try:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized()
    except ImportError:
        return False


class _Run:
    def __init__(self, cfg: TrainConfig, point: ckpt.ResumePoint | None, launcher: str,
                 report: Callable | None, progress: bool | None):
        import torch
        import torch.distributed as dist

        from .data import BatchPlan, TokenData

        self.cfg, self.point, self.launcher, self.report = cfg, point, launcher, report
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.out = Path(cfg.out)
        self.device_kind = "cuda" if _cuda_available(cfg) else "cpu"
        bf16_ok = self.device_kind == "cuda" and torch.cuda.is_bf16_supported()
        self.device_kind, self.precision = cfg.runtime(self.device_kind == "cuda", bf16_ok)
        self.accum = cfg.accumulation(self.world)
        self.data = TokenData(cfg.data.path)
        self.tokenizer = self.data.tokenizer()
        self.seq_len = cfg.seq_len
        self.train_split, self.val_split = training_splits(cfg, self.data)
        self.plan = BatchPlan(self.train_split.n_windows, cfg.batch.global_batch, cfg.seed)
        self.model_cfg = model_config(cfg, self.data)
        self.progress = progress
        # A checkpoint of another world size: stage 0 holds the whole model and optimizer on every
        # rank and loads as it is; ZeRO-1/2/3 partitions are resharded through a universal checkpoint.
        self.reshard = (point is not None and point.state.get("world_size") != self.world
                        and cfg.zero.stage >= 1)
        self.stop = StopSignal()
        self.tracker = None
        self.last_eval: dict[str, float] = {}

    # -- set-up --
    def _engine(self):
        import deepspeed
        import torch

        from ctxmem.model import Transformer

        from .zero import build_ds_config

        torch.manual_seed(self.cfg.seed)  # the same initial weights on every rank and world size
        model = Transformer(self.model_cfg)
        model.checkpoint_blocks = self.cfg.activation_checkpointing
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on norm gains (and biases)
        groups = [{"params": decay, "weight_decay": self.cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self.n_params = sum(p.numel() for p in decay + no_decay)
        ds_config = build_ds_config(self.cfg, self.world, self.device_kind, self.precision, load_universal=self.reshard)
        optim, total = self.cfg.optim, self.cfg.steps

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: optim.lr_at(s, total) / optim.lr)
        # DeepSpeed builds the scheduler on its optimizer and steps it once per optimizer step
        engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config,
                                                       lr_scheduler=schedule, dist_init_required=False)
        return engine, scheduler, ds_config

    def _start_tracking(self, ds_config: dict) -> None:
        from . import tracking

        t = self.cfg.tracking
        if self.rank != 0 or not t.enabled:
            return
        uri = tracking.default_uri(t.uri)
        params = tracking.flatten(self.cfg.to_dict())
        params.update(tracking.flatten(self.model_cfg.to_dict(), "model_config."))
        params.update({"world_size": str(self.world), "batch.grad_accum_resolved": str(self.accum),
                       "seq_len_resolved": str(self.seq_len), "n_params": str(self.n_params),
                       "precision_resolved": self.precision, "device_resolved": self.device_kind,
                       "data.vocab_size": str(self.data.vocab_size),
                       "data.train_tokens": str(self.train_split.tokens)})
        tags = {**tracking.git_tags(), "world_size": str(self.world), "zero_stage": str(self.cfg.zero.stage),
                "device": self.device_kind, "precision": self.precision, "launcher": self.launcher,
                "offload": str(self.cfg.zero.offload_optimizer or self.cfg.zero.offload_params).lower(),
                "out": str(self.out.resolve())}
        resume_id = (self.point.state.get("mlflow_run_id") if self.point else None)
        self.tracker = tracking.Tracker(uri, t.experiment, self.out, run_name=t.run_name or self.out.name,
                                        params=params, tags=tags, resume_run_id=resume_id)
        if self.tracker.run_id:
            print(f"MLflow run {self.tracker.run_id} at {uri}", file=sys.stderr, flush=True)

    # -- the loop --
    def run(self) -> TrainResult:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        from .data import IGNORE

        engine, scheduler, ds_config = self._engine()
        self.engine = engine
        start = 0
        if self.point is not None:
            self._load(engine)
            start = self.point.step
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.save(self.out / "config.yaml")
            self._trim_metrics(start)
        self._start_tracking(ds_config)
        if self.rank == 0:
            print(f"training {self.model_cfg.preset} ({self.n_params:,} parameters) for {self.cfg.steps} steps "
                  f"on {self.world} {self.device_kind} rank(s), ZeRO-{self.cfg.zero.stage}, {self.precision}, "
                  f"global batch {self.cfg.batch.global_batch} = {self.cfg.batch.micro_batch} x {self.world} ranks x "
                  f"{self.accum} accumulation, {self.seq_len} tokens/sequence"
                  + (f"; resuming after step {start}" if start else "")
                  + (f" (resharded from {self.point.state.get('world_size')} rank(s) through a DeepSpeed universal "
                     "checkpoint)" if self.reshard else ""), file=sys.stderr, flush=True)
        self.stop.install()
        tokens_per_step = self.cfg.batch.global_batch * self.seq_len
        bar = self._bar(start)
        metrics_file = open(self.out / METRICS, "a") if self.rank == 0 else None
        done, status, last_saved = start, "completed", start if self.point else -1
        try:
            engine.train()
            for step in range(start, self.cfg.steps):
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), dtype=torch.float64)
                lr = scheduler.get_last_lr()[0]  # what this step's update uses (restored on resume)
                for m in range(self.accum):
                    torch.manual_seed(dropout_seed(self.cfg.seed, step, m * self.world + self.rank))
                    idx = self.plan.micro_indices(step, m, self.rank, self.world, self.cfg.batch.micro_batch)
                    x, y = self.train_split.batch(idx)
                    x, y = x.to(engine.device), y.to(engine.device)
                    logits = engine(x)  # (b, T, V)
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                                           ignore_index=IGNORE)  # targets of a sample's fixed prefix skipped
                    engine.backward(loss)
                    engine.step()  # the optimizer steps at the last micro-step only
                    loss_sum += loss.detach().double().cpu()
                stats = torch.stack([loss_sum, torch.tensor(float(self.stop.signum is not None), dtype=torch.float64)])
                stats = stats.to(engine.device)
                dist.all_reduce(stats)  # one collective: global mean loss, and whether anyone must stop
                loss_value = stats[0].item() / (self.accum * self.world)
                dt = time.perf_counter() - t0
                done = step + 1
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                row = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": tokens_per_step / dt, "step_time": dt,
                       "epoch": self.plan.epoch_of(done)}
                if self.rank == 0:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    if self.tracker:
                        self.tracker.log_metrics({k: row[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s")}, done)
                        if done % self.cfg.log_interval == 0:
                            self.tracker.flush()
                    self._progress(bar, row, done)
                if not math.isfinite(loss_value):
                    raise TrainingError(f"loss became {loss_value} at step {done}; lower optim.lr or use fp32")
                stopping = stats[1].item() > 0
                if done % self.cfg.eval.interval == 0 or done == self.cfg.steps:
                    self._evaluate(done, metrics_file)
                if stopping or done % self.cfg.checkpoint.interval == 0 or done == self.cfg.steps:
                    self._save(done)
                    last_saved = done
                if stopping:
                    status = "interrupted"
                    break
        except BaseException as err:
            if self.tracker:  # the run record says how it ended; the error itself propagates
                self.tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self.stop.restore()
            if bar is not None:
                bar.close()
            if metrics_file is not None:
                metrics_file.close()
        if status == "completed":
            if last_saved != done:
                self._save(done)
            return self._finish(done)
        return self._interrupted(done)

    def _load(self, engine) -> None:
        """DeepSpeed loads the verified checkpoint (weights, optimizer, lr schedule); one written on
        another number of ranks is first converted to a universal checkpoint by rank 0, in
        OUT/checkpoints/universal/, which is removed once every rank has loaded it."""
        import torch
        import torch.distributed as dist

        point = self.point
        if self.reshard:
            dest = self.out / ckpt.CHECKPOINTS / ckpt.UNIVERSAL
            failed = None
            if self.rank == 0:
                try:
                    ckpt.to_universal(point, dest)
                except ckpt.ResumeError as err:
                    failed = err
            flag = [failed is None]
            dist.broadcast_object_list(flag, src=0)  # every rank stops if rank 0 could not convert
            if failed is not None:
                raise failed
            if not flag[0]:
                raise TrainingError(f"--resume: rank 0 could not reshard {point.folder} (its error says why)")
            point = ckpt.ResumePoint(dest, point.tag, point.state)
        stage3_universal = self.reshard and self.cfg.zero.stage == 3
        decays = [g["weight_decay"] for g in engine.optimizer.optimizer.param_groups] if stage3_universal else []
        try:
            path, _ = engine.load_checkpoint(str(point.root), tag=point.tag,
                                             load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises many kinds; one clear message
            raise TrainingError(f"--resume: DeepSpeed could not load {point.folder} "
                                f"({type(err).__name__}: {err})") from None
        if path is None:
            raise TrainingError(f"--resume: DeepSpeed found no checkpoint in {point.folder}")
        # Two slips of DeepSpeed 0.19's ZeRO-3 universal loader, undone here: it copies param group 0's
        # hyperparameters onto every group (weight decay on the norm gains), and it hands every
        # partition the same `step` tensor, which AdamW increments in place once per partition per
        # step (the norm gains' bias correction would run ahead: 6e-3 off in loss 3 steps later).
        if stage3_universal:
            for group, decay in zip(engine.optimizer.optimizer.param_groups, decays):
                group["weight_decay"] = decay
            for state in engine.optimizer.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
        if self.reshard:
            dist.barrier()  # every rank has read the universal copy
            if self.rank == 0:
                import shutil

                shutil.rmtree(point.root, ignore_errors=True)

    def _bar(self, start: int):
        if self.rank != 0 or self.progress is False:
            return None
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        if self.progress is None and not tty:
            return None
        return tqdm(total=self.cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.5 if tty else 10.0)

    def _progress(self, bar, row: dict, done: int) -> None:
        text = f"loss={row['loss']:.4f} tok/s={row['tokens_per_s']:,.0f} lr={row['lr']:.2e}"
        if bar is not None:
            bar.set_postfix_str(text, refresh=False)
            bar.update(1)
        elif done % self.cfg.log_interval == 0 or done == self.cfg.steps:
            log.info("step %d/%d %s", done, self.cfg.steps, text)

    def _trim_metrics(self, start: int) -> None:
        """A resumed run re-logs steps after its checkpoint: drop what an interrupted run logged past it."""
        path = self.out / METRICS
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start]
        path.write_text("".join(line + "\n" for line in keep))

    # -- evaluation --
    def _evaluate(self, done: int, metrics_file) -> None:
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F

        from .data import IGNORE, eval_plan

        engine = self.engine
        engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)  # [sum of token losses, tokens]
        with torch.no_grad():
            for idx, weights in eval_plan(self.val_split.n_windows, self.cfg.eval.samples, self.rank,
                                          self.world, self.cfg.batch.micro_batch):
                x, y = self.val_split.batch(idx)
                logits = engine(x.to(engine.device)).float()  # (b, T, V)
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(engine.device).reshape(-1),
                                         reduction="none").view(y.shape).sum(-1).double().cpu()  # (b,)
                w = torch.tensor(weights, dtype=torch.float64)
                scored = (y != IGNORE).sum(-1).double()  # (b,) targets that are not a sample's fixed prefix
                totals += torch.stack([(losses * w).sum(), (scored * w).sum()])
        engine.train()
        totals = totals.to(engine.device)
        dist.all_reduce(totals)
        val_loss = (totals[0] / totals[1]).item()
        self.last_eval = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.rank == 0:
            metrics_file.write(json.dumps({"step": done, **self.last_eval}) + "\n")
            metrics_file.flush()
            if self.tracker:
                self.tracker.log_metrics(self.last_eval, done)
                self.tracker.flush()
            log.info("step %d validation loss %.4f, perplexity %.2f", done, val_loss, self.last_eval["val_ppl"])

    # -- checkpoints --
    def _save(self, done: int) -> None:
        import torch.distributed as dist

        root = self.out / ckpt.CHECKPOINTS
        tag = ckpt.tag_for(done)
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"ctxmem_step": done}, save_latest=False)
        dist.barrier()  # every rank's partition is on disk before the manifest marks the tag complete
        if self.rank == 0:
            state = {"step": done, "world_size": self.world, "zero_stage": self.cfg.zero.stage,
                     "precision": self.precision, "model_config": self.model_cfg.to_dict(),
                     "global_batch": self.cfg.batch.global_batch, "seq_len": self.seq_len, "seed": self.cfg.seed,
                     "mlflow_run_id": self.tracker.run_id if self.tracker else None,
                     "config": self.cfg.to_dict()}
            ckpt.write_manifest(root, tag, state)
            ckpt.prune(root, self.cfg.checkpoint.keep)
        dist.barrier()

    def _resume_hint(self) -> str:
        cmd = f"ctxmem train --config {self.out / 'config.yaml'} --resume"
        if self.launcher == "ray":
            cmd += f" --ray --num-workers {self.world}"
        elif self.world > 1:
            cmd += f" --nproc {self.world}"
        return cmd

    def _interrupted(self, step: int) -> TrainResult:
        signum = self.stop.signum or signal.SIGINT
        result = TrainResult("interrupted", step, self.out, exit_code=128 + int(signum))
        if self.rank == 0:
            if self.tracker:
                self.tracker.set_tags({"interrupted_at_step": str(step)})
                self.tracker.finish("KILLED")
                result.mlflow = self.tracker.run_info()
            self._write_summary(result)
            print(f"interrupted at step {step}/{self.cfg.steps}; checkpoint saved in "
                  f"{self.out / ckpt.CHECKPOINTS / ckpt.tag_for(step)}\nresume with: {self._resume_hint()}",
                  file=sys.stderr, flush=True)
        if self.report:
            self.report({"step": step, "status": "interrupted"}, None)
        return result

    def _finish(self, step: int) -> TrainResult:
        from ctxmem.checkpoint import load_model, save_checkpoint

        from . import tracking

        root = self.out / ckpt.CHECKPOINTS
        tag = ckpt.tag_for(step)
        live = ckpt.live_weights(self.engine, self.cfg.zero.stage, self.rank)  # collective on ZeRO-3
        result = TrainResult("completed", step, self.out, **{k: self.last_eval.get(k) for k in ("val_loss", "val_ppl")})
        if self.rank == 0:
            sd = ckpt.consolidated_state_dict(self.engine, root, tag, self.cfg.zero.stage, self.rank)
            final = self.out / FINAL
            tmp = self.out / (FINAL + ".tmp")
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            save_checkpoint(tmp, tokenizer=self.tokenizer, config=self.model_cfg, state_dict=sd,
                            metadata={"ctxmem_step": str(step), "zero_stage": str(self.cfg.zero.stage)})
            self.cfg.save(tmp / "train_config.yaml")
            # The consolidated file, read back through the core loader, must equal the live weights.
            loaded = load_model(tmp).state_dict()
            result.consolidated_max_abs_diff = max(
                (loaded[k] - v).abs().max().item() for k, v in live.items())
            run_info = {"run_id": None, "tracking_uri": None, "experiment": None, "pending": False}
            if self.tracker:
                run_info = self.tracker.run_info()
            run_info.update(val_loss=result.val_loss, val_ppl=result.val_ppl, step=step,
                            checkpoint=str((final).resolve()))
            (tmp / tracking.RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
            if final.exists():
                import shutil

                shutil.rmtree(final)
            tmp.rename(final)
            result.final = final
            png = tracking.plot_losses(self.out / METRICS, self.out / "loss_curve.png")
            if self.cfg.eval.memory.enabled:
                result.memory_eval = self._memory_eval(final, step)
            if self.tracker:
                self.tracker.log_metrics({"final_val_loss": result.val_loss, "final_val_ppl": result.val_ppl,
                                          "consolidated_max_abs_diff": result.consolidated_max_abs_diff}, step)
                self.tracker.log_artifact(self.out / "config.yaml")
                self.tracker.log_artifact(self.out / METRICS)
                if png:
                    self.tracker.log_artifact(png)
                if self.cfg.tracking.log_checkpoint:
                    self.tracker.log_artifact(final, "checkpoint")
                self.tracker.finish("FINISHED")
                result.mlflow = self.tracker.run_info()
            self._write_summary(result)
            print(f"final checkpoint: {final} (validation loss {result.val_loss:.4f}, perplexity "
                  f"{result.val_ppl:.2f})" + self._mlflow_note(result.mlflow),
                  file=sys.stderr, flush=True)
        if self.report:
            self.report({"step": step, "status": "completed", "val_loss": result.val_loss,
                         "val_ppl": result.val_ppl}, self.out / FINAL if self.rank == 0 else None)
        return result

    def _memory_eval(self, final: Path, step: int) -> dict[str, Any] | None:
        """eval.memory: the memory evaluation of the final checkpoint (rank 0), saved in OUT/memory_eval
        and logged to the run (metrics at the last step, memory_eval.json and PNGs as artifacts). A
        failure is reported and recorded, and the run still completes: its checkpoint is intact."""
        from ctxmem.memory_eval import MemoryEvalError

        from .final_memory_eval import FOLDER, run_memory_eval

        log.info("memory evaluation of %s over the validation split", final)
        try:
            done = run_memory_eval(self.cfg, final, self.data, self.out / FOLDER, self.device_kind)
        except MemoryEvalError as err:
            log.error("memory evaluation failed: %s", err)
            if self.tracker:
                self.tracker.set_tags({"memory_eval_error": str(err)[:4000]})
            return {"error": str(err)}
        print(done.result.table(), file=sys.stderr, flush=True)
        if self.tracker:
            self.tracker.log_metrics(done.result.metrics(), step)
            self.tracker.set_tags(done.params)
            for path in done.paths.values():
                self.tracker.log_artifact(path, FOLDER)
        return {"json": str(done.paths["json"]), "metrics": done.result.metrics()}

    @staticmethod
    def _mlflow_note(info: dict[str, Any]) -> str:
        if not info:
            return ""
        if info.get("pending"):
            return "; MLflow records pending in mlflow_pending.jsonl (ctxmem train --sync-mlflow)"
        return f"; MLflow run {info.get('run_id')} ({info.get('tracking_uri')})"

    def _engine_facts(self) -> dict[str, Any]:
        """What DeepSpeed actually built (not what was asked for): the tests and the bench read it."""
        opt = self.engine.optimizer
        return {"optimizer": type(opt).__name__,
                "base_optimizer": type(getattr(self.engine, "basic_optimizer", None)).__name__,
                "offload_optimizer": bool(getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False)),
                "offload_params": bool(getattr(opt, "offload_param", False)),
                "activation_checkpointing": bool(self.engine.module.checkpoint_blocks),
                "param_dtype": str(next(self.engine.module.parameters()).dtype).replace("torch.", "")}

    def _write_summary(self, result: TrainResult) -> None:
        data = {"status": result.status, "step": result.step, "steps": self.cfg.steps,
                "final": str(result.final) if result.final else None, "val_loss": result.val_loss,
                "val_ppl": result.val_ppl, "world_size": self.world, "zero_stage": self.cfg.zero.stage,
                "precision": self.precision, "device": self.device_kind, "launcher": self.launcher,
                "consolidated_max_abs_diff": result.consolidated_max_abs_diff, "mlflow": result.mlflow,
                "engine": self._engine_facts(), "memory_eval": result.memory_eval,
                "resume": self._resume_hint() if result.status != "completed" else None}
        (self.out / SUMMARY).write_text(json.dumps(data, indent=2) + "\n")
