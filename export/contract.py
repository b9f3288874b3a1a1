"""The export contract: the one place that says what the ONNX graph takes and gives.

One graph serves prefill and decode. Shapes: B batch, T new tokens, P past (cached) slots,
M slots in all (= P + T), Hkv key/value heads, D head_dim, V vocab, L layers.

Version 4 (the fused graph, export/graph_builder.py) - keys cached *after* rotation, and each layer's
queries of the new tokens given out (the ``retrieve`` memory policy scores its store with one layer's):

    inputs   input_ids        int64    (B, T)         the new tokens
             positions        int64    (B, T)         rotation positions of the new tokens in their row's
                                                      key frame: the queries against ordinary keys, and
                                                      the new keys, each rotated once, when it is cached
             allowed          bool     (B, T, M)      new token i may read slot j
             sink_positions   int64    (B, T)         query rotation positions against sink keys
             sink_keys        bool     (B, M)         slots scored with sink_positions (the sink slots)
             past_key_<i>     float    (B, Hkv, P, D) keys of layer i, rotated in the row's frame
             past_value_<i>   float    (B, Hkv, P, D)
    outputs  logits           float32  (B, T, V)
             present_key_<i>  float    (B, Hkv, P+T, D)  the cache to feed back next step
             present_value_<i>
             query_<i>        float    (B, T, H*D)    layer i's queries of the new tokens before rotation
                                                      (the q projection, head h at h*D .. h*D + D - 1)

The query outputs are values the graph computes anyway (the q part of the projection): a caller
that does not fetch them (every policy but ``retrieve``) pays for nothing but their buffers.
Version 3 is version 4 without the query outputs: it runs every policy but ``retrieve``.

A row's frame is its stream index minus an offset that the runtime keeps per row (export/runtime.py):
an ordinary key stays at its rotation for good, because only distances between ordinary keys and
queries matter (ctxmem/layout.py); sink keys sit at their own stream index, the ``retrieve``
policy's put-back keys at their compacted positions (both flagged in sink_keys), and are scored
with the query rotated a second time (sink_positions). The offset moves (the cached keys re-rotated once)
only when a row's positions would leave ROTATION_SPAN, so a key is rotated once per window at most.

Version 2 (the traced graph, torch.onnx.export) caches keys *before* rotation and takes
key_positions (B, M) int64: every cached key is rotated again at every step. The runtime runs all three.

The attention layout (which slot each token reads, at which rotary positions) is computed by
ctxmem.layout for every policy, so the graph never learns the policy and the sink window has one
meaning in PyTorch and ONNX Runtime alike. M has its own dimension because torch.export cannot
declare a dimension as the sum of two others; ONNX Runtime checks M = P + T at run time.
P = 0 (the first prefill) is a valid size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

INPUT_IDS, POSITIONS, LOGITS = "input_ids", "positions", "logits"
KEY_POSITIONS, ALLOWED, SINK_POSITIONS, SINK_KEYS = "key_positions", "allowed", "sink_positions", "sink_keys"
# 4: v3 plus each layer's queries as outputs (the fused graph; the retrieve policy needs them);
# 3: keys cached after rotation, in a per-row frame; 2: keys cached before rotation, explicit layout
# with key_positions (the traced graph); 1 derived positions from a (B, M) mask
CONTRACT_VERSION = 4
TRACED_CONTRACT_VERSION = 2
QUERIES_SINCE = 4  # the first version whose graph gives the query outputs
VERSIONS = (2, 3, 4)
REEXPORT = "re-export it with `ctxmem export --model CHECKPOINT --out DIR`"
# Names of the dynamic dimensions as they appear in the ONNX graph.
BATCH, NEW_TOKENS, PAST_LEN, MASK_LEN = "batch", "new_tokens", "past_len", "mask_len"
_PER_LAYER = "per layer (key, value), each (batch, kv_heads, slots, head_dim); "
_ROTATED = (_PER_LAYER + "keys stored after rotary embedding, "
            "at their stream index minus the row's frame offset (sink keys at their stream index)")
CACHE_LAYOUT = {2: _PER_LAYER + "keys stored before rotary embedding", 3: _ROTATED, 4: _ROTATED}
# Sizes of the example the graph is traced with: distinct, and past >= 2, so that torch.export
# neither specialises a dynamic dimension to 0/1 nor merges two of them by coincidence.
EXAMPLE_BATCH, EXAMPLE_NEW, EXAMPLE_PAST = 3, 5, 7
CACHE_DTYPES = ("float32", "float16")


def rotation_span(max_seq_len: int) -> tuple[int, int]:
    """[low, high) of the rotation positions a v3 graph's table holds: the v2 range [-L, L) that
    prefill pieces need below 0, and room above it for the frame to drift before it is moved."""
    return -max_seq_len, 2 * max_seq_len


def past_names(n_layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def query_names(n_layers: int) -> list[str]:
    return [f"query_{i}" for i in range(n_layers)]


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[str | int, ...]  # str = a dynamic dimension (expression), int = fixed

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}


@dataclass(frozen=True)
class ExportContract:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    cache_dtype: str = "float32"
    version: int = CONTRACT_VERSION
    n_heads: int | None = None  # query heads: the query outputs' width (v4; older contracts need not say)

    def __post_init__(self) -> None:
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        if self.version not in VERSIONS:
            raise ValueError(f"export contract version {self.version} is not run by this ctxmem (it runs "
                             f"{', '.join(map(str, VERSIONS))}); {REEXPORT}")
        if self.gives_queries and not self.n_heads:
            raise ValueError(f"export contract version {self.version} gives query outputs and needs n_heads")

    @classmethod
    def for_model(cls, cfg, cache_dtype: str = "float32", version: int = CONTRACT_VERSION) -> "ExportContract":
        """From a ctxmem ModelConfig."""
        return cls(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size, cache_dtype, version, cfg.n_heads)

    @property
    def keys_rotated(self) -> bool:
        """True when the cache holds keys after rotation (v3, v4)."""
        return self.version >= 3

    @property
    def gives_queries(self) -> bool:
        """True when the graph gives each layer's queries before rotation (v4: query_<i>)."""
        return self.version >= QUERIES_SINCE

    # ---- the declaration -----------------------------------------------------------------
    def inputs(self) -> list[TensorDecl]:
        cache = (BATCH, self.n_kv_heads, PAST_LEN, self.head_dim)
        key_positions = [] if self.keys_rotated else [TensorDecl(KEY_POSITIONS, "int64", (BATCH, MASK_LEN))]
        return [TensorDecl(INPUT_IDS, "int64", (BATCH, NEW_TOKENS)),
                TensorDecl(POSITIONS, "int64", (BATCH, NEW_TOKENS)),
                *key_positions,
                TensorDecl(ALLOWED, "bool", (BATCH, NEW_TOKENS, MASK_LEN)),
                TensorDecl(SINK_POSITIONS, "int64", (BATCH, NEW_TOKENS)),
                TensorDecl(SINK_KEYS, "bool", (BATCH, MASK_LEN)),
                *(TensorDecl(n, self.cache_dtype, cache) for n in past_names(self.n_layers))]

    def outputs(self) -> list[TensorDecl]:
        cache = (BATCH, self.n_kv_heads, f"{PAST_LEN} + {NEW_TOKENS}", self.head_dim)
        queries = [TensorDecl(n, self.cache_dtype, (BATCH, NEW_TOKENS, self.n_heads * self.head_dim))
                   for n in query_names(self.n_layers)] if self.gives_queries else []
        return [TensorDecl(LOGITS, "float32", (BATCH, NEW_TOKENS, self.vocab_size)),
                *(TensorDecl(n, self.cache_dtype, cache) for n in present_names(self.n_layers)), *queries]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs()]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs()]

    @property
    def cache_output_names(self) -> list[str]:
        """logits and the present cache: what a call fetches unless it asks for queries too."""
        return [LOGITS, *present_names(self.n_layers)]

    def output_shapes(self, batch: int, new: int, past: int) -> dict[str, tuple[int, ...]]:
        """The concrete shape every output must have for given sizes."""
        sizes = {BATCH: batch, NEW_TOKENS: new, PAST_LEN: past, f"{PAST_LEN} + {NEW_TOKENS}": past + new}
        return {t.name: tuple(sizes[d] if isinstance(d, str) else d for d in t.dims) for t in self.outputs()}

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "cache_dtype": self.cache_dtype,
                "cache_layout": CACHE_LAYOUT[self.version], "keys_before_rotation": not self.keys_rotated,
                "version": self.version, "layout": "ctxmem.layout",
                **({"n_heads": self.n_heads} if self.n_heads else {}),
                "inputs": [t.to_dict() for t in self.inputs()], "outputs": [t.to_dict() for t in self.outputs()]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExportContract":
        return cls(int(data["n_layers"]), int(data["n_kv_heads"]), int(data["head_dim"]), int(data["vocab_size"]),
                   str(data.get("cache_dtype", "float32")), int(data.get("version", 1)),
                   int(data["n_heads"]) if data.get("n_heads") else None)

    # ---- what torch.onnx.export needs ------------------------------------------------------
    def dynamic_shapes(self) -> dict[str, Any]:
        """dynamic_shapes for torch.onnx.export(dynamo=True) over ExportWrapper's arguments (v2)."""
        from torch.export import Dim

        batch, new, past, mask = Dim(BATCH), Dim(NEW_TOKENS), Dim(PAST_LEN), Dim(MASK_LEN)
        cache = {0: batch, 2: past}
        return {"input_ids": {0: batch, 1: new}, "positions": {0: batch, 1: new},
                "key_positions": {0: batch, 1: mask}, "allowed": {0: batch, 1: new, 2: mask},
                "sink_positions": {0: batch, 1: new}, "sink_keys": {0: batch, 1: mask},
                "past": [(cache, cache) for _ in range(self.n_layers)]}

    def example_inputs(self, batch: int = EXAMPLE_BATCH, new: int = EXAMPLE_NEW, past: int = EXAMPLE_PAST):
        """The arguments of ExportWrapper.forward as torch tensors to trace with (v2): a layout where
        sinks are scored apart, so the traced graph holds both scoring paths."""
        import torch

        from ctxmem.layout import build_layout

        gen = torch.Generator().manual_seed(0)
        dtype = getattr(torch, self.cache_dtype)
        ids = torch.randint(0, self.vocab_size, (batch, new), generator=gen)
        stream = np.broadcast_to(np.arange(past + new) + 40, (batch, past + new)).copy()
        stream[:, :2] = (0, 1)  # two sinks, then a stream far past them
        layout = build_layout(stream, np.ones((batch, past + new), bool), new, sinks=2, window=past).with_sinks()
        t = torch.from_numpy
        shape = (batch, self.n_kv_heads, past, self.head_dim)
        cache = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
                 for _ in range(self.n_layers)]
        return (ids, t(layout.positions), t(layout.key_positions), t(layout.allowed), t(layout.sink_positions),
                t(layout.sink_keys), cache)


def wrap_for_export(model):
    """The ctxmem Transformer seen through the contract: flat outputs (logits, k0, v0, k1, v1, ...)."""
    import torch

    class ExportWrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

        def forward(self, input_ids, positions, key_positions, allowed, sink_positions, sink_keys, past):
            logits, presents = self.model(input_ids, positions=positions, past=[tuple(kv) for kv in past],
                                          use_cache=True, key_positions=key_positions, allowed=allowed,
                                          sink_positions=sink_positions, sink_keys=sink_keys)
            return (logits.float(), *(t for kv in presents for t in kv))

    return ExportWrapper(model).eval()
