"""The typed training config: one YAML file, nested sections, dotted overrides on the command line.

    ctxmem train --config infra/train-tiny.yaml steps=50 zero.stage=3 optim.lr=1e-3

Every section is a frozen pydantic model: unknown keys, wrong types and impossible values are
refused with a `TrainConfigError` that names the dotted key (`optim.betas`) and the known keys.
What depends on the world size (gradient accumulation) is derived by
`TrainConfig.accumulation(world_size)`, which also refuses a global batch the ranks cannot split.
Relative paths (data.path, out, a sqlite tracking uri) are relative to the working directory.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .errors import TrainConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


def _not_a_bool(value: Any) -> Any:
    # pydantic reads true as 1.0; in a config it is a typo for a number
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a number")
    return value


# YAML 1.1 reads `3e-4` (no dot) as a string: numbers accept numeric strings, never true/false.
Number = Annotated[float, BeforeValidator(_not_a_bool)]
Integer = Annotated[int, Strict()]  # refuses 2.5, "3" and true
Positive = Annotated[int, Strict(), Field(gt=0)]
Flag = Annotated[bool, Strict()]  # refuses 1 and "yes" (YAML's own yes/no are booleans already)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        """`tracking:` with nothing under it (YAML null) is an empty section, i.e. all defaults."""
        if isinstance(data, dict):
            sections = {name for name, f in cls.model_fields.items()
                        if isinstance(f.annotation, type) and issubclass(f.annotation, _Section)}
            return {k: ({} if v is None and k in sections else v) for k, v in data.items()}
        return data


class ModelSection(_Section):
    preset: str = "tiny"
    # Any ModelConfig field except vocab_size, which comes from the tokenizer (rounded up), and sink.
    overrides: dict[str, Any] = Field(default_factory=dict)
    vocab_multiple: Positive = 64  # embedding rows rounded up to a multiple of this (matmul-friendly)
    # Attention sinks trained into the model (ctxmem.config.SINKS): none; token = a dedicated sink
    # token (one id past the tokenizer's) starts every training sample; learned = a logit per head.
    sink: Literal["none", "token", "learned"] = "none"

    @field_validator("overrides", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _buildable(self) -> "ModelSection":
        for key in ("vocab_size", "preset", "sink"):
            if key in self.overrides:
                raise ValueError(f"model.overrides.{key} cannot be set: "
                                 + ("the vocabulary comes from the prepared data's tokenizer"
                                    if key == "vocab_size" else f"use model.{key}"))
        try:
            self.build(256)  # validates the preset name and the overrides now, not after launch
        except TrainConfigError as err:
            raise ValueError(str(err)) from None
        return self

    def build(self, tokenizer_vocab: int):
        """The ModelConfig for a tokenizer of `tokenizer_vocab` ids (rows rounded up). sink=token
        adds one id past the tokenizer's before rounding: the model's last id is the sink token,
        never a tokenizer id (ModelConfig.sink_token_id = vocab_size - 1)."""
        from ctxmem.config import ConfigError, preset

        ids = tokenizer_vocab + (1 if self.sink == "token" else 0)
        vocab = self.vocab_multiple * math.ceil(ids / self.vocab_multiple)
        try:
            return preset(self.preset, **{**self.overrides, "vocab_size": vocab, "sink": self.sink})
        except ConfigError as err:
            raise TrainConfigError(f"model: {err}") from None
        except TypeError as err:  # an override that is not a ModelConfig field
            raise TrainConfigError(f"model.overrides: {err}") from None


class DataSection(_Section):
    path: str = "data/chatterbot"  # a folder written by `ctxmem data prepare`
    seq_len: Positive | None = None  # tokens per training window; None = the model's max_seq_len
    # How samples are cut from the token stream (training/data.py): crop = consecutive windows
    # wherever they fall; document = each sample starts at a document (or continues a long one)
    # with the tokenizer's BOS at position 0, as streams start at inference.
    samples: Literal["crop", "document"] = "crop"


class BatchSection(_Section):
    global_batch: Positive = 16  # sequences per optimizer step, all ranks together
    micro_batch: Positive = 4  # sequences per rank per forward/backward
    grad_accum: Positive | None = None  # None = global_batch / (micro_batch * world_size)


class OptimSection(_Section):
    lr: Number = Field(1e-3, gt=0)  # peak learning rate, reached after warmup
    min_lr: Number = Field(1e-4, ge=0)  # the cosine decays to this at the last step
    warmup_steps: Integer = Field(10, ge=0)  # linear warmup from lr/warmup_steps
    weight_decay: Number = Field(0.1, ge=0)  # AdamW decay on matrices only (not norms, not biases)
    betas: tuple[Number, Number] = (0.9, 0.95)  # Adam's (beta1, beta2), each in [0, 1)
    eps: Number = Field(1e-8, gt=0)
    grad_clip: Number = Field(1.0, ge=0)  # global grad-norm clip; 0 turns it off (DeepSpeed's default is 1.0, so it is always set)

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        # checked before pydantic's tuple parsing, whose messages count items past the end
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"optim.betas must be a list of exactly two numbers [beta1, beta2], got {value!r}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _min_below_peak(self) -> "OptimSection":
        if self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        return self

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, total_steps - 1 - self.warmup_steps))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


class MemoryEvalSection(_Section):
    """ctxmem.memory_eval on the final checkpoint over the validation split, logged to the run."""
    enabled: Flag = False
    window: Positive | None = None  # recent tokens every policy keeps; None = half the model's context
    sinks: Integer = Field(4, ge=0)  # attention sinks of the sink policy
    length: Positive | None = None  # stream tokens; None = 20x the window
    distances: list[Positive] | None = None  # recall distances; None = spread inside and beyond the window
    trials: Positive = 32  # recall facts per distance and policy
    reference_tokens: Positive = 1024  # recompute(chunk=1) positions measured before 10x the window


class EvalSection(_Section):
    interval: Positive = 50  # optimizer steps between evaluations (and one at the end)
    samples: Positive = 64  # validation windows per evaluation (capped by the split's size)
    memory: MemoryEvalSection = Field(default_factory=MemoryEvalSection)

    @field_validator("memory", mode="before")
    @classmethod
    def _flag_is_enabled(cls, value: Any) -> Any:
        """`eval.memory: true` is short for `eval.memory.enabled: true` with the defaults."""
        return {"enabled": value} if isinstance(value, bool) else value


class CheckpointSection(_Section):
    interval: Positive = 100  # optimizer steps between DeepSpeed checkpoints (and one at the end)
    keep: Positive = 2  # newest checkpoints kept; older ones are deleted


class ZeroSection(_Section):
    stage: Integer = 0  # ZeRO stage 0-3 (Rajbhandari et al. 2020, https://arxiv.org/abs/1910.02054)
    offload_optimizer: Flag = False  # optimizer state + fp32 master weights on the CPU (stage >= 1)
    offload_params: Flag = False  # parameters on the CPU between uses (stage 3)
    cpu_adam: Flag = False  # offload with DeepSpeed's compiled CPUAdam (fast; ~2 min build) instead of torch AdamW

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, value: int) -> int:
        if value not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {value!r}")
        return value

    @model_validator(mode="after")
    def _offload_needs_partitions(self) -> "ZeroSection":
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage >= 1 (ZeRO-Offload moves the "
                             "partitioned optimizer state)")
        if self.offload_params and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage 3 (only stage 3 partitions parameters)")
        return self


class TrackingSection(_Section):
    enabled: Flag = True
    uri: str | None = None  # None = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "ctxmem"
    run_name: str | None = None  # None = the name of the out folder
    log_checkpoint: Flag = True  # upload the final checkpoint as a run artifact


class TrainConfig(_Section):
    out: str = "runs/train"  # checkpoints, metrics, the final ctxmem checkpoint
    steps: Positive = 100  # optimizer steps
    seed: Integer = Field(1234, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on a GPU that has it, else fp32; fp16 only on GPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda if available
    activation_checkpointing: Flag = False  # recompute each block in backward (memory for compute)
    log_interval: Positive = 10  # steps between log lines / MLflow flushes
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    batch: BatchSection = Field(default_factory=BatchSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    zero: ZeroSection = Field(default_factory=ZeroSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _sections_agree(self) -> "TrainConfig":
        if self.optim.warmup_steps > self.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} exceeds steps={self.steps}")
        max_len = self.model.build(256).max_seq_len
        if self.data.seq_len is not None and self.data.seq_len > max_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds the model's max_seq_len={max_len} "
                             f"(preset {self.model.preset!r}); lower it or override model.overrides.max_seq_len")
        memory = self.eval.memory
        if memory.enabled and memory.window is not None and memory.window + memory.sinks > max_len:
            raise ValueError(f"eval.memory: window ({memory.window}) + sinks ({memory.sinks}) exceeds the model's "
                             f"max_seq_len={max_len}; lower eval.memory.window")
        return self

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
        return self.model_dump(mode="json")  # tuples become lists: plain YAML

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
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise TrainConfigError(describe(err)) from None

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
        """A copy with dotted-key changes, e.g. replace(**{"zero.stage": 3, "steps": 4}), validated again."""
        data = self.to_dict()
        for key, value in changes.items():
            set_dotted(data, key, value)
        return TrainConfig.from_dict(data)

    def with_absolute_paths(self, base: Path | None = None) -> "TrainConfig":
        """Paths made absolute against `base` (default: cwd), for workers whose cwd differs (Ray)."""
        base = base or Path.cwd()
        changes: dict[str, Any] = {"out": str((base / self.out).resolve()),
                                   "data.path": str((base / self.data.path).resolve())}
        uri = self.tracking.uri
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            changes["tracking.uri"] = "sqlite:///" + str((base / uri[len("sqlite:///"):]).resolve())
        return self.replace(**changes)


# ---- overrides: the one path from `key.sub=value` to a config mapping ---------------------------
def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b][c] = value for key "a.b.c", creating missing sections (in place)."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if node.get(part) is None:  # missing, or a section left empty in the YAML
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise TrainConfigError(f"override {key}: {part} is not a section (it holds {node!r})")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`section.key=value` strings applied to a copy of a config mapping; values are parsed as YAML."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise TrainConfigError(f"override {item!r} is not KEY=VALUE (e.g. zero.stage=3 or optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise TrainConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        set_dotted(data, key, value)
    return data


# ---- pydantic's errors, told as the config's keys --------------------------------------------------
_KINDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
          "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
          "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
          "dict_type": "a mapping", "model_type": "a section (a mapping)", "model_attributes_type": "a section (a mapping)",
          "tuple_type": "a list"}


def _known_keys(loc: tuple) -> list[str]:
    """The keys of the section at `loc` (a path of field names below TrainConfig)."""
    model: type[BaseModel] = TrainConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def describe(err: ValidationError) -> str:
    """One line per problem, each naming its dotted key, e.g. `steps must be an integer, got 'many'`."""
    unknown: dict[tuple, list[str]] = {}
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc)
        kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
        if kind == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(key)
        elif kind == "value_error":  # our validators: the message names its keys
            lines.append(str(ctx.get("error", e["msg"])))
        elif kind in _KINDS:
            lines.append(f"{key} must be {_KINDS[kind]}, got {value!r}")
        elif kind in ("greater_than", "greater_than_equal"):
            op = ">" if kind == "greater_than" else ">="
            bound = ctx.get("gt", ctx.get("ge"))
            lines.append(f"{key} must be {op} {bound}, got {value!r}")
        elif kind == "literal_error":
            lines.append(f"{key}={value!r} is not one of {ctx.get('expected')}")
        else:
            lines.append(f"{key}: {e['msg']}, got {value!r}")
    named = [f"unknown key(s) {keys} in " + (f"section {'.'.join(section)!r}" if section else "the top level")
             + f"; known keys: {_known_keys(section)}" for section, keys in unknown.items()]
    return "; ".join(named + lines)
