"""Context-memory policies: what the KV cache keeps when a stream outgrows the window.

The seed article's loop asks "is the input too long?". Each policy answers it explicitly:

* ``full``      - the ordinary cache. Past the model's context it raises ContextOverflowError.
* ``sink``      - StreamingLLM (Xiao et al. 2023, arXiv:2309.17453). Token n of a stream attends to
                  the first ``sinks`` tokens of its stream and the ``window`` most recent tokens up to
                  and including itself, with positions given by rank within that visible set; the
                  middle is evicted. Keys are cached before rotation (PyTorch) or rotated once in a
                  per-row frame that keeps every distance (the ONNX export), so the rotary positions
                  stay bounded and the cost per token stays constant however long the stream. This
                  meaning holds whatever the piecing: prefill in pieces of any size, left-padded batch
                  rows, a cached session or a rebuild from the whole history (ctxmem.layout).
* ``retrieve``  - ``sink``, plus what the window evicted kept in a bounded per-stream store and its
                  most relevant blocks put back between the sinks and the window at compacted
                  positions, chosen afresh every ``every`` tokens past the window (ctxmem.retrieval
                  has the exact meaning, the store's bound and its drop rule).
* ``recompute`` - when a row's window is full it drops its oldest ``chunk`` tokens and re-runs prefill
                  over what it keeps (works for absolute positions too); each row evicts on its own,
                  so a request's output never depends on its batch neighbours. ``chunk=1`` is the
                  paper's "sliding window with re-computation" baseline.

The bookkeeping (which slots to keep, which positions to give) is numpy over the slot mask, and
the cache itself is touched only through a backend's ``CacheOps`` - so the PyTorch and the ONNX
Runtime paths run this same code. Shapes: B rows, S slots, T new tokens, K kept slots.

Invariant of a ``sink`` row: its valid slots are its first ``sinks`` stream tokens followed by a
contiguous run of its most recent tokens, so each slot's stream index follows from the mask and the
count of tokens ever fed (``_stream_positions``); a decode step appends the new slot's to those of
the previous step (``MemoryState.carry``) instead of recomputing them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import numpy as np

from .layout import AttentionLayout, build_decode_layout, build_decode_run, build_layout
from .retrieval import RetrievalSettings, StreamStore

POLICIES = ("full", "sink", "recompute", "retrieve")
RETRIEVAL_KEYS = ("budget", "block", "store", "layer", "queries", "every")


class ContextOverflowError(ValueError):
    """The ``full`` policy was asked to hold more tokens than the model's context."""


class MemoryConfigError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryConfig:
    policy: str = "full"
    window: int | None = None  # sink: recent tokens kept; recompute: tokens kept in all. None = derive from context
    sinks: int = 4  # sink: first tokens always kept (the "attention sinks")
    chunk: int = 1  # recompute: tokens dropped at a time
    # retrieve (ctxmem.retrieval): evicted tokens put back at most, in blocks of `block`; the store's
    # bound in tokens (a multiple of `block`); the layer whose queries choose (None: half way up,
    # layer n_layers // 2, the best on bench/probe_retrieval.py's recall model); queries averaged;
    # the choice is refreshed at stream indices that are multiples of `every` (8: recall-small's
    # recall at 4x / 16x the window, 32 facts: every=1 1.00 / 0.75 (it re-chooses inside the answer),
    # 4 and 8 1.00 / 0.94, 16 0.94 / 0.88; a prompt is fed in pieces of `every`, ~3x faster than 1)
    budget: int = 32
    block: int = 16
    store: int = 2048
    layer: int | None = None
    queries: int = 12
    every: int = 8

    def resolve(self, max_seq_len: int, uses_rope: bool = True) -> "MemoryConfig":
        """Validate against a model and fill in the default window."""
        if self.policy not in POLICIES:
            raise MemoryConfigError(f"unknown memory policy {self.policy!r}; choose one of {POLICIES}")
        if self.policy == "full":
            return replace(self, window=max_seq_len, sinks=0)
        if self.policy in ("sink", "retrieve"):
            if not uses_rope:
                raise MemoryConfigError(f"the {self.policy} policy re-assigns positions inside the cache, which needs "
                                        "rotary positions; this model has learned absolute positions - use --policy "
                                        "recompute")
            if self.sinks < 0:
                raise MemoryConfigError(f"sinks must be >= 0, got {self.sinks}")
            extra = self.budget if self.policy == "retrieve" else 0
            if self.policy == "retrieve":
                self._check_retrieval()
            window = self.window if self.window is not None else max_seq_len - self.sinks - extra
            if window < 1 or window + self.sinks + extra > max_seq_len:
                what = f"sinks ({self.sinks}) + window ({window})" + (f" + budget ({extra})" if extra else "")
                raise MemoryConfigError(f"{what} must be between 1 and the model's context ({max_seq_len}): "
                                        "positions inside the cache may not exceed it")
            return replace(self, window=window)
        window = self.window if self.window is not None else max_seq_len
        if not 2 <= window <= max_seq_len:
            raise MemoryConfigError(f"recompute window must be in [2, {max_seq_len}] (the model's context), got {window}")
        if not 1 <= self.chunk < window:
            raise MemoryConfigError(f"recompute chunk must be in [1, window), got {self.chunk}")
        return replace(self, window=window, sinks=0)

    def _check_retrieval(self) -> None:
        if self.budget < 0:
            raise MemoryConfigError(f"budget (tokens put back) must be >= 0, got {self.budget}")
        if self.block < 1:
            raise MemoryConfigError(f"block must be >= 1, got {self.block}")
        if self.store < self.block or self.store % self.block:
            raise MemoryConfigError(f"store ({self.store} tokens) must be a positive multiple of block ({self.block})")
        if self.queries < 1:
            raise MemoryConfigError(f"queries must be >= 1, got {self.queries}")
        if self.every < 1:
            raise MemoryConfigError(f"every must be >= 1, got {self.every}")
        if self.layer is not None and self.layer < 0:
            raise MemoryConfigError(f"layer must be >= 0, got {self.layer}")

    def with_overrides(self, max_seq_len: int, uses_rope: bool = True, **given: Any) -> "MemoryConfig":
        """This config (usually the one an artifact saved) with a caller's overrides, resolved.

        The one override path of the project: the CLI, the MLflow pyfunc and the server all call it.
        ``None`` means "not set" (keep this config's value); 0 is a value (``sinks=0`` = window only).
        A different ``policy`` starts from that policy's defaults, not from this config's numbers.
        Setting only ``sinks`` (or only ``window``) re-derives the other: this config's value when it
        still fits the model's context, else the most that fits. Raises MemoryConfigError."""
        known = ("policy", "window", "sinks", "chunk") + RETRIEVAL_KEYS
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise MemoryConfigError(f"unknown memory settings {unknown}; known: {', '.join(known)}")
        given = {k: v for k, v in given.items() if v is not None}
        for key, value in given.items():
            if key != "policy" and (not isinstance(value, int) or isinstance(value, bool)):
                raise MemoryConfigError(f"{key} must be an integer, got {value!r}")
        policy = given.pop("policy", self.policy)
        if policy == "full" and given:
            raise MemoryConfigError(f"policy 'full' keeps every token and takes no {sorted(given)}; to bound "
                                    "the memory choose policy 'sink' (or 'recompute') as well")
        stray = sorted(set(given) & set(RETRIEVAL_KEYS)) if policy != "retrieve" else []
        if stray:
            raise MemoryConfigError(f"{stray} set the retrieve policy's store and put-back; the policy here is "
                                    f"{policy!r}: choose policy 'retrieve' as well")
        start = self if policy == self.policy else MemoryConfig(policy=policy)
        if policy in ("sink", "retrieve"):
            extra = given.get("budget", start.budget) if policy == "retrieve" else 0
            if ("sinks" in given or "budget" in given) and "window" not in given and start.window is not None:
                given["window"] = min(start.window, max_seq_len - given.get("sinks", start.sinks) - extra)
            if "window" in given and "sinks" not in given:
                given["sinks"] = max(0, min(start.sinks, max_seq_len - given["window"] - extra))
        if policy == "recompute" and "window" in given and "chunk" not in given:
            given["chunk"] = max(1, min(start.chunk, given["window"] - 1))
        return replace(start, policy=policy, **given).resolve(max_seq_len, uses_rope)

    @property
    def capacity(self) -> int:
        """Most valid tokens the cache holds at once (after resolve)."""
        if self.policy == "retrieve":
            return self.window + self.sinks + self.budget
        return self.window + (self.sinks if self.policy == "sink" else 0)

    def to_dict(self) -> dict[str, Any]:
        out = {"policy": self.policy, "window": self.window, "sinks": self.sinks, "chunk": self.chunk}
        if self.policy == "retrieve":
            out.update({k: getattr(self, k) for k in RETRIEVAL_KEYS})
        return out


class CacheOps(Protocol):
    """Array operations a backend gives the memory; ``past`` is a per-layer list of (k, v) (B, Hkv, S, D)."""

    def take(self, past: Any, idx: np.ndarray) -> Any: ...  # idx (B, K) slots per row
    def select(self, past: Any, rows: np.ndarray) -> Any: ...  # rows (B',)
    def concat(self, pasts: Sequence[Any]) -> Any: ...  # along batch; equal S
    # retrieve only: slots out as position-free numpy, and slots in at chosen rotary positions
    def export(self, past: Any, idx: np.ndarray, stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    #   idx, stream (B, K): slots and their stream indices -> k, v (B, K, L, Hkv, D), keys before rotation
    def splice(self, past: Any, idx: np.ndarray, start: int, k: np.ndarray, v: np.ndarray,
               positions: np.ndarray) -> Any: ...
    #   take(idx) with slots [start, start + Z) replaced by k, v (B, Z, L, Hkv, D), keys scored at
    #   positions (B, Z) (a cache that stores rotated keys rotates them there)


class Backend(Protocol):
    """A model runtime (PyTorch, ONNX Runtime) seen from the memory and the generation loop."""

    max_seq_len: int
    vocab_size: int
    uses_rope: bool
    ops: CacheOps

    def forward(self, ids: np.ndarray, layout: AttentionLayout, past: Any,
                last_only: bool) -> tuple[np.ndarray, Any]:
        """ids (B, T) int64; layout for the S+T slots (ctxmem.layout); past None or S slots.
        Returns logits float32 (B, V) if last_only else (B, T, V), and the cache of S+T slots."""
        ...

    # retrieve only, on a backend whose ``gives_queries`` is True (others cannot run that policy):
    # def forward_with_queries(self, ids, layout, past, last_only, layer) -> (logits, past, q)
    #   as forward, plus layer `layer`'s queries of the new tokens before rotation, q (B, H, T, D) float32


@dataclass
class MemoryState:
    """One batch of sequences in the cache. ``tokens`` mirrors the slots (needed by recompute)."""

    past: Any = None
    mask: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), dtype=bool))  # (B, S)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), dtype=np.int64))  # (B, S)
    evicted: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # (B,)
    seen: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # (B,) tokens ever fed
    # retrieve only: (B, S) stream index of each slot put back from the store, -1 elsewhere (None: no
    # such slot), and each row's store (ctxmem.retrieval.StreamStore)
    pinned: np.ndarray | None = None
    stores: list[StreamStore] | None = None
    # full, sink: what the last forward knew of `mask` - (that mask, each slot's stream position (B, S) as
    # ContextMemory._stream_positions gives it on the valid slots, each row's valid slots (B,)) - so a
    # decode step appends one column instead of a cumsum over (B, S). Used only while `mask` is that same
    # array: every change of the mask makes a new array (the memory never writes one in place). select,
    # merge and the compactions (_take) hand it on: rows and valid slots keep their positions.
    carry: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, batch: int) -> "MemoryState":
        return cls(None, np.zeros((batch, 0), bool), np.zeros((batch, 0), np.int64),
                   np.zeros(batch, np.int64), np.zeros(batch, np.int64))

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def slots(self) -> int:
        return self.mask.shape[1]

    def lengths(self) -> np.ndarray:
        """Valid tokens per row held in place (B,): slots put back from a store are not counted."""
        return self.in_place().sum(axis=1)

    def in_place(self) -> np.ndarray:
        """(B, S) the valid slots that are not copies put back from a store."""
        return self.mask if self.pinned is None else self.mask & (self.pinned < 0)

    def pins(self) -> np.ndarray:
        """(B, S) pinned, -1 where nothing is put back."""
        return np.full(self.mask.shape, -1, np.int64) if self.pinned is None else self.pinned

    def kept_tokens(self, row: int) -> list[int]:
        return self.tokens[row][self.mask[row]].tolist()


def stream_prefix(backend: Any) -> tuple[int, ...]:
    """A backend's stream prefix (ModelConfig.stream_prefix); a backend that only names a sink token
    (``sink_token_id``) has that alone."""
    prefix = getattr(backend, "stream_prefix", None)
    if prefix is not None:
        return tuple(int(t) for t in prefix)
    sink = getattr(backend, "sink_token_id", None)
    return () if sink is None else (int(sink),)


def left_pad(rows: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ids (B, T) and valid (B, T), padded on the left so every row ends at column T-1."""
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    valid = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = np.asarray(r, dtype=np.int64)
            valid[i, width - len(r):] = True
    return ids, valid


def keep_first_and_last(mask: np.ndarray, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the slots of the first ``first`` and last ``last`` valid tokens, in slot order.

    mask (B, S) -> idx (B, K), kept (B, K); rows keeping fewer are left-padded (idx 0, kept False)."""
    return packed_slots(first_and_last_mask(mask, first, last))


def first_and_last_mask(mask: np.ndarray, first: int, last: int) -> np.ndarray:
    """mask (B, S) -> (B, S): the valid slots among each row's first ``first`` and last ``last``
    valid tokens (every valid slot of a row holding no more than first + last)."""
    rank = np.cumsum(mask, axis=1)  # 1-based rank of each valid slot in its row
    from_end = (rank[:, -1:] if mask.shape[1] else rank) - last  # ranks above this are the last `last`
    return mask & ((rank <= first) | (rank > from_end))


def packed_slots(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mask (B, S) -> idx (B, K), kept (B, K): each row's valid slots in slot order, left-padded
    (idx 0, kept False) to K, the most any row holds. One vectorised pass: decoding calls it often."""
    counts = mask.sum(axis=1)
    width = int(counts.max(initial=0))
    rows, cols = np.nonzero(mask)  # row-major: each row's slots in order
    # the j-th valid slot of row r goes to column width - counts[r] + j
    where = width - counts[rows] + (np.cumsum(mask, axis=1)[rows, cols] - 1)
    idx = np.zeros((mask.shape[0], width), dtype=np.int64)
    kept = np.zeros((mask.shape[0], width), dtype=bool)
    idx[rows, where] = cols
    kept[rows, where] = True
    return idx, kept


def default_slack(capacity: int) -> int:
    """The masked slots a `sink` cache of ``capacity`` (sinks + window) slots carries before it is
    compacted: at least 8, half the capacity up to 64 (capacity 128: a small cache carries at most 1.5x
    its slots), capacity / 16 past 1,024 (a large one copies itself once per 1/16 of its slots)."""
    return max(8, min(64, capacity // 2), capacity // 16)


class ContextMemory:
    """Feeds tokens through a backend under one policy; the only place eviction happens."""

    def __init__(self, backend: Backend, config: MemoryConfig = MemoryConfig(), slack: int | None = None,
                 piece: int | None = None):
        self.backend = backend
        self.config = config.resolve(backend.max_seq_len, backend.uses_rope)
        self.retrieval = self._retrieval_settings(backend) if self.config.policy == "retrieve" else None
        self.sink_token: int | None = getattr(backend, "sink_token_id", None)
        self.prefix: tuple[int, ...] = stream_prefix(backend)
        # a backend that caches keys already rotated declares it never reads the layout's key
        # positions (reads_key_positions False): decode steps then skip building them (B, S)
        self.key_positions: bool = getattr(backend, "reads_key_positions", True)
        # masked (evicted) slots the sink cache may carry before it is compacted: a compaction copies
        # the cache and ends a greedy run, whose first graph steps after it run slower (measured at
        # capacity 128, 1,000 tokens past the window: slack 64 1.13x faster than slack 8 at batch 1,
        # 1.09x at batch 8; 128 slower than 64); the masked slots cost attention: default_slack
        self.slack = slack if slack is not None else default_slack(self.config.capacity)
        # prefill piece: any size gives the same result under `sink` (exact banding); it bounds the
        # (T, S) score matrices, S = sinks + window - 1 + T. 256 measured best for a 4x-window prompt
        # (bench/bench_memory.py: 512 and 128 were slower). recompute must leave room for its window.
        if self.config.policy == "recompute":
            self.piece = max(1, self.config.window - self.config.chunk)
        else:
            self.piece = piece if piece is not None else max(64, min(self.config.window, 256))

    def _retrieval_settings(self, backend) -> RetrievalSettings:
        cfg = self.config
        if not getattr(backend, "gives_queries", False):
            raise MemoryConfigError(f"the retrieve policy chooses with a layer's queries, which backend "
                                    f"{getattr(backend, 'name', type(backend).__name__)} does not give (an export "
                                    "made before the policy existed: re-export it with `ctxmem export`)")
        layers = int(backend.n_layers)
        layer = cfg.layer if cfg.layer is not None else layers // 2
        if not 0 <= layer < layers:
            raise MemoryConfigError(f"layer {layer} does not exist: the model has layers 0..{layers - 1}")
        return RetrievalSettings(budget=cfg.budget, block=cfg.block, store=cfg.store, layer=layer,
                                 queries=cfg.queries, every=cfg.every, sinks=cfg.sinks)

    # ---- public -----------------------------------------------------------------------------
    def start(self, batch: int = 1) -> MemoryState:
        return MemoryState.empty(batch)

    def feed(self, state: MemoryState, rows: Sequence[Sequence[int]] | np.ndarray,
             valid: np.ndarray | None = None, all_logits: bool = False) -> np.ndarray:
        """Append tokens to every row (rows of different lengths are left-padded) and return the
        logits after each row's last token, float32 (B, V) - or, with ``all_logits``, after every
        fed column, float32 (B, T, V) (padding columns hold meaningless values). Evicts first when
        the policy says so."""
        if isinstance(rows, np.ndarray):
            # no copies when the types are right already: the memory only reads what it is fed
            ids = np.asarray(rows, dtype=np.int64)
            valid = np.ones(ids.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        else:
            if len(rows) != state.batch:
                raise ValueError(f"fed {len(rows)} rows to a state of {state.batch}")
            ids, valid = left_pad(rows)
        if ids.shape[1] == 0:
            raise ValueError("nothing to feed: every row is empty")
        if not self.prefix or state.seen.all():  # no row starts its stream now (one check while decoding)
            return self._feed(state, ids, valid, all_logits)
        starts = (state.seen == 0) & valid.any(axis=1)
        if not starts.any():
            return self._feed(state, ids, valid, all_logits)
        # a model sees its stream prefix (ModelConfig.stream_prefix: the sink token, BOS) first in every
        # stream, as in training: rows starting now get it prepended; the prefix's own logits are dropped
        rows = [(self.prefix_for(ids[r][valid[r]]) if starts[r] else []) + ids[r][valid[r]].tolist()
                for r in range(len(ids))]
        wide, wide_valid = left_pad(rows)
        out = self._feed(state, wide, wide_valid, all_logits)
        return out[:, -ids.shape[1]:] if all_logits else out

    def _feed(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray, all_logits: bool) -> np.ndarray:
        """feed() after the input is (B, T) ids with their valid mask."""
        cfg = self.config
        if cfg.policy == "full":
            # a row needs at most the slots held plus the columns fed: only a cache that close to the
            # capacity counts (a decode step inside the context skips the per-row sums)
            need = state.lengths() + valid.sum(axis=1) if state.slots + ids.shape[1] > cfg.capacity else None
            if need is not None and need.max() > cfg.capacity:
                raise ContextOverflowError(
                    f"{int(need.max())} tokens do not fit the model's context of {cfg.capacity} under the 'full' "
                    "policy; shorten the input, lower max_new_tokens, or choose policy 'sink' (attention sinks + "
                    "rolling window, constant cost per token) or 'recompute' (re-prefill a sliding window)")
            return self._forward(state, ids, valid, last_only=not all_logits)
        if cfg.policy == "retrieve":
            return self._feed_retrieve(state, ids, valid, all_logits)
        if cfg.policy == "recompute" and state.batch > 1 and ids.shape[1] > 1 and \
                (state.lengths() + valid.sum(axis=1) > cfg.window).any():
            return self._feed_rows_alone(state, ids, valid, all_logits)
        logits, every = None, []
        for start in range(0, ids.shape[1], self.piece):
            part_ids, part_valid = ids[:, start:start + self.piece], valid[:, start:start + self.piece]
            self._make_room(state, part_valid)
            step_logits = self._forward(state, part_ids, part_valid, last_only=not all_logits)
            if cfg.policy == "sink" and part_ids.shape[1] > 1:
                # what the last token's window no longer holds; after one token per row there is none:
                # _make_room left each row at most sinks + window - 1 tokens, and one more fits the window
                self._evict(state, cfg.window)
            if all_logits:
                every.append(step_logits)
                continue
            # a row whose piece is all padding keeps the logits it had (the first piece: nothing to keep)
            logits = step_logits if logits is None else np.where(part_valid.any(axis=1)[:, None], step_logits, logits)
        return np.concatenate(every, axis=1) if all_logits else logits

    def _feed_retrieve(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray, all_logits: bool) -> np.ndarray:
        """retrieve: pieces as under sink, but cut at each row's refresh points (ctxmem.retrieval), where
        the row chooses what to put back; after each piece the evicted tokens go to the stores and the
        new tokens' queries are remembered."""
        cfg = self.config
        if state.stores is None:
            state.stores = [None] * state.batch
        state.stores = [s if s is not None else StreamStore(self.retrieval) for s in state.stores]
        index = state.seen[:, None] + np.cumsum(valid, axis=1) - 1  # (B, T) stream index of each new token
        refresh = valid & (index >= cfg.sinks + cfg.window) & (index % self.retrieval.every == 0)  # (B, T)
        cuts = np.flatnonzero(refresh.any(axis=0))
        logits, every, col, T = None, [], 0, ids.shape[1]
        while col < T:
            later = cuts[cuts > col]
            step = min(self.piece, (int(later[0]) if len(later) else T) - col)
            part_ids, part_valid = ids[:, col:col + step], valid[:, col:col + step]
            self._make_room(state, part_valid)
            if refresh[:, col].any():
                self._put_back(state, refresh[:, col])
            step_logits, queries = self._forward(state, part_ids, part_valid, last_only=not all_logits, queries=True)
            self._evict(state, cfg.window)
            for r in range(state.batch):
                cols = np.flatnonzero(part_valid[r])
                if len(cols):
                    state.stores[r].remember(queries[r][:, cols].transpose(1, 0, 2))  # (T', H, D)
            if all_logits:
                every.append(step_logits)
            else:
                has = part_valid.any(axis=1)
                logits = step_logits if logits is None else np.where(has[:, None], step_logits, logits)
            col += step
        return np.concatenate(every, axis=1) if all_logits else logits

    def _put_back(self, state: MemoryState, fed: np.ndarray) -> None:
        """Before a piece: each row at a refresh point (fed (B,) bool) chooses its blocks; if any row's
        choice changed, the cache is rebuilt as [sinks][put back][the rest], the put-back zone right-
        aligned per row, its keys at compacted positions sinks, sinks + 1, ... (ctxmem.retrieval)."""
        cfg = self.config
        stores = state.stores
        changed = False
        for r, s in enumerate(stores):
            if s is not None and fed[r]:
                choice = s.choose()
                if choice != s.chosen:  # what was put back is copied out now: a row that does not choose
                    s.chosen, s.put = choice, (s.gather(choice) if choice else None)  # again keeps exactly it
                    changed = True
        if not changed:
            return
        in_place = state.in_place()
        stream = self._stream_positions(state.mask, state.seen, state.pinned)
        sink_part = in_place & (stream < cfg.sinks)
        idx_s, kept_s = packed_slots(sink_part)
        idx_r, kept_r = packed_slots(in_place & ~sink_part)
        got = [s.put if s is not None else None for s in stores]
        Z = max((len(g[0]) for g in got if g is not None), default=0)
        some = next(s for s in stores if s is not None and s.k is not None)  # a change needs stored tokens
        L, Hkv, D = some.k.shape[1:]
        zk = np.zeros((state.batch, Z, L, Hkv, D), some.k.dtype)
        zv = np.zeros_like(zk)
        zpos = np.zeros((state.batch, Z), np.int64)
        zpin = np.full((state.batch, Z), -1, np.int64)
        ztok = np.zeros((state.batch, Z), np.int64)
        for r, g in enumerate(got):
            if g is None or not len(g[0]):
                continue
            t, k, v, tok = g
            n = len(t)
            zk[r, Z - n:], zv[r, Z - n:], zpin[r, Z - n:], ztok[r, Z - n:] = k, v, t, tok
            zpos[r, Z - n:] = cfg.sinks + np.arange(n)
        idx = np.concatenate((idx_s, np.zeros((state.batch, Z), np.int64), idx_r), axis=1)
        state.past = self.backend.ops.splice(state.past, idx, idx_s.shape[1], zk, zv, zpos)
        state.mask = np.concatenate((kept_s, zpin >= 0, kept_r), axis=1)
        state.tokens = np.concatenate((np.take_along_axis(state.tokens, idx_s, axis=1), ztok,
                                       np.take_along_axis(state.tokens, idx_r, axis=1)), axis=1)
        state.pinned = np.concatenate((np.full(idx_s.shape, -1), zpin, np.full(idx_r.shape, -1)), axis=1)

    def _store_evicted(self, state: MemoryState, gone: np.ndarray) -> None:
        """gone (B, S): slots evicted now (still in the cache) -> each row's store, position-free."""
        idx, kept = packed_slots(gone)
        if not kept.any():
            return
        stream = np.take_along_axis(self._stream_positions(state.mask, state.seen, state.pinned), idx, axis=1)
        tokens = np.take_along_axis(state.tokens, idx, axis=1)
        k, v = self.backend.ops.export(state.past, idx, stream)  # (B, K, L, Hkv, D)
        for r in np.flatnonzero(kept.any(axis=1)):
            if state.stores[r] is None:
                state.stores[r] = StreamStore(self.retrieval)
            state.stores[r].add(stream[r][kept[r]], k[r][kept[r]], v[r][kept[r]], tokens[r][kept[r]])

    def prefix_for(self, tokens: Sequence[int] | np.ndarray) -> list[int]:
        """What feed() puts before a stream that starts with ``tokens``: the model's stream prefix,
        less a BOS the stream already begins with (a prompt or an evaluated text that carries its own
        BOS keeps one, as in training). Only BOS is recognised: the sink token is always added."""
        prefix = list(self.prefix)
        tail = prefix[1:] if self.sink_token is not None else prefix  # the BOS part, if any
        if tail and len(tokens) >= len(tail) and [int(t) for t in tokens[:len(tail)]] == tail:
            return prefix[:len(prefix) - len(tail)]
        return prefix

    def full_tokens_needed(self, tokens: Sequence[int] | np.ndarray, max_new_tokens: int) -> int:
        """What a stream asks of `capacity` under `full`: the cache holds its prefix, the prompt and all
        but the last new token, so one prefix token (a sink token or a BOS) fits in the room the last
        new token leaves, and only a longer prefix (sink token + BOS) takes room of its own."""
        return len(tokens) + max(len(self.prefix_for(tokens)) - 1, 0) + max_new_tokens

    def rewind(self, state: MemoryState, n: int) -> MemoryState:
        """Forget the last ``n`` tokens of a one-row state (e.g. a reply the client did not keep).
        Exact while those tokens are still in the cache; the caller checks that they are."""
        if state.batch != 1:
            raise ValueError("rewind works on one sequence at a time")
        if state.stores is not None and state.stores[0] is not None:
            raise ValueError("cannot rewind a retrieve stream: its store and remembered queries moved with those "
                             "tokens; rebuild it from the history instead")
        mask = state.mask.copy()
        valid = np.flatnonzero(mask[0])
        if n > len(valid):
            raise ValueError(f"cannot rewind {n} tokens: only {len(valid)} are in the cache")
        if n:
            mask[0, valid[len(valid) - n:]] = False
        return self.compact(MemoryState(state.past, mask, state.tokens, state.evicted.copy(), state.seen - n))

    def select(self, state: MemoryState, rows: Sequence[int]) -> MemoryState:
        """The sub-batch of ``rows`` (e.g. the sequences still running)."""
        r = np.asarray(rows, dtype=np.int64)
        past = self.backend.ops.select(state.past, r) if state.past is not None else None
        stores = None if state.stores is None else [None if state.stores[i] is None else state.stores[i].copy()
                                                    for i in r]
        out = MemoryState(past, state.mask[r], state.tokens[r], state.evicted[r], state.seen[r],
                          None if state.pinned is None else state.pinned[r], stores)
        carry = self._carried(state)
        if carry is not None:  # a row's stream positions and count are its own: the next step appends to them
            out.carry = (out.mask, carry[1][r], carry[2][r])
        return out

    def merge(self, states: Sequence[MemoryState]) -> MemoryState:
        """One batch from several (continuous batching): shorter caches are left-padded with masked slots."""
        states = [s for s in states if s.batch]
        if any(s.past is None for s in states):
            raise ValueError("merge needs states that have been fed (prefill each sequence first)")
        width = max(s.slots for s in states)
        padded = [self._pad_to(s, width) for s in states]
        pinned = np.concatenate([s.pins() for s in padded]) if any(s.pinned is not None for s in padded) else None
        stores = None
        if any(s.stores is not None for s in padded):
            stores = [x for s in padded for x in (s.stores if s.stores is not None else [None] * s.batch)]
        out = MemoryState(self.backend.ops.concat([s.past for s in padded]),
                          np.concatenate([s.mask for s in padded]), np.concatenate([s.tokens for s in padded]),
                          np.concatenate([s.evicted for s in padded]), np.concatenate([s.seen for s in padded]),
                          pinned, stores)
        carries = [self._carried(s) for s in padded]
        if all(c is not None for c in carries):  # each part's rows keep their positions (padding: masked slots)
            out.carry = (out.mask, np.concatenate([c[1] for c in carries]), np.concatenate([c[2] for c in carries]))
        return out

    def compact(self, state: MemoryState) -> MemoryState:
        """Drop slots that no row uses any more (padding left by finished rows or eviction)."""
        if state.past is None:
            return state
        used = state.mask.any(axis=0)
        if used.all():
            return state
        idx = np.broadcast_to(np.flatnonzero(used), (state.batch, int(used.sum()))).copy()
        return self._take(state, idx, np.take_along_axis(state.mask, idx, axis=1))

    # ---- internals --------------------------------------------------------------------------
    def _stream_positions(self, mask: np.ndarray, seen: np.ndarray, pinned: np.ndarray | None = None) -> np.ndarray:
        """mask (B, S), seen (B,) -> (B, S) each slot's index in its stream (sink, retrieve: a slot
        put back from a store has its own, ``pinned``), or its rank in the cache (recompute, full: a
        recompute restarts positions at 0)."""
        in_place = mask if pinned is None else mask & (pinned < 0)
        rank = np.maximum(np.cumsum(in_place, axis=1) - 1, 0)
        if self.config.policy not in ("sink", "retrieve"):
            return rank
        dropped = (seen - in_place.sum(axis=1))[:, None]  # tokens evicted from the middle so far
        stream = np.where(rank < self.config.sinks, rank, rank + dropped)
        return stream if pinned is None else np.where(pinned >= 0, pinned, stream)

    def feed_greedy(self, state: MemoryState, ids: np.ndarray, steps: int) -> np.ndarray | None:
        """Feed ids (B, 1) (every row valid), then up to ``steps`` - 1 greedy picks, in one backend call
        where the backend runs greedy steps itself (``decode_greedy``: ONNX Runtime's in-place decode
        steps). Returns the picks (B, n) int64, n <= steps - pick i is numpy's argmax of the logits
        after the i-th token fed, the last one not fed - or None: feed step by step instead (the state
        is then as that feed leaves it before its forward, `sink`'s eviction done). Under `full` within
        the context; under `sink` anywhere, its window sliding inside the run: each step's layout masks
        what its band dropped (ctxmem.layout.build_decode_run), as the eviction between two steps does,
        and the run stops before the cache would be compacted (fewer picks then: see the result's shape)."""
        cfg = self.config
        run = getattr(self.backend, "decode_greedy", None)
        if run is None or self.key_positions or cfg.policy not in ("full", "sink") or state.past is None \
                or state.pinned is not None or ids.shape[1] != 1:
            return None
        valid = np.ones(ids.shape, bool)
        if cfg.policy == "full":
            if state.slots + steps > cfg.capacity:
                return None
        else:
            self._make_room(state, valid)  # what the step-by-step feed does first
            # step i (i >= 1) finds slots + i, and the eviction before it compacts past capacity + slack
            steps = min(steps, cfg.capacity + self.slack - state.slots + 1)
        if steps < 2:
            return None
        mask, seen, _, stream, _ = self._step_stream(state, ids, valid)
        layouts = build_decode_run(stream, mask, steps, cfg.sinks, cfg.window if cfg.policy == "sink" else None)
        out = run(ids, layouts, state.past)
        if out is None:
            return None
        picks, state.past = out[0], out[1]
        n = picks.shape[1]  # the backend may run fewer steps than asked (the end of its rotation table)
        last = layouts[n - 1]
        state.mask = last.valid  # (B, S + n - 1): under `sink`, what the band dropped is masked
        count = state.mask.sum(axis=1)  # (B,)
        if cfg.policy == "sink":  # the first fed slot, the n - 1 after it, less what is held now
            state.evicted = state.evicted + (mask.sum(axis=1) + n - 1 - count)
        state.tokens = np.concatenate((state.tokens, ids, picks[:, :-1]), axis=1)
        state.seen = seen + (n - 1)
        state.carry = (state.mask, last.stream, count)  # the next decode step appends to these positions
        return picks

    def _step_layout(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray) -> tuple:
        """What a forward of new columns ids/valid (B, T) attends with: (the mask with them (B, S+T),
        seen after them (B,), pinned with them or None, each slot's stream position (B, S+T), the
        valid slots per row when carried (B,) or None, the ctxmem.layout layout)."""
        cfg = self.config
        mask, seen, pinned, stream, count = self._step_stream(state, ids, valid)
        if ids.shape[1] == 1 and cfg.policy in ("full", "sink"):
            # a decode step (one token per row, nothing put back): the same layout from (B, S) operations
            layout = build_decode_layout(stream, mask, cfg.sinks, cfg.window if cfg.policy != "full" else None,
                                         key_positions=self.key_positions)
        elif cfg.policy in ("sink", "retrieve"):
            ranks = None
            if pinned is not None and (pinned >= 0).any():  # put-back slots sit at sinks, sinks + 1, ...
                pin = pinned >= 0
                ranks = np.where(pin, cfg.sinks + np.cumsum(pin, axis=1) - 1, -1)
            layout = build_layout(stream, mask, ids.shape[1], cfg.sinks, cfg.window, pinned=ranks)
        else:
            layout = build_layout(stream, mask, ids.shape[1])
        return mask, seen, pinned, stream, count, layout

    def _step_stream(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray) -> tuple:
        """_step_layout's first five: the mask, seen, pinned, stream positions and carried count."""
        cfg = self.config
        mask = np.concatenate((state.mask, valid), axis=1)
        seen = state.seen + (valid[:, 0] if valid.shape[1] == 1 else valid.sum(axis=1))  # (B,) int64
        pinned = None if state.pinned is None else np.concatenate(
            (state.pinned, np.full(valid.shape, -1, np.int64)), axis=1)
        carry = self._carried(state) if ids.shape[1] == 1 and cfg.policy in ("full", "sink") else None
        if carry is not None:
            # a slot's stream position moves with neither an append nor an eviction (rank and dropped
            # change together), so only the new column is computed: _stream_positions' formula on it
            count = carry[2] + valid[:, 0]  # (B,) valid slots with the new one
            last = np.maximum(count - 1, 0)  # (B,) its rank (cumsum - 1, at least 0)
            if cfg.policy == "sink":
                last = np.where(last < cfg.sinks, last, last + seen - count)
            stream = np.concatenate((carry[1], last[:, None]), axis=1)
        else:
            stream = self._stream_positions(mask, seen, pinned)
            count = None
        return mask, seen, pinned, stream, count

    def _forward(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray, last_only: bool = True,
                 queries: bool = False):
        """One backend call on new columns ids/valid (B, T). Returns the logits, or with ``queries``
        (retrieve) the logits and the retrieval layer's queries of the new tokens (B, H, T, D)."""
        cfg = self.config
        mask, seen, pinned, stream, count, layout = self._step_layout(state, ids, valid)
        q = None
        if queries:
            logits, state.past, q = self.backend.forward_with_queries(ids, layout, state.past, last_only,
                                                                       self.retrieval.layer)
        else:
            logits, state.past = self.backend.forward(ids, layout, state.past, last_only=last_only)
        state.mask = mask
        state.pinned = pinned
        state.tokens = np.concatenate((state.tokens, ids), axis=1)
        if cfg.policy in ("full", "sink"):
            state.carry = (mask, stream, mask.sum(axis=1) if count is None else count)
        state.seen = seen
        return (logits, q) if queries else logits

    def _evict(self, state: MemoryState, recent: int) -> None:
        """sink: keep each row's first `sinks` tokens and its `recent` most recent, by masking.

        A masked slot is invisible (no attention, no position), so this is exact. The cache is
        physically compacted only every `slack` slots, which keeps the per-token cost flat instead of
        copying the whole cache at every step."""
        cfg = self.config
        if state.past is None:
            return
        in_place = state.in_place()
        carry = self._carried(state)
        lengths = in_place.sum(axis=1) if carry is None else carry[2]  # (B,) valid slots in place
        if lengths.max() <= cfg.sinks + recent:
            return
        if carry is not None and state.pinned is None:
            # sink, positions carried (a decode step): a row's in-place slots are its sinks (stream index
            # < sinks) and one run of its newest tokens, whose last is at seen - 1, so its first `sinks`
            # and last `recent` valid slots are those stream indices say - first_and_last_mask's answer
            # without the (B, S) cumsum (tests/test_memory_decode.py compares the two)
            stream = carry[1]  # (B, S), meaningful on valid slots
            keep = in_place & ((stream < cfg.sinks) | (stream >= (state.seen - recent)[:, None]))
        else:
            keep = first_and_last_mask(in_place, cfg.sinks, recent)
        if self.retrieval is not None:  # retrieve: what leaves goes to the stores first
            self._store_evicted(state, in_place & ~keep)
        kept = np.minimum(lengths, cfg.sinks + recent)  # (B,) what keep holds per row
        state.evicted = state.evicted + (lengths - kept)
        # put-back slots stay; without any (sink) every valid slot is in place and keep is the new mask
        state.mask = keep if state.pinned is None else keep | (state.mask & ~in_place)
        # the kept slots keep their stream positions
        state.carry = None if carry is None else (state.mask, carry[1], kept)
        if state.slots > cfg.capacity + self.slack:
            compacted = self._take(state, *packed_slots(state.mask))
            state.past, state.mask, state.tokens, state.pinned, state.carry = (
                compacted.past, compacted.mask, compacted.tokens, compacted.pinned, compacted.carry)

    def _make_room(self, state: MemoryState, incoming: np.ndarray) -> None:
        """Before feeding ``incoming`` (B, T) valid columns."""
        cfg = self.config
        if state.past is None:
            return
        if cfg.policy in ("sink", "retrieve"):
            # the first new token reads the sinks and the window - 1 tokens before it; the band in
            # the layout hides from later new tokens what falls out of their own windows
            self._evict(state, cfg.window - 1)
            return
        # recompute: a row whose window would overflow keeps its newest tokens and re-runs prefill
        # over exactly those; the other rows are untouched (each row evicts on its own)
        lengths, fresh_in = state.lengths(), incoming.sum(axis=1)
        full = np.flatnonzero((lengths + fresh_in > cfg.window) & (fresh_in > 0))
        if len(full) == 0:
            return
        keep = cfg.window - np.maximum(cfg.chunk, fresh_in[full])
        rows = [self._recompute_keep(state.kept_tokens(int(r)), int(k)) for r, k in zip(full, keep)]
        redo = MemoryState.empty(len(full))
        ids, valid = left_pad(rows)
        self._forward(redo, ids, valid)
        redo.evicted = state.evicted[full] + lengths[full] - valid.sum(axis=1)
        redo.seen = state.seen[full]
        others = np.setdiff1d(np.arange(state.batch), full)
        if len(others) == 0:
            merged, order = redo, full
        else:
            merged, order = self.merge([self.select(state, others), redo]), np.concatenate((others, full))
        state.__dict__.update(self.select(merged, np.argsort(order)).__dict__)

    def _recompute_keep(self, kept: list[int], keep: int) -> list[int]:
        """The newest `keep` tokens of a row (at least one); a model with a stream prefix (sink token,
        BOS) keeps it first, as every stream of its training began with it."""
        n = len(self.prefix)
        if n and kept[:n] == list(self.prefix):
            rest = kept[n:]
            return list(self.prefix) + rest[max(len(rest) - max(keep - n, 1), 0):]
        return kept[len(kept) - max(keep, 1):]

    def _feed_rows_alone(self, state: MemoryState, ids: np.ndarray, valid: np.ndarray, all_logits: bool) -> np.ndarray:
        """recompute, several rows, a feed that overflows some window: where a recompute falls
        depends on how the feed is cut into pieces, so each row is fed alone, as it would be alone."""
        T = ids.shape[1]
        outs, parts = [], []
        for r in range(state.batch):
            part = self.select(state, [r]) if state.past is not None else MemoryState.empty(1)
            cols = np.flatnonzero(valid[r])
            if len(cols) == 0:
                outs.append(None)
            else:
                got = self._feed(part, ids[r:r + 1, cols], np.ones((1, len(cols)), bool), all_logits)
                if all_logits:  # back into the padded columns
                    full = np.zeros((1, T, got.shape[-1]), np.float32)
                    full[:, cols] = got
                    got = full
                outs.append(got)
            parts.append(part)
        width = next(o for o in outs if o is not None).shape
        outs = [o if o is not None else np.zeros(width, np.float32) for o in outs]
        merged = self.merge(parts)
        state.__dict__.update(merged.__dict__)
        return np.concatenate(outs, axis=0)

    def _take(self, state: MemoryState, idx: np.ndarray, kept: np.ndarray) -> MemoryState:
        """The slots idx (B, K) of each row, kept (B, K) the new mask. Every caller keeps every valid
        slot (a compaction, a left-padding), so a slot's carried stream position moves with it and each
        row's count of valid slots stays: the next decode step appends to them instead of a (B, S) cumsum."""
        pinned = None if state.pinned is None else np.where(kept, np.take_along_axis(state.pinned, idx, axis=1), -1)
        out = MemoryState(self.backend.ops.take(state.past, idx), kept,
                          np.take_along_axis(state.tokens, idx, axis=1), state.evicted.copy(), state.seen.copy(),
                          pinned, state.stores)
        carry = self._carried(state)
        if carry is not None:
            out.carry = (kept, np.take_along_axis(carry[1], idx, axis=1), carry[2])
        return out

    @staticmethod
    def _carried(state: MemoryState) -> tuple | None:
        """state.carry while it still describes state.mask (MemoryState.carry), else None."""
        carry = state.carry
        return carry if carry is not None and carry[0] is state.mask else None

    def _pad_to(self, state: MemoryState, width: int) -> MemoryState:
        extra = width - state.slots
        if extra == 0:
            return state
        idx = np.concatenate((np.zeros((state.batch, extra), np.int64),
                              np.broadcast_to(np.arange(state.slots), (state.batch, state.slots))), axis=1)
        kept = np.concatenate((np.zeros((state.batch, extra), bool), state.mask), axis=1)
        return self._take(state, idx, kept)


# ---- cache operations for the two array libraries ----------------------------------------------
class NumpyCacheOps:
    def take(self, past, idx):
        # np.take along the slot axis when every row keeps the same slots (compact, most evictions):
        # np.take_along_axis builds (B, H, K, D) index arrays and fancy indexing k[:, :, idx] gives a
        # non-contiguous result to copy again; measured 20-60x and ~5x slower on decode-sized caches
        if (idx == idx[:1]).all():
            return [(k.take(idx[0], axis=2), v.take(idx[0], axis=2)) for k, v in past]
        # rows keep different slots: one take per row, (Hkv, S, D) -> (Hkv, K, D), stacked to (B, Hkv, K, D)
        return [(np.stack([k[r].take(idx[r], axis=1) for r in range(len(idx))]),
                 np.stack([v[r].take(idx[r], axis=1) for r in range(len(idx))])) for k, v in past]

    def select(self, past, rows):
        return [(k[rows], v[rows]) for k, v in past]

    def concat(self, pasts):
        return [(np.concatenate([p[i][0] for p in pasts]), np.concatenate([p[i][1] for p in pasts]))
                for i in range(len(pasts[0]))]

    def export(self, past, idx, stream):
        # keys are stored before rotation here, so `stream` is not needed: (B, K, L, Hkv, D)
        taken = self.take(past, idx)
        return (np.stack([k for k, _ in taken], axis=1).transpose(0, 3, 1, 2, 4),
                np.stack([v for _, v in taken], axis=1).transpose(0, 3, 1, 2, 4))

    def splice(self, past, idx, start, k, v, positions):
        taken = self.take(past, idx)
        Z = k.shape[1]
        out = []
        for i, (lk, lv) in enumerate(taken):
            lk, lv = np.array(lk), np.array(lv)  # a copy of its own: take may return views of past
            lk[:, :, start:start + Z] = k[:, :, i].transpose(0, 2, 1, 3)  # (B, Z, Hkv, D) -> (B, Hkv, Z, D)
            lv[:, :, start:start + Z] = v[:, :, i].transpose(0, 2, 1, 3)
            out.append((lk, lv))
        return out
