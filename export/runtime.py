"""The ONNX Runtime side of an export: the runtime config that ships beside model.onnx, the
backend that runs the graph for ctxmem.memory, and the Generator built on it.

Serving reads the runtime config and never guesses: window, sinks, policy, special tokens, chat
template, cache layout and where the model came from are all written there by `ctxmem export`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, ValidationError, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from ctxmem.config import ConfigError, ModelConfig
from ctxmem.memory import MemoryConfig, MemoryConfigError, NumpyCacheOps

from .contract import (ALLOWED, INPUT_IDS, KEY_POSITIONS, POSITIONS, REEXPORT, SINK_KEYS, SINK_POSITIONS,
                       ExportContract, past_names, query_names, rotation_span)
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
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # one thread per replica by default: replicas scale out
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
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
    n - frame[row], a sink key at n. Iterates as the (k, v) list every other cache is."""

    def __init__(self, layers, frame: np.ndarray):
        super().__init__(layers)
        self.frame = frame


class FrameCacheOps:
    """NumpyCacheOps that carry each row's frame offset along with its slots. ``rotary``: (head_dim,
    theta) of a model whose keys the graph rotates; None for learned positions (keys never rotated)."""

    def __init__(self, rotary: tuple[int, float] | None = None):
        self._np = NumpyCacheOps()
        self.rotary = rotary

    def take(self, past, idx):
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
                 config: RuntimeConfig | None = None):
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
        self.session = create_session(self.export_dir / self.config.files.get("model", MODEL_FILE), provider,
                                      intra_op_threads)
        check_names(self.session, self.contract, str(self.export_dir))
        self.provider = self.session.get_providers()[0]
        self.output_names = self.contract.output_names
        # what a call fetches: logits and the cache; the query outputs (v4) only when asked for
        self._fetch = self.contract.cache_output_names
        self._past_names = past_names(self.contract.n_layers)  # per call this is the hot path: no rebuilding
        self._cache_dtype = np.dtype(self.contract.cache_dtype)
        self.rotated = self.contract.keys_rotated
        self.gives_queries = self.contract.gives_queries  # the retrieve policy runs only where this holds
        rotary = (self.head_dim, self.rope_theta) if self.uses_rope else None
        self.ops = FrameCacheOps(rotary) if self.rotated else NumpyCacheOps()
        self.span = rotation_span(self.max_seq_len)
        self.name = f"onnxruntime-{self.provider.replace('ExecutionProvider', '').lower()}-{self.config.variant}"

    def run(self, ids: np.ndarray, layout, past) -> list[np.ndarray]:
        """One graph call; logits and the cache in contract order (logits, present_key_0,
        present_value_0, ...; a v4 graph's query outputs are fetched by forward_with_queries only)."""
        return self.step(ids, layout, past)[0]

    def step(self, ids: np.ndarray, layout, past, extra: tuple[str, ...] = ()) -> tuple[list[np.ndarray], Any]:
        """One graph call: (logits and the presents in contract order, then the ``extra`` outputs
        asked for (query_<i>, v4); the cache to feed back: FrameCache for v3/v4, per-layer (k, v) for
        v2). ids (B, T) int64; layout: ctxmem.layout.AttentionLayout over the P+T slots; past None/[]
        (P = 0) or the cache a previous step returned."""
        B, T = ids.shape
        feed = {INPUT_IDS: np.ascontiguousarray(ids, dtype=np.int64), ALLOWED: np.ascontiguousarray(layout.allowed)}
        if self.rotated:
            frame = past.frame if past else np.zeros(B, np.int64)
            if past and self.uses_rope:
                past, frame = self._keep_in_span(layout, past, frame, T)
            feed[POSITIONS] = (layout.stream[:, -T:] - frame[:, None]).astype(np.int64)
            sink_q = layout.positions if layout.sink_positions is None else layout.sink_positions
            feed[SINK_POSITIONS] = np.ascontiguousarray(sink_q, dtype=np.int64)
            feed[SINK_KEYS] = (np.ascontiguousarray(layout.sink_slots) if layout.sink_slots is not None
                               else np.zeros(layout.allowed.shape[::2], bool))
            if self.uses_rope and layout.sink_slots is not None and frame.any() and \
                    (layout.sink_slots[:, -T:] & (frame != 0)[:, None]).any():
                raise ValueError("a sink token arrived in a row whose key frame has moved; sinks are a stream's "
                                 "first tokens (ctxmem.layout)")
        else:
            layout = layout.with_sinks()  # the graph always takes the sink inputs
            feed.update({POSITIONS: np.ascontiguousarray(layout.positions, dtype=np.int64),
                         KEY_POSITIONS: np.ascontiguousarray(layout.key_positions, dtype=np.int64),
                         SINK_POSITIONS: np.ascontiguousarray(layout.sink_positions, dtype=np.int64),
                         SINK_KEYS: np.ascontiguousarray(layout.sink_keys, dtype=bool)})
        if past:
            arrays = [a for kv in past for a in kv]
        else:
            empty = np.zeros((B, self.contract.n_kv_heads, 0, self.contract.head_dim), self._cache_dtype)
            arrays = [empty] * len(self._past_names)
        feed.update(zip(self._past_names, arrays))
        outs = self.session.run([*self._fetch, *extra] if extra else self._fetch, feed)
        n = len(self._fetch)
        present = list(zip(outs[1:n:2], outs[2:n:2]))  # (B, Hkv, P+T, D) per layer
        return outs, (FrameCache(present, frame) if self.rotated else present)

    def key_positions(self, layout, frame: np.ndarray) -> np.ndarray:
        """(B, S) the rotation position of each slot's cached key (v3, v4): a sink at its stream index
        and a slot put back by the retrieve policy at its compacted position (both as the layout
        scores them: its key_positions), any other slot at its stream index minus its row's frame offset."""
        sink = layout.sink_slots if layout.sink_slots is not None else np.zeros(layout.stream.shape, bool)
        return np.where(sink, layout.key_positions, layout.stream - frame[:, None])

    def _keep_in_span(self, layout, past: FrameCache, frame: np.ndarray, T: int) -> tuple[FrameCache, np.ndarray]:
        """Rows whose new positions would reach past the rotation table get a new frame offset (the
        newest token at max_seq_len - 1, inside the v2 range) and their cached ordinary keys rotated
        back by the offset's change; sink keys do not move, nor the retrieve policy's put-back keys
        (both flagged in layout.sink_slots, both rotated at fixed positions, not in the frame). Exact up
        to one rotation's rounding, once per key: the offset moves every max_seq_len tokens at most,
        longer than a key stays cached."""
        low, high = self.span
        newest = layout.stream[:, -T:].max(axis=1)  # (B,)
        move = newest - frame >= high
        if not move.any():
            return past, frame
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
        return FrameCache(layers, frame), frame

    def forward(self, ids, layout, past, last_only=True):
        outs, present = self.step(ids, layout, past)
        logits = outs[0][:, -1] if last_only else outs[0]
        return np.asarray(logits, dtype=np.float32), present

    def forward_with_queries(self, ids, layout, past, last_only, layer: int):
        """forward, plus layer ``layer``'s queries of the new tokens before rotation, q (B, H, T, D)
        float32 (the graph's query_<layer> output, contract v4; the retrieve policy scores with it)."""
        if not self.gives_queries:
            raise MemoryConfigError(f"{self.export_dir} is an export of contract v{self.contract.version}, whose "
                                    f"graph does not give its queries (the retrieve policy needs them): {REEXPORT}")
        outs, present = self.step(ids, layout, past, (query_names(self.n_layers)[layer],))
        logits = outs[0][:, -1] if last_only else outs[0]
        B, T = ids.shape
        q = outs[-1].reshape(B, T, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, T, H*D) -> (B, H, T, D)
        return np.asarray(logits, dtype=np.float32), present, q.astype(np.float32)


def load_onnx_generator(export_dir: str | Path, memory: MemoryConfig | None = None, provider: str | None = None,
                        intra_op_threads: int = 1):
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
    backend = OrtBackend(export_dir, provider=provider, intra_op_threads=intra_op_threads, config=config)
    tokenizer = load_tokenizer(config.file_path(export_dir, "tokenizer"))
    mem = memory or config.memory_config
    return Generator(backend, tokenizer, mem, GenerationConfig(**config.generation))


__all__ = ["RuntimeConfig", "OrtBackend", "FrameCache", "FrameCacheOps", "rotate", "load_onnx_generator",
           "create_session", "choose_provider",
           "RUNTIME_CONFIG", "MODEL_FILE", "DATA_FILE", "TOKENIZER_FILE", "REPORT_FILE"]
