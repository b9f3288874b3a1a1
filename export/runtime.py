"""The ONNX Runtime side of an export: the runtime config that ships beside model.onnx, the
backend that runs the graph for ctxmem.memory, and the Generator built on it.

Serving reads the runtime config and never guesses: window, sinks, policy, special tokens, chat
template, cache layout and where the model came from are all written there by `ctxmem export`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import threading
from dataclasses import field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ctxmem.config import ConfigError, ModelConfig
from ctxmem.memory import MemoryConfig, MemoryConfigError, NumpyCacheOps

from .contract import (ALLOWED, INPUT_IDS, KEY_POSITIONS, LOGITS, POSITIONS, REEXPORT, SINK_KEYS, SINK_POSITIONS,
                       ExportContract, past_names, present_names, query_names, rotation_span)
from .errors import (ExportModelError, ModelSpecError, OutputNameError, ProviderError, RuntimeConfigError,
                     UnsafeFilePathError)
from .providers import choose_provider, is_auto, ort_name

log = logging.getLogger(__name__)

RUNTIME_CONFIG = "runtime_config.json"
MODEL_FILE, DATA_FILE, TOKENIZER_FILE, REPORT_FILE = "model.onnx", "model.onnx.data", "tokenizer.json", "verification.json"
FORMAT, FORMAT_VERSION = "ctxmem-onnx-export", 1
DEFAULT_FILES = {"model": MODEL_FILE, "external_data": DATA_FILE, "tokenizer": TOKENIZER_FILE,
                 "verification": REPORT_FILE}  # runtime_config.json `files`: paths relative to the export folder
_RERUN = "re-run `ctxmem export --model CHECKPOINT --out {dir}`"


# Validated by pydantic (a pydantic dataclass, not a BaseModel: BaseModel reserves the name
# `model_config`, which is this class's typed view of the `model` section). Strict: a JSON value of
# the wrong type is refused, not coerced; unknown keys are refused.
@pydantic_dataclass(config=ConfigDict(extra="forbid", strict=True))
class RuntimeConfig:
    """Everything serving needs besides the graph and the tokenizer (runtime_config.json)."""

    model: dict[str, Any]  # ModelConfig.to_dict() of the exported checkpoint
    contract: dict[str, Any]  # ExportContract.to_dict(): names, dims, dtypes, cache layout
    memory: dict[str, Any]  # the resolved MemoryConfig serving starts with (policy, window, sinks, chunk)
    opset: int
    variant: Literal["fp32", "int8", "int4", "fp16"] = "fp32"  # int8/int4: MatMulNBits weights (CPU); fp16: GPU
    generation: dict[str, Any] = field(default_factory=dict)  # GenerationConfig defaults
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos/eos/pad ids, stop ids, text -> id
    chat_template: dict[str, Any] = field(default_factory=dict)  # style, role tokens, stop strings
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint, its sha256, run id, tracking uri, metrics
    optimization: dict[str, Any] = field(default_factory=dict)  # offline ORT level, quantisation settings
    files: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FILES))  # paths relative to the export folder
    created_at: str = ""
    versions: dict[str, str] = field(default_factory=dict)  # ctxmem, torch, onnx, onnxruntime at export time
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @field_validator("files")
    @classmethod
    def _files_stay_in_the_folder(cls, files: dict[str, str]) -> dict[str, str]:
        """Every file of an export lives inside its folder: a config copied from elsewhere (or a
        registry download) must not make serving open /etc/... or ../../. Symlinks need the folder
        itself and are checked by file_path() (load() does it for every key)."""
        for key, value in files.items():
            problem = file_path_problem(value)
            if problem:
                raise UnsafeFilePathError(f"key 'files.{key}' is {value!r}, {problem}; every file of an export lives "
                                          f"inside its folder: give a path relative to it (e.g. "
                                          f"{DEFAULT_FILES.get(key, MODEL_FILE)!r})", key=f"files.{key}")
        return files

    def __post_init__(self) -> None:
        """Checks across fields, after pydantic has checked each field's type."""
        if self.format != FORMAT:
            raise RuntimeConfigError(f"format is {self.format!r}, expected {FORMAT!r}")
        if self.format_version > FORMAT_VERSION:
            raise RuntimeConfigError(f"format_version {self.format_version} is newer than this ctxmem reads "
                                     f"({FORMAT_VERSION}); upgrade ctxmem")
        if self.opset < 18:
            raise RuntimeConfigError(f"opset must be an integer >= 18, got {self.opset!r}")
        try:
            cfg = self.model_config
            contract = self.export_contract
            self.memory_config.resolve(cfg.max_seq_len, cfg.pos == "rope")
        except (ConfigError, MemoryConfigError, KeyError, TypeError, ValueError) as err:
            raise RuntimeConfigError(f"invalid model/contract/memory section ({err})") from None
        if (contract.n_layers, contract.n_kv_heads, contract.head_dim, contract.vocab_size,
                contract.n_heads or cfg.n_heads) != (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size,
                                                     cfg.n_heads):
            raise RuntimeConfigError("the contract section does not match the model section")

    # ---- typed views ---------------------------------------------------------------------
    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)

    @property
    def export_contract(self) -> ExportContract:
        return ExportContract.from_dict(self.contract)

    @property
    def memory_config(self) -> MemoryConfig:
        return MemoryConfig(**self.memory)

    # ---- files ---------------------------------------------------------------------------
    def file_path(self, export_dir: str | Path, key: str) -> Path:
        """The file `files.<key>` names, inside `export_dir` once symlinks are followed
        (UnsafeFilePathError naming the key otherwise)."""
        return confined_file(export_dir, self.files.get(key, DEFAULT_FILES.get(key, "")), f"files.{key}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RuntimeConfig":
        """Validated construction; every problem is a RuntimeConfigError that names the key."""
        if not isinstance(data, dict):
            raise RuntimeConfigError(f"must hold a JSON object, got {type(data).__name__}")
        try:
            return cls(**data)
        except ValidationError as err:
            raise RuntimeConfigError(describe_validation_error(err)) from None

    def save(self, export_dir: str | Path) -> Path:
        path = Path(export_dir) / RUNTIME_CONFIG
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, export_dir: str | Path) -> "RuntimeConfig":
        export_dir = Path(export_dir)
        path = export_dir / RUNTIME_CONFIG
        rerun = _RERUN.format(dir=export_dir)
        if not export_dir.is_dir():
            raise RuntimeConfigError(f"{export_dir} is not a directory; expected a ctxmem ONNX export "
                                     f"({MODEL_FILE}, {RUNTIME_CONFIG}, {TOKENIZER_FILE}): {rerun}")
        if not path.is_file():
            hint = ("it looks like a ctxmem checkpoint, not an export (use --backend torch, or export it): "
                    if (export_dir / "config.json").is_file() else "")
            raise RuntimeConfigError(f"{export_dir} has no {RUNTIME_CONFIG}, so it is not a complete ctxmem ONNX "
                                     f"export; serving never guesses window, sinks or tokens: {hint}{rerun}")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RuntimeConfigError(f"{path} is not readable JSON ({err}); {rerun}") from None
        try:
            config = cls.from_dict(data)
            for key in config.files:
                config.file_path(export_dir, key)
        except UnsafeFilePathError as err:
            raise UnsafeFilePathError(f"{path}: {err}; {rerun}", key=err.key) from None
        except RuntimeConfigError as err:
            raise RuntimeConfigError(f"{path}: {err}; {rerun}") from None
        return config


def file_path_problem(value: str) -> str | None:
    """Why `value` cannot name a file inside an export folder, or None when it can (syntax only:
    symlinks are confined_file's)."""
    if not value.strip():
        return "an empty path"
    posix, windows = PurePosixPath(value), PureWindowsPath(value)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        return "an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "a path that climbs out of the export folder with '..'"
    return None


def confined_file(export_dir: str | Path, relative: str, key: str) -> Path:
    """`export_dir / relative`, refused (UnsafeFilePathError naming `key`) unless it stays inside
    `export_dir` after every symlink on the way is followed."""
    problem = file_path_problem(relative)
    if problem:
        raise UnsafeFilePathError(f"{key} is {relative!r}, {problem}; it must name a file inside {export_dir}",
                                  key=key)
    root = Path(export_dir).resolve()
    path = Path(export_dir) / relative
    real = path.resolve()  # follows symlinks, also a dangling one's target
    if not real.is_relative_to(root):
        raise UnsafeFilePathError(f"{key} is {relative!r}, which leads out of the export folder {root} (to {real}, "
                                  "through a symlink); copy the file into the folder instead of linking it", key=key)
    return path


def describe_validation_error(err: ValidationError) -> str:
    """pydantic's errors as one line that names the keys: missing ones first, then unknown ones, then
    the first value of a wrong type."""
    problems = err.errors()
    missing = [".".join(map(str, e["loc"])) for e in problems if e["type"] == "missing"]
    if missing:
        return f"lacks {missing}"
    unknown = [".".join(map(str, e["loc"])) for e in problems if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        known = [f.name for f in dataclasses.fields(RuntimeConfig)]
        return f"has unknown keys {unknown} (known: {', '.join(known)})"
    first = problems[0]
    key = ".".join(map(str, first["loc"]))
    got = repr(first.get("input"))
    return f"key {key!r}: {first['msg']} (got {got if len(got) <= 80 else got[:77] + '...'})"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_hashes(export_dir: str | Path) -> dict[str, str]:
    """sha256 of the graph and its weights: what verification vouches for."""
    export_dir = Path(export_dir)
    return {name: file_sha256(export_dir / name) for name in (MODEL_FILE, DATA_FILE) if (export_dir / name).exists()}


# ---- sessions ----------------------------------------------------------------------------------
def create_session(model_path: str | Path, provider: str | None = None, intra_op_threads: int = 1):
    """An InferenceSession on the chosen provider, logging which one actually runs.

    ONNX Runtime falls back to CPU *silently* when the CUDA libraries are missing, so the provider
    is read back from session.get_providers(): an explicit request that did not take raises."""
    import onnxruntime as ort

    model_path = Path(model_path)
    wanted = ort_name(choose_provider(provider))
    options = _session_options(intra_op_threads)
    providers = [wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])
    if not model_path.is_file():
        raise ExportModelError(f"{model_path} does not exist; {_RERUN.format(dir=model_path.parent)}")
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - ORT raises its own Fail/InvalidProtobuf/... types
        raise ExportModelError(f"ONNX Runtime cannot load {model_path} ({type(err).__name__}: "
                               f"{str(err).strip()[:400]}); the file (or its {DATA_FILE}) is corrupt or "
                               f"incomplete: {_RERUN.format(dir=model_path.parent)}") from None
    running = session.get_providers()[0]
    if running != wanted:
        message = (f"asked for {wanted} but ONNX Runtime runs {running} (CUDA/cuDNN libraries missing or "
                   "incompatible; ORT fell back silently)")
        if not is_auto(provider):
            raise ProviderError(message)
        log.warning(message)
    log.info("ONNX Runtime %s on %s (intra-op threads: %d) for %s", ort.__version__, running, intra_op_threads,
             model_path)
    return session


def _session_options(intra_op_threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # one thread per replica by default: replicas scale out
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return options


def decode_branch_model(model_path: str | Path):
    """The decode branch of ``model_path``'s graph (the If decode_or_general's then branch) as an
    onnx.ModelProto of its own: the branch's nodes, its outputs under the graph's output names, the
    graph inputs it reads (input_ids, positions, allowed, the pasts: no sink inputs) and the
    initializers it uses, still pointing at the export's weights file (external data, not loaded).
    None when the graph has no decode branch."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model_path), load_external_data=False)
    graph = proto.graph
    branch = next((n for n in graph.node if n.op_type == "If" and n.name == "decode_or_general"), None)
    if branch is None:
        return None
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    rename = {out.name: name for out, name in zip(then.output, branch.output)}
    nodes = []
    for node in then.node:
        node = copy.deepcopy(node)
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
        nodes.append(node)
    used = {i for node in nodes for i in node.input}
    inputs = [i for i in graph.input if i.name in used]
    inits = [t for t in graph.initializer if t.name in used]
    new = helper.make_graph(nodes, graph.name + "_decode", inputs, list(graph.output), initializer=inits)
    out = helper.make_model(new, opset_imports=list(proto.opset_import), producer_name=proto.producer_name)
    out.ir_version = proto.ir_version
    return out


def create_decode_session(model_path: str | Path, intra_op_threads: int = 1):
    """A CPU InferenceSession over decode_branch_model(model_path), reading the weights from the
    export's folder; None when the graph has no decode branch."""
    model = decode_branch_model(model_path)
    return None if model is None else _derived_session(model, model_path, intra_op_threads)


def _derived_session(model, model_path: str | Path, intra_op_threads: int):
    """A CPU InferenceSession over ``model``, a graph derived from model_path's (given as bytes: its
    initializers name the weights file relative to the export's folder, which the session is told)."""
    import onnxruntime as ort

    options = _session_options(intra_op_threads)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(model_path).resolve().parent))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def check_names(session, contract: ExportContract, where: str) -> None:
    """Names first: the graph must take and give exactly what the contract declares."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    problems = []
    for kind, got, want in (("inputs", got_in, contract.input_names), ("outputs", got_out, contract.output_names)):
        missing, extra = [n for n in want if n not in got], [n for n in got if n not in want]
        if missing or extra:
            problems.append(f"{kind}: missing {missing}, unexpected {extra}")
    if problems:
        raise OutputNameError(f"{where}: graph names differ from the export contract ({'; '.join(problems)})",
                              stage="load", tensor=None)


# ---- the backend ------------------------------------------------------------------------------
class FrameCache(list):
    """A contract v3 cache: per layer (k, v) numpy arrays (B, Hkv, S, D), keys rotated, and each
    row's frame offset ``frame`` (B,) int64: an ordinary key of stream index n is stored rotated at
    n - frame[row], a sink key at n. Iterates as the (k, v) list every other cache is.

    ``buffer``: the KVBuffer whose first S slots the (k, v) arrays are views of (a cache that decode
    steps wrote in place), or None (arrays of their own: a prefill's present, a take/select/concat)."""

    def __init__(self, layers, frame: np.ndarray, buffer: "KVBuffer | None" = None):
        super().__init__(layers)
        self.frame = frame
        self.buffer = buffer
        self.room: int | None = None  # new tokens any row may still take before its frame must move (None: unknown)


class KVBuffer:
    """Preallocated cache storage for decode steps on the GroupQueryAttention branch: per layer (k, v)
    numpy arrays (B, Hkv, C, D) - slices of one slab (2L, B, Hkv, C, D) -, C >= the slots in use, and
    an OrtValue over each (the same memory).
    A decode step binds a layer's past and present to the same OrtValue, so the op writes the one new
    slot in place (its past_present_share_buffer mode) instead of allocating a present of P+1 slots,
    zeroing it and copying the P cached ones into it, every step.

    ``filled``: how many slots have been written. Only the cache that ends at ``filled`` appends in
    place. An older cache over the same buffer (a shorter snapshot the caller kept: serving's reused
    states, a rewind) reads only slots below its own length, which an append never writes; a step
    that continues from such a snapshot copies it into a new buffer first. So no cache a caller holds
    ever changes under it. Two decode steps over caches of one buffer must not run at the same time
    (the check and the append are not atomic, and sink keys are turned in place for a call): a
    serving replica runs one batch loop; separate streams have separate buffers."""

    GROW = 64  # free slots a new buffer leaves: one copy of the cache per 64 decode steps at most

    def __init__(self, layers, capacity: int, idx: np.ndarray | None = None):
        """A buffer of ``capacity`` slots holding ``layers``' slots, or only those at ``idx`` (K,)
        (the same for every row: a compaction, FrameCacheOps.take) - gathered straight into it."""
        import onnxruntime as ort

        B, Hkv, S, D = layers[0][0].shape
        S = S if idx is None else len(idx)
        # one allocation for every layer's keys and values: measured 5x faster than one per array
        # (fresh pages either way; eight separate ~1 MB arrays cost ~2 ms at batch 8)
        self.slab = np.empty((2 * len(layers), B, Hkv, capacity, D), layers[0][0].dtype)
        # the kept slots as runs of consecutive slots (a compaction keeps the sinks and the window:
        # two runs), each copied as a slice - np.take into the buffer measured 2x slower; the slots
        # beyond S are written by the op before any read
        runs = [(0, 0, S)] if idx is None else _runs(idx)
        for buf, a in zip(self.slab, (a for kv in layers for a in kv)):
            if len(runs) > 8:  # scattered slots (a merge's left padding): one gather
                np.take(a, idx, axis=2, out=buf[:, :, :S], mode="clip")
                continue
            for to, start, stop in runs:
                buf[:, :, to:to + stop - start] = a[:, :, start:stop]
        self.keys = self.slab[0::2]  # (L, B, Hkv, C, D), a view
        self.values = [ort.OrtValue.ortvalue_from_numpy(buf) for buf in self.slab]  # key_0, value_0, key_1, ...
        self.batch, self.capacity, self.filled = B, capacity, S

    @classmethod
    def for_append(cls, past: FrameCache) -> "KVBuffer":
        """The buffer the next decode step of ``past`` writes into: past's own when past ends at its
        high-water mark and a slot is free, else a new one holding past's slots (a copy)."""
        S = past[0][0].shape[2]
        own = past.buffer
        if own is not None and own.filled == S and S < own.capacity and own.batch == len(past.frame):
            return own
        return cls(past, S + 1 + cls.GROW)

    def rotate_keys(self, rows: np.ndarray, cols: np.ndarray, turn: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Every layer's key at slots (rows[n], cols[n]) rotated further, in place, by the angles of
        ``turn`` = (cos, sin), each (N, D) float32 laid out for the half-split rotary layout ([c, c],
        [-s, s]: KeyTurns). Returns the keys as they were, (N, L, Hkv, D), for put_keys."""
        saved = self.keys[:, rows, :, cols]  # (N, L, Hkv, D): the advanced axes come first
        self.keys[:, rows, :, cols] = turned(saved, turn)
        return saved

    def put_keys(self, rows: np.ndarray, cols: np.ndarray, saved: np.ndarray) -> None:
        """Undo rotate_keys: the saved keys (N, L, Hkv, D) back in their slots, bit for bit."""
        self.keys[:, rows, :, cols] = saved

    def views(self, frame: np.ndarray) -> FrameCache:
        """The first ``filled`` slots as the FrameCache the memory holds (views: no copy)."""
        kv = iter(self.slab[:, :, :, :self.filled])
        return FrameCache(list(zip(kv, kv)), frame, self)


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """idx (K,) slot indices as runs of consecutive ones: (position in idx, first slot, end slot)."""
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1  # where a run starts, after the first
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(idx)]))
    return [(int(a), int(idx[a]), int(idx[b - 1]) + 1) for a, b in zip(starts, ends)]


def turned(keys: np.ndarray, turn: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """keys (N, L, Hkv, D) rotated further by ``turn`` = (cos, sin), each (..., N, D) (KeyTurns):
    (..., N, L, Hkv, D), one float32 product and sum per element whatever the leading axes, so a
    greedy run's keys for all its steps at once are each step's alone bit for bit."""
    cos, sin = turn[0][..., None, None, :], turn[1][..., None, None, :]  # (..., N, 1, 1, D)
    half = keys.shape[-1] // 2
    swapped = np.concatenate((keys[..., half:], keys[..., :half]), axis=-1)  # (x2, x1)
    return keys * cos + swapped * sin  # (x1 c - x2 s, x2 c + x1 s)


class KeyTurns:
    """cos and sin of rotations by delta positions, (N, D) float32 rows laid out for KVBuffer.rotate_keys
    ([cos, cos], [-sin, sin]; angles in float64), read from a table of 1,024 consecutive deltas that is
    computed afresh only when a delta leaves it: a row's delta grows by one per decode step."""

    SPAN = 1024

    def __init__(self, head_dim: int, theta: float):
        self.inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
        empty = np.zeros((0, head_dim), np.float32)
        self.table = (0, empty, empty)  # (first delta, cos, sin): replaced whole, so threads never mix two

    def __call__(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        low, cos, sin = self.table
        at = delta - low
        if at.min() < 0 or at.max() >= len(cos):
            low = int(delta.min())
            angles = np.arange(low, low + max(self.SPAN, int(delta.max()) - low + 1),
                               dtype=np.float64)[:, None] * self.inv_freq  # (SPAN, D/2)
            c, s = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
            cos, sin = np.concatenate((c, c), axis=1), np.concatenate((-s, s), axis=1)
            self.table, at = (low, cos, sin), delta - low
        return cos[at], sin[at]


class FrameCacheOps:
    """NumpyCacheOps that carry each row's frame offset along with its slots. ``rotary``: (head_dim,
    theta) of a model whose keys the graph rotates; None for learned positions (keys never rotated)."""

    def __init__(self, rotary: tuple[int, float] | None = None, buffered: bool = False):
        self._np = NumpyCacheOps()
        self.rotary = rotary
        self.buffered = buffered  # the backend decodes in place (KVBuffer): compactions land in one

    def take(self, past, idx):
        if self.buffered and len(idx) and idx.shape[1] and (idx == idx[:1]).all():
            # every row keeps the same slots (the sink policy's compaction): gathered straight into
            # the buffer the next decode steps write into, one copy instead of two
            return KVBuffer(past, idx.shape[1] + KVBuffer.GROW, idx[0]).views(past.frame)
        return FrameCache(self._np.take(past, idx), past.frame)

    def select(self, past, rows):
        return FrameCache(self._np.select(past, rows), past.frame[rows])

    def concat(self, pasts):
        return FrameCache(self._np.concat(pasts), np.concatenate([p.frame for p in pasts]))

    def export(self, past, idx, stream):
        """The retrieve policy's store takes evicted slots position-free: idx, stream (B, K) ordinary
        slots (window tokens, never a sink or a put-back slot: those are not evicted) and their stream
        indices -> k, v (B, K, L, Hkv, D), keys rotated back from n - frame[row], where the cache holds
        a key of stream index n, to before rotation (numpy, float64 angles: ``rotate``)."""
        k, v = self._np.export(past, idx, stream)
        return self._rotated(k, -(stream - past.frame[:, None])), v

    def splice(self, past, idx, start, k, v, positions):
        """take(idx), then slots [start, start + Z) set to k, v (B, Z, L, Hkv, D) given before rotation:
        keys rotated at ``positions`` (B, Z), the compacted positions the layout scores them at, as
        sink keys are stored at theirs (not in the row's frame: a frame move leaves them alone)."""
        return FrameCache(self._np.splice(past, idx, start, self._rotated(k, positions), v, positions), past.frame)

    def _rotated(self, k: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """k (B, Z, L, Hkv, D) each slot rotated at positions (B, Z) (a copy; k itself when unrotated)."""
        if self.rotary is None or k.size == 0:
            return k
        B, Z, L, Hkv, D = k.shape
        heads = k.transpose(0, 2, 3, 1, 4).reshape(B, L * Hkv, Z, D)  # every layer's heads share a slot's angle
        out = rotate(heads, positions, *self.rotary)
        return out.reshape(B, L, Hkv, Z, D).transpose(0, 3, 1, 2, 4)


def rotate(x: np.ndarray, positions: np.ndarray, head_dim: int, theta: float) -> np.ndarray:
    """x (B, H, S, D) rotated by rotary embedding at positions (B, S) (half-split layout, as
    ctxmem.model.apply_rope and ONNX Runtime's RotaryEmbedding): a new array of x's dtype. Angles in
    float64, so a rotation by a large offset costs no more precision than the fp32 table's own."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    angles = positions.astype(np.float64)[:, None, :, None] * inv_freq  # (B, 1, S, D/2)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    half = head_dim // 2
    x1, x2 = x[..., :half].astype(np.float32), x[..., half:].astype(np.float32)
    return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1).astype(x.dtype)


def _ort_value(array: np.ndarray):
    """An OrtValue over ``array``'s memory (no copy): what a binding writes an output into."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array)


def _sink_queries(layout) -> np.ndarray:
    """(B, T) where each new token's sink query goes: the layout's sink positions, its positions where
    it gives none (no query scores the sinks apart)."""
    return layout.positions if layout.sink_positions is None else layout.sink_positions


def _sink_shift(positions: np.ndarray, sink_positions: np.ndarray, sink_slots: np.ndarray):
    """For a decode step (one new token per row: positions, sink_positions (B, 1), positions >= 0;
    sink_slots (B, P+1)): None when it cannot take the decode branch, else the sink-scored cached
    slots to rotate for it - (rows, cols, delta) with delta the row's position minus its sink
    position, only for rows where the two differ (a `sink` row far past its window) - or () when no
    row differs. A row whose new token is itself sink-scored while the two differ cannot (its key
    would be cached at the wrong position); the layout never gives one."""
    delta = positions[:, 0] - sink_positions[:, 0]  # (B,)
    apart = delta != 0
    if not apart.any():
        return ()
    if sink_slots[apart, -1].any():
        return None
    rows, cols = np.nonzero(sink_slots[:, :-1] & apart[:, None])  # cached slots only: (N,), (N,)
    if not len(rows):  # no sink slot cached in those rows (sinks=0: a window alone): nothing to turn
        return ()
    return rows, cols, delta[rows]


def _sink_run(positions: np.ndarray, layouts: list):
    """A greedy run's sink keys (decode_greedy; layouts from ctxmem.layout.build_decode_run, with sink
    slots): (steps, (rows, cols, delta)) - the steps that keep the first step's rows scored apart, at
    most len(layouts), the first step's sink keys to turn (_sink_shift) and each step's turn of them,
    delta (steps, N): the row's position minus its sink position, as _sink_shift gives it step by step -,
    or (steps, None) where no key is to turn, or None where a row apart would cache a sink token (the
    layout never gives one). positions (B, 1): the first step's, one more each step."""
    first = _sink_shift(positions, _sink_queries(layouts[0]), layouts[0].sink_slots)
    if first is None:
        return None
    steps = len(layouts)
    delta = positions[:, 0] + np.arange(steps)[:, None] - np.stack([_sink_queries(l)[:, 0] for l in layouts])  # (steps, B)
    apart = delta != 0
    changed = np.flatnonzero((apart != apart[0]).any(axis=1))
    if len(changed):  # a row starts or stops being apart: the run ends before (the next one goes on)
        steps = int(changed[0])
    held = layouts[0].sink_slots.shape[1] - 1  # the cached slots; the run's new ones follow
    if layouts[steps - 1].sink_slots[apart[0], held:].any():
        return None
    if not first:
        return steps, None
    rows, cols, _ = first
    return steps, (rows, cols, delta[:steps, rows])


def has_decode_branch_node(model_path: str | Path) -> bool:
    """Whether the graph in ``model_path`` has the fused graph's decode branch (graph_builder's If
    named decode_or_general); reads the graph without its weights."""
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - create_session has already loaded it; be conservative
        return False
    return any(node.op_type == "If" and node.name == "decode_or_general" for node in graph.node)


class OrtBackend:
    """Runs the exported graph for ctxmem.memory.ContextMemory: numpy in, numpy out, numpy cache.

    Contract v3 (the fused graph): the cache holds keys already rotated, in a frame per row
    (FrameCache); the backend turns ctxmem.layout's positions into that frame: the new tokens at
    their stream index minus the row's offset, sink keys scored at the layout's sink positions. A
    row whose positions would leave the graph's rotation table has its offset moved and its cached
    ordinary keys rotated back by the same amount, once (numpy). Contract v2 (the traced graph):
    keys before rotation, the layout passed as it is. Contract v4 also gives each layer's queries
    (forward_with_queries), which the retrieve policy needs (``gives_queries``)."""

    def __init__(self, export_dir: str | Path, provider: str | None = None, intra_op_threads: int = 1,
                 config: RuntimeConfig | None = None, decode_session: bool = False, greedy_loop: bool = False):
        self.export_dir = Path(export_dir)
        self.config = config or RuntimeConfig.load(self.export_dir)
        self.contract = self.config.export_contract
        cfg = self.config.model_config
        self.max_seq_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.uses_rope = cfg.pos == "rope"
        self.rope_theta, self.head_dim = cfg.rope_theta, cfg.head_dim
        self.sink_token_id = cfg.sink_token_id
        self.stream_prefix = cfg.stream_prefix  # [sink token] [BOS]: ContextMemory starts every stream with it
        model_path = self.export_dir / self.config.files.get("model", MODEL_FILE)
        self.session = create_session(model_path, provider, intra_op_threads)
        check_names(self.session, self.contract, str(self.export_dir))
        self.provider = self.session.get_providers()[0]
        self.output_names = self.contract.output_names
        # what a call fetches: logits and the cache; the query outputs (v4) only when asked for
        self._fetch = self.contract.cache_output_names
        self._past_names = past_names(self.contract.n_layers)  # per call this is the hot path: no rebuilding
        self._cache_dtype = np.dtype(self.contract.cache_dtype)
        self.rotated = self.contract.keys_rotated
        # contract v3/v4 graphs take no key positions (the cache holds keys already rotated; the frame
        # comes from layout.stream): ContextMemory's decode steps leave them out of the layout
        self.reads_key_positions = not self.rotated
        self.gives_queries = self.contract.gives_queries  # the retrieve policy runs only where this holds
        rotary = (self.head_dim, self.rope_theta) if self.uses_rope else None
        self.ops = FrameCacheOps(rotary) if self.rotated else NumpyCacheOps()
        self.span = rotation_span(self.max_seq_len)
        self.name = f"onnxruntime-{self.provider.replace('ExecutionProvider', '').lower()}-{self.config.variant}"
        # decode steps in place (KVBuffer): a graph with the GroupQueryAttention branch, on CPU (the
        # buffers are host memory; on CUDA a binding of them would copy to the device and back)
        self.in_place = (self.rotated and self.provider == "CPUExecutionProvider"
                         and has_decode_branch_node(model_path))
        if self.rotated:
            self.ops.buffered = self.in_place
        # decode_session: decode steps in place run the decode branch as a session of its own (derived
        # from the graph at load) instead of the graph's If - no condition, no If per step (4-10% of a
        # batch-1 step measured), for a second session's memory (the weights are read again and
        # prepacked again: about twice the graph's resident memory)
        self._decode_session = None
        if decode_session and self.in_place:
            try:
                self._decode_session = create_decode_session(model_path, intra_op_threads)
            except Exception as err:  # noqa: BLE001 - ORT raises its own Fail/InvalidArgument/... types
                raise ExportModelError(f"the decode session asked for (decode_session=True) cannot be made from "
                                       f"{model_path} ({type(err).__name__}: {str(err).strip()[:400]}); load "
                                       "without it, or re-export") from None
        elif decode_session:
            log.info("decode_session=True has no effect here: decode steps run in place only on CPU and with a "
                     "graph that has the decode branch (%s on %s)", self.export_dir, self.provider)
        self._present_names = present_names(self.contract.n_layers)
        # greedy_loop: an all-greedy batch's next decode steps in one decode_greedy call, in place on the
        # decode branch's own session, where decode steps run in place (CPU, the branch present); that
        # session is the decode session's (decode_session=True) or made on the first call (a second copy
        # of the weights in memory, as the decode session's)
        self._greedy = bool(greedy_loop and self.in_place)
        self._greedy_session = self._decode_session  # else made on the first decode_greedy call
        self._make_greedy_session = lambda: create_decode_session(model_path, intra_op_threads)
        self._turns = KeyTurns(self.head_dim, self.rope_theta) if self.uses_rope else None
        self._local = threading.local()  # one IOBinding per thread: a binding is not shared between runs

    @property
    def greedy_loop(self) -> bool:
        """Whether decode_greedy runs (asked for and possible here)."""
        return self._greedy

    def decode_greedy(self, ids: np.ndarray, layouts: list, past):
        """Greedy decode steps in one call (ContextMemory.feed_greedy): ids (B, 1) the tokens fed first,
        ``layouts`` each step's layout (ctxmem.layout.build_decode_run), past the cache. Returns (picks
        (B, n) int64 - step i's argmax, fed to step i + 1 -, the cache after the last step, the logits
        (n, B, V)), n <= len(layouts) (fewer where the rotation table ends first), or None, with past as
        it was, where it does not run: not asked for, fewer than two steps, a step that cannot take the
        decode branch (_sink_shift), or a step with a NaN logit or a pick that is not finite (the
        sampler's guarded path decides those). Steps must not compact the cache (each sees the slots it
        was given and each new one, its layout masking those its band dropped): feed_greedy sees to it.

        The steps are in-place decode steps (KVBuffer) on the decode branch as a session of its own
        (no If: create_decode_session), with one binding for the run and nothing but the step's
        inputs written between two runs: no ContextMemory bookkeeping, layout, sampler or detokenizer
        per token. A `sink` row past its window has its sink keys turned for each step from what they
        are cached as (_decode_in_place's turn, all steps' at once: ``turned``) and put back after the run. The same
        graph and inputs as a plain decode step's, so each step's logits are bit for bit that step's
        (tests/test_export_greedy_loop.py)."""
        if not self._greedy or ids.shape[1] != 1 or not past or not past[0][0].shape[2] or len(layouts) < 2:
            return None
        frame = past.frame
        positions = (layouts[0].stream[:, -1:] - frame[:, None]).astype(np.int64, copy=False)  # (B, 1)
        steps = min(len(layouts), self.span[1] - int(positions.max()))  # each step one position on
        if positions.min() < 0 or steps < 2:
            return None
        sink = None  # (rows, cols, delta (steps, N)): the sink keys every step turns (_sink_run)
        if layouts[0].sink_slots is not None:
            run = _sink_run(positions, layouts[:steps])
            if run is None:
                return None
            steps, sink = run
            if steps < 2:
                return None
        session = self._greedy_session
        if session is None:
            session = self._greedy_session = self._make_greedy_session()
        B = ids.shape[0]
        picks = np.empty((B, steps), np.int64)
        logits = np.empty((steps, B, self.vocab_size), np.float32)
        buffer = KVBuffer.for_append(past)
        if buffer.capacity < buffer.filled + steps:  # room for every step: one binding for the run
            buffer = KVBuffer(past, past[0][0].shape[2] + steps + KVBuffer.GROW)
        binding, outs, step_ids, step_positions = self._binding(buffer, (), session)
        step_ids[...] = ids
        out = outs[0][:, 0]  # (B, V): the bound logits, written again by each step
        if sink is not None:
            rows, cols, delta = sink
            saved = buffer.keys[:, rows, :, cols]  # (N, L, Hkv, D): as cached, put back after the run
            cos, sin = self._turns(delta.ravel())  # (steps * N, D)
            keys = turned(saved, (cos.reshape(*delta.shape, -1), sin.reshape(*delta.shape, -1)))  # (steps, N, L, Hkv, D)
        try:
            for i in range(steps):
                if sink is not None:
                    buffer.keys[:, rows, :, cols] = keys[i]
                np.add(positions, i, out=step_positions)
                binding.bind_cpu_input(ALLOWED, np.ascontiguousarray(layouts[i].allowed))
                session.run_with_iobinding(binding)
                logits[i] = out
                picks[:, i] = step_ids[:, 0] = out.argmax(axis=1)
        finally:
            if sink is not None:
                buffer.put_keys(rows, cols, saved)
        chosen = np.take_along_axis(logits, picks.T[:, :, None], axis=2)  # (steps, B, 1)
        if not np.isfinite(chosen).all() or np.isnan(logits).any():  # the sampler's guarded path decides those
            return None  # past is as it was: its views end at the buffer's filled, moved only below
        buffer.filled += steps
        return picks, buffer.views(frame), logits

    @property
    def decode_session(self) -> bool:
        """Whether decode steps run on the decode branch's session of their own (asked for and made)."""
        return self._decode_session is not None

    def run(self, ids: np.ndarray, layout, past) -> list[np.ndarray]:
        """One graph call; logits and the cache in contract order (logits, present_key_0,
        present_value_0, ...; a v4 graph's query outputs are fetched by forward_with_queries only)."""
        return self.step(ids, layout, past)[0]

    def step(self, ids: np.ndarray, layout, past, extra: tuple[str, ...] = ()) -> tuple[list[np.ndarray], Any]:
        """One graph call: (logits and the presents in contract order, then the ``extra`` outputs
        asked for (query_<i>, v4); the cache to feed back: FrameCache for v3/v4, per-layer (k, v) for
        v2). ids (B, T) int64; layout: ctxmem.layout.AttentionLayout over the P+T slots; past None/[]
        (P = 0) or the cache a previous step returned."""
        logits, extras, present, outs = self._call(ids, layout, past, extra)
        if outs is None:
            outs = [logits, *(a for kv in present for a in kv), *extras]
        return outs, present

    def _call(self, ids: np.ndarray, layout, past, extra: tuple[str, ...]):
        """step's work: (logits (B, T, V), the extra outputs, the cache to feed back, and the whole
        output list when session.run made one - else None: forward never needs it)."""
        B, T = ids.shape
        if self.rotated:
            frame = past.frame if past else np.zeros(B, np.int64)
            room = None
            if past and self.uses_rope:
                past, frame, room = self._keep_in_span(layout, past, frame, T)
            positions = (layout.stream[:, -T:] - frame[:, None]).astype(np.int64, copy=False)  # (B, T), a new array
            sink_slots = layout.sink_slots
            if self.uses_rope and sink_slots is not None and frame.any() and \
                    (sink_slots[:, -T:] & (frame != 0)[:, None]).any():
                raise ValueError("a sink token arrived in a row whose key frame has moved; sinks are a stream's "
                                 "first tokens (ctxmem.layout)")
            sink_q = _sink_queries(layout)
            if self.in_place and T == 1 and past and past[0][0].shape[2] and positions.min() >= 0:
                # no slot scored apart: one query is exact for every row
                shift = () if sink_slots is None else _sink_shift(positions, sink_q, sink_slots)
                if shift is not None:
                    logits, extras, present = self._decode_in_place(ids, layout.allowed, sink_slots, positions,
                                                                    past, frame, extra, shift)
                    present.room = room
                    return logits, extras, present, None
            feed = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64),
                    ALLOWED: np.ascontiguousarray(layout.allowed), POSITIONS: positions,
                    SINK_POSITIONS: np.ascontiguousarray(sink_q, dtype=np.int64),
                    SINK_KEYS: (np.ascontiguousarray(sink_slots) if sink_slots is not None
                                else np.zeros(layout.allowed.shape[::2], bool))}
        else:
            layout = layout.with_sinks()  # the graph always takes the sink inputs
            feed = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64), ALLOWED: np.ascontiguousarray(layout.allowed),
                    POSITIONS: np.ascontiguousarray(layout.positions, dtype=np.int64),
                    KEY_POSITIONS: np.ascontiguousarray(layout.key_positions, dtype=np.int64),
                    SINK_POSITIONS: np.ascontiguousarray(layout.sink_positions, dtype=np.int64),
                    SINK_KEYS: np.ascontiguousarray(layout.sink_keys, dtype=bool)}
        if past:  # views of a KVBuffer are not contiguous: ONNX Runtime takes contiguous arrays
            arrays = [np.ascontiguousarray(a) for kv in past for a in kv]
        else:
            empty = np.zeros((B, self.contract.n_kv_heads, 0, self.contract.head_dim), self._cache_dtype)
            arrays = [empty] * len(self._past_names)
        feed.update(zip(self._past_names, arrays))
        outs = self.session.run([*self._fetch, *extra] if extra else self._fetch, feed)
        n = len(self._fetch)
        present = list(zip(outs[1:n:2], outs[2:n:2]))  # (B, Hkv, P+T, D) per layer
        if self.rotated:
            present = FrameCache(present, frame)
            present.room = room
        return outs[0], outs[n:], present, outs

    def _decode_in_place(self, ids: np.ndarray, allowed: np.ndarray, sink_slots: np.ndarray | None,
                         positions: np.ndarray, past: FrameCache, frame: np.ndarray, extra: tuple[str, ...],
                         shift: tuple) -> tuple[np.ndarray, list[np.ndarray], FrameCache]:
        """A decode step (one new token per row) on the GroupQueryAttention branch, with each layer's
        past and present bound to one KVBuffer: the op writes slot P of every row in place. ids and
        positions (B, 1) int64, allowed (B, 1, P+1), sink_slots (B, P+1) bool or None (no slot scored
        apart). What session.run gives: logits (B, 1, V), the extras, the presents (views of P+1 slots).

        Every row's query goes in at ``positions``, also as its sink query: ``shift`` (_sink_shift)
        is the sink-scored slots (rows, cols) of rows whose sink query differs from their ordinary
        one, and by how much (delta = position - sink position). Those keys are rotated by delta for
        the call (from the rotation they are cached at), so the one query scores them at the distance
        the sink query would: one scoring, the decode branch, instead of the general path's two; they
        are put back bit for bit after the call, so the cache the caller sees keeps the contract's
        meaning (sink keys at their own positions)."""
        buffer = KVBuffer.for_append(past)
        if shift:
            rows, cols, delta = shift
            saved = buffer.rotate_keys(rows, cols, self._turns(delta))
        binding, outs, step_ids, step_positions = self._binding(buffer, extra)
        # ids and positions (B, 1) go through arrays bound once per binding (their OrtValues share the
        # arrays' memory): written here, not bound again; allowed and sink_keys grow by a slot per step
        step_ids[...] = ids
        step_positions[...] = positions
        binding.bind_cpu_input(ALLOWED, np.ascontiguousarray(allowed))
        session = self._decode_session
        if session is None:  # the graph's If reads the sink inputs for its condition
            session = self.session
            binding.bind_cpu_input(SINK_KEYS, np.ascontiguousarray(sink_slots) if sink_slots is not None
                                   else np.zeros((buffer.batch, allowed.shape[2]), bool))
        try:
            session.run_with_iobinding(binding)
        finally:
            if shift:
                buffer.put_keys(rows, cols, saved)
        buffer.filled += 1
        present = buffer.views(frame)
        if extra:  # the bound arrays are written again next step; a caller may keep these
            return outs[0].copy(), [o.copy() for o in outs[1:]], present
        return outs[0].copy(), [], present

    def _binding(self, buffer: KVBuffer, extra: tuple[str, ...], session=None):
        """This thread's IOBinding of ``session`` (by default the decode session, else the graph's) for
        calls fetching ``extra`` besides logits and the cache, with every past and present bound to
        ``buffer``, logits (B, 1, V) and the extras (B, 1, H*D) bound to arrays of its own, and
        input_ids, positions and sink_positions to two (B, 1) int64 arrays of its own (the decode
        step's sink query is its ordinary one); (binding, the output arrays, the ids array, the
        positions array). One per session and ``extra``, rebound only when the buffer changes."""
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:
            bindings = self._local.bindings = {}
        if session is None:
            session = self._decode_session or self.session
        entry = bindings.get((id(session), extra))
        if entry is None or entry[1] is not buffer:
            binding = entry[0] if entry is not None else session.io_binding()
            for name, value in zip(self._past_names, buffer.values):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(self._present_names, buffer.values):
                binding.bind_ortvalue_output(name, value)
            outs = [np.empty((buffer.batch, 1, self.vocab_size), np.float32)]
            outs += [np.empty((buffer.batch, 1, self.n_heads * self.head_dim), self._cache_dtype) for _ in extra]
            for name, array in zip((LOGITS, *extra), outs):
                binding.bind_ortvalue_output(name, _ort_value(array))
            same = entry is not None and entry[3].shape[0] == buffer.batch
            step_ids, step_positions = (entry[3], entry[4]) if same else (
                np.zeros((buffer.batch, 1), np.int64), np.zeros((buffer.batch, 1), np.int64))
            if not same:  # the OrtValues read the arrays' memory; the entry keeps the arrays alive
                binding.bind_ortvalue_input(INPUT_IDS, _ort_value(step_ids))
                positions = _ort_value(step_positions)
                binding.bind_ortvalue_input(POSITIONS, positions)
                if session is self.session:  # the decode branch alone has no sink inputs
                    binding.bind_ortvalue_input(SINK_POSITIONS, positions)
            entry = bindings[(id(session), extra)] = (binding, buffer, outs, step_ids, step_positions)
        return entry[0], entry[2], entry[3], entry[4]

    def key_positions(self, layout, frame: np.ndarray) -> np.ndarray:
        """(B, S) the rotation position of each slot's cached key (v3, v4): a sink at its stream index
        and a slot put back by the retrieve policy at its compacted position (both as the layout
        scores them: its key_positions), any other slot at its stream index minus its row's frame offset."""
        sink = layout.sink_slots if layout.sink_slots is not None else np.zeros(layout.stream.shape, bool)
        return np.where(sink, layout.key_positions, layout.stream - frame[:, None])

    def _keep_in_span(self, layout, past: FrameCache, frame: np.ndarray,
                      T: int) -> tuple[FrameCache, np.ndarray, int]:
        """Rows whose new positions would reach past the rotation table get a new frame offset (the
        newest token at max_seq_len - 1, inside the v2 range) and their cached ordinary keys rotated
        back by the offset's change; sink keys do not move, nor the retrieve policy's put-back keys
        (both flagged in layout.sink_slots, both rotated at fixed positions, not in the frame). Exact up
        to one rotation's rounding, once per key: the offset moves every max_seq_len tokens at most,
        longer than a key stays cached.

        Returns the cache, the frame and the room left: how many more positions every row may advance
        before one would reach the table's end. A row's newest position grows by at most T per call,
        so while the cache's room covers T nothing is computed (the room moves with the cache)."""
        low, high = self.span
        if past.room is not None and past.room >= T:
            return past, frame, past.room - T
        newest = layout.stream[:, -T:].max(axis=1)  # (B,)
        move = newest - frame >= high
        if not move.any():
            return past, frame, int(high - 1 - (newest - frame).max())
        frame = frame.copy()
        frame[move] = newest[move] - (self.max_seq_len - 1)
        shift = frame - past.frame  # (B,) how far the frame moved; keys go back by as much
        P = past[0][0].shape[2]
        sink = layout.sink_slots[:, :P] if layout.sink_slots is not None else np.zeros((len(frame), P), bool)
        rows = np.flatnonzero(move)
        back = np.where(sink[rows], 0, -shift[rows, None])  # (R, P)
        layers = []
        for k, v in past:
            k = k.copy()
            k[rows] = rotate(k[rows], back, self.head_dim, self.rope_theta)
            layers.append((k, v))
        if (layout.stream[:, -T:] - frame[:, None]).min() < low:
            raise ValueError(f"{T} new tokens span more rotation positions than the graph's table holds "
                             f"({low}..{high}); feed them in smaller pieces")
        return FrameCache(layers, frame), frame, int(high - 1 - (newest - frame).max())

    def forward(self, ids, layout, past, last_only=True):
        logits, _, present, _ = self._call(ids, layout, past, ())
        return (logits[:, -1] if last_only else logits), present  # float32 (the contract's logits)

    def forward_with_queries(self, ids, layout, past, last_only, layer: int):
        """forward, plus layer ``layer``'s queries of the new tokens before rotation, q (B, H, T, D)
        float32 (the graph's query_<layer> output, contract v4; the retrieve policy scores with it)."""
        if not self.gives_queries:
            raise MemoryConfigError(f"{self.export_dir} is an export of contract v{self.contract.version}, whose "
                                    f"graph does not give its queries (the retrieve policy needs them): {REEXPORT}")
        logits, extras, present, _ = self._call(ids, layout, past, (query_names(self.n_layers)[layer],))
        B, T = ids.shape
        q = extras[0].reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, T, H*D) -> (B, H, T, D)
        return (logits[:, -1] if last_only else logits), present, q.astype(np.float32)


def load_onnx_generator(export_dir: str | Path, memory: MemoryConfig | None = None, provider: str | None = None,
                        intra_op_threads: int = 1, decode_session: bool = False, greedy_loop: bool = True):
    """A ctxmem Generator over ONNX Runtime on a local export directory: the core's sampler, memory
    policies and loop. The memory policy and generation defaults come from the runtime config unless
    given. For `models:/...` and `runs:/...` specs use ctxmem.export.resolve.open_onnx_generator."""
    from ctxmem.generation import Generator
    from ctxmem.sampling import GenerationConfig
    from ctxmem.tokenizer import load_tokenizer

    if isinstance(export_dir, str) and export_dir.startswith(("models:/", "runs:/")):
        raise ModelSpecError(f"{export_dir} is a registry URI; the ONNX Runtime engine loads an export directory: "
                             "resolve it first (ctxmem.export.resolve.open_onnx_generator does both)")
    export_dir = Path(export_dir)
    config = RuntimeConfig.load(export_dir)
    backend = OrtBackend(export_dir, provider=provider, intra_op_threads=intra_op_threads, config=config,
                         decode_session=decode_session, greedy_loop=greedy_loop)
    tokenizer = load_tokenizer(config.file_path(export_dir, "tokenizer"))
    mem = memory or config.memory_config
    return Generator(backend, tokenizer, mem, GenerationConfig(**config.generation))


__all__ = ["RuntimeConfig", "OrtBackend", "FrameCache", "FrameCacheOps", "rotate", "load_onnx_generator",
           "create_session", "choose_provider",
           "RUNTIME_CONFIG", "MODEL_FILE", "DATA_FILE", "TOKENIZER_FILE", "REPORT_FILE"]
