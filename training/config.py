"""The typed training config: one YAML file, nested sections, dotted overrides on the command line.

    ctxmem train --config infra/train-tiny.yaml steps=50 zero.stage=3 optim.lr=1e-3

Every section is a frozen dataclass that validates in `__post_init__`; unknown keys are errors that
list the known ones. What depends on the world size (gradient accumulation) is derived by
`TrainConfig.accumulation(world_size)`, which also refuses a global batch the ranks cannot split.
Relative paths (data.path, out, a sqlite tracking uri) are relative to the working directory.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TrainConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def _positive(section: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise TrainConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    # Any ModelConfig field except vocab_size, which comes from the tokenizer (rounded up).
    overrides: dict[str, Any] = field(default_factory=dict)
    vocab_multiple: int = 64  # embedding rows rounded up to a multiple of this (matmul-friendly)

    def __post_init__(self) -> None:
        _positive("model", vocab_multiple=self.vocab_multiple)
        if not isinstance(self.overrides, dict):
            raise TrainConfigError(f"model.overrides must be a mapping of ModelConfig fields, got {self.overrides!r}")
        for key in ("vocab_size", "preset"):
            if key in self.overrides:
                raise TrainConfigError(f"model.overrides.{key} cannot be set: "
                                       + ("the vocabulary comes from the prepared data's tokenizer"
                                          if key == "vocab_size" else "use model.preset"))
        self.build(256)  # validates the preset name and the overrides now, not after launch

    def build(self, tokenizer_vocab: int):
        """The ModelConfig for a tokenizer of `tokenizer_vocab` ids (rows rounded up)."""
        from ctxmem.config import ConfigError, preset

        vocab = self.vocab_multiple * math.ceil(tokenizer_vocab / self.vocab_multiple)
        try:
            return preset(self.preset, **{**self.overrides, "vocab_size": vocab})
        except ConfigError as err:
            raise TrainConfigError(f"model: {err}") from None
        except TypeError as err:  # an override that is not a ModelConfig field
            raise TrainConfigError(f"model.overrides: {err}") from None


@dataclass(frozen=True)
class DataSection:
    path: str = "data/chatterbot"  # a folder written by `ctxmem data prepare`
    seq_len: int | None = None  # tokens per training window; None = the model's max_seq_len

    def __post_init__(self) -> None:
        if self.seq_len is not None:
            _positive("data", seq_len=self.seq_len)


@dataclass(frozen=True)
class BatchSection:
    global_batch: int = 16  # sequences per optimizer step, all ranks together
    micro_batch: int = 4  # sequences per rank per forward/backward
    grad_accum: int | None = None  # None = global_batch / (micro_batch * world_size)

    def __post_init__(self) -> None:
        _positive("batch", global_batch=self.global_batch, micro_batch=self.micro_batch)
        if self.grad_accum is not None:
            _positive("batch", grad_accum=self.grad_accum)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # the cosine decays to this at the last step
    warmup_steps: int = 10  # linear warmup from lr/warmup_steps
    weight_decay: float = 0.1  # AdamW decay on matrices only (not norms, not biases)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global grad-norm clip; 0 turns it off (DeepSpeed's default is 1.0, so it is always set)

    def __post_init__(self) -> None:
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise TrainConfigError(f"optim: need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise TrainConfigError(f"optim.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            raise TrainConfigError("optim: weight_decay and grad_clip must be >= 0 and eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise TrainConfigError(f"optim.betas must be two numbers in [0, 1), got {list(self.betas)}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - 1 - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EvalSection:
    interval: int = 50  # optimizer steps between evaluations (and one at the end)
    samples: int = 64  # validation windows per evaluation (capped by the split's size)

    def __post_init__(self) -> None:
        _positive("eval", interval=self.interval, samples=self.samples)


@dataclass(frozen=True)
class CheckpointSection:
    interval: int = 100  # optimizer steps between DeepSpeed checkpoints (and one at the end)
    keep: int = 2  # newest checkpoints kept; older ones are deleted

    def __post_init__(self) -> None:
        _positive("checkpoint", interval=self.interval, keep=self.keep)


@dataclass(frozen=True)
class ZeroSection:
    stage: int = 0  # ZeRO stage 0-3 (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054)
    offload_optimizer: bool = False  # optimizer state + fp32 master weights on the CPU (stage >= 1)
    offload_params: bool = False  # parameters on the CPU between uses (stage 3)
    cpu_adam: bool = False  # offload with DeepSpeed's compiled CPUAdam (fast; ~2 min build) instead of torch AdamW

    def __post_init__(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise TrainConfigError(f"zero.stage must be 0, 1, 2 or 3, got {self.stage!r}")
        if self.offload_optimizer and self.stage == 0:
            raise TrainConfigError("zero.offload_optimizer needs zero.stage >= 1 (ZeRO-Offload moves the "
                                   "partitioned optimizer state)")
        if self.offload_params and self.stage != 3:
            raise TrainConfigError("zero.offload_params needs zero.stage 3 (only stage 3 partitions parameters)")


@dataclass(frozen=True)
class TrackingSection:
    enabled: bool = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "ctxmem"
    run_name: str | None = None  # None = the name of the out folder
    log_checkpoint: bool = True  # upload the final checkpoint as a run artifact


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/train"  # checkpoints, metrics, the final ctxmem checkpoint
    steps: int = 100  # optimizer steps
    seed: int = 1234
    precision: str = "auto"  # auto = bf16 on a GPU that has it, else fp32; fp16 only on GPUs
    device: str = "auto"  # auto = cuda if available
    activation_checkpointing: bool = False  # recompute each block in backward (memory for compute)
    log_interval: int = 10  # steps between log lines / MLflow flushes
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    zero: ZeroSection = field(default_factory=ZeroSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)

    def __post_init__(self) -> None:
        _positive("train", steps=self.steps, log_interval=self.log_interval)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise TrainConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.precision not in PRECISIONS:
            raise TrainConfigError(f"precision={self.precision!r} is not one of {PRECISIONS}")
        if self.device not in DEVICES:
            raise TrainConfigError(f"device={self.device!r} is not one of {DEVICES}")
        if self.optim.warmup_steps > self.steps:
            raise TrainConfigError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        max_len = self.model.build(256).max_seq_len
        if self.data.seq_len is not None and self.data.seq_len > max_len:
            raise TrainConfigError(f"data.seq_len={self.data.seq_len} exceeds the model's max_seq_len={max_len} "
                                   f"(preset {self.model.preset!r}); lower it or override model.overrides.max_seq_len")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.build(256).max_seq_len

    def accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step on `world_size` ranks; refuses a batch the ranks cannot split."""
        b = self.batch
        per_step = b.micro_batch * world_size
        if b.global_batch % per_step:
            raise TrainConfigError(
                f"batch.global_batch={b.global_batch} is not divisible by world size {world_size} x "
                f"batch.micro_batch={b.micro_batch} = {per_step}; choose a global batch that is a multiple "
                f"of {per_step} (e.g. {per_step * max(1, round(b.global_batch / per_step))})")
        accum = b.global_batch // per_step
        if b.grad_accum is not None and b.grad_accum != accum:
            raise TrainConfigError(
                f"batch.grad_accum={b.grad_accum} disagrees with global_batch={b.global_batch} / "
                f"(micro_batch={b.micro_batch} x world size {world_size}) = {accum}; drop grad_accum to derive it")
        return accum

    def runtime(self, cuda_available: bool, bf16_supported: bool = False) -> tuple[str, str]:
        """(device, precision) this machine runs; refuses what it cannot do."""
        device = self.device if self.device != "auto" else ("cuda" if cuda_available else "cpu")
        if device == "cuda" and not cuda_available:
            raise TrainConfigError("device=cuda but torch sees no CUDA device; use device=cpu or auto")
        precision = self.precision
        if precision == "auto":
            precision = "bf16" if device == "cuda" and bf16_supported and self.zero.stage >= 1 else "fp32"
        if precision == "fp16" and device == "cpu":
            raise TrainConfigError("precision=fp16 needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                                   "use bf16 or fp32")
        if precision == "bf16" and self.zero.stage == 0:
            raise TrainConfigError(
                "precision=bf16 needs zero.stage >= 1: DeepSpeed keeps the fp32 master weights of a bf16 run "
                "in its ZeRO optimizer, which is also what the final fp32 checkpoint is consolidated from")
        return device, precision

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise TrainConfigError(f"a training config is a mapping of sections, got {type(data).__name__}")
        return _build(cls, data, "")

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise TrainConfigError(f"config file {path} does not exist (the shipped configs are in infra/)") from None
        except yaml.YAMLError as err:
            raise TrainConfigError(f"{path} is not valid YAML: {err}") from None
        data = apply_overrides(data or {}, overrides or [])
        try:
            return cls.from_dict(data)
        except TrainConfigError as err:
            raise TrainConfigError(f"{path}: {err}") from None

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with dotted-key changes, e.g. replace(**{"zero.stage": 3, "steps": 4})."""
        return TrainConfig.from_dict(apply_overrides(self.to_dict(), [f"{k}={_dump(v)}" for k, v in changes.items()]))

    def with_absolute_paths(self, base: Path | None = None) -> "TrainConfig":
        """Paths made absolute against `base` (default: cwd), for workers whose cwd differs (Ray)."""
        base = base or Path.cwd()
        changes: dict[str, Any] = {"out": str((base / self.out).resolve()),
                                   "data.path": str((base / self.data.path).resolve())}
        uri = self.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            changes["tracking.uri"] = "sqlite:///" + str((base / uri[len("sqlite:///"):]).resolve())
        return self.replace(**changes)


def _dump(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings applied to a config mapping; values are parsed as YAML."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r} is not KEY=VALUE (e.g. zero.stage=3 or optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise TrainConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """YAML value -> the field's type (YAML 1.1 reads 3e-4 as a string; lists become tuples)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if kind is float:
        if isinstance(value, bool):
            raise TrainConfigError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TrainConfigError(f"{where} must be a number, got {value!r}") from None
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise TrainConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TrainConfigError(f"{where} must be a string, got {value!r}")
        return str(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, typing.get_args(kind)))
    if origin is dict or kind is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise TrainConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise TrainConfigError(f"unknown key(s) {[prefix + u for u in unknown]} in {where}; "
                               f"known keys: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise TrainConfigError(f"{prefix}{name} must be a section (a mapping), got {value!r}")
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)
