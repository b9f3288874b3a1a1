"""Memory evaluation: does a model stay good, and remember, once a stream outgrows its window?

Two measurements over any Backend (PyTorch, ONNX Runtime), both through ContextMemory so they
measure the code that serves:

Streaming perplexity - one stream of N tokens (default 20x the window), every token after the first
scored, per policy:

* ``full``       - strided evaluation capped at the model's context L: blocks of L tokens starting
                   every L/2 tokens, each token scored in the first block that holds it with at least
                   L/2 tokens before it (every token of the first block too), so each token sees
                   between L/2 and L-1 tokens of context. One fresh forward per block.
* ``sink``       - S attention sinks + the ``window`` most recent tokens; the stream is fed in pieces
                   of ``piece`` tokens (default: the window), logits for every token of a piece from
                   one forward. The memory makes the result independent of the piecing.
* window-only    - ``sink`` with 0 sinks.
* ``retrieve``   - ``sink`` plus evicted blocks put back (ctxmem.retrieval), ``budget`` tokens at most;
                   fed like ``sink`` (the memory cuts the pieces at its refresh points, as its meaning
                   asks). Measured when the backend gives its queries and sinks + window + budget fit
                   the model's context; ``budget=0`` leaves it out.
* ``recompute`` chunk=window/4 - fed as its token-by-token run would compute: the first ``window``
                   tokens, then pieces of ``chunk`` (each piece follows exactly one re-prefill).
* ``recompute`` chunk=1 - StreamingLLM's quality reference (sliding window with re-computation):
                   the token at stream position t is predicted from a fresh prefill of the ``window``
                   tokens ending at t-1. One window prefill per token is slow, so before 10x the
                   window it is measured on at most ``reference_tokens`` evenly spaced positions (its
                   bucket records cover those); beyond 10x the window on every position, so the
                   promotion gate compares the policies on exactly the same tokens there.

Records ``{"policy", "sinks", "window", "chunk", "start", "end", "ppl"}``: ``[start, end)`` is the
range of stream positions a perplexity covers (position 0 is never predicted). One record per
bucket of one window (a curve vs position) and one for everything beyond 10x the window
(``start = 10 * window``, ``end = N``; only when N > 11x the window). ``window`` is the number of
recent tokens kept (the model's context for ``full``); ``chunk`` is null except under recompute.

Recall by distance - a synthetic fact ("The code of the blue door is 4812.", ctxmem.recall_facts)
placed in filler from the evaluation text, then its question ("Q: the code of the blue door? A:").
The distance d is counted from the first token of the fact's value to the first answer token, so
under a window of W recent tokens the value is still visible iff d <= W. A trial counts as recalled
when the greedy continuation reproduces the value exactly: every answer token is the argmax given
the correct tokens before it (teacher forcing, one forward - the same as greedy decoding except for
exact ties). A stream that starts with BOS (a document-trained model's) starts every trial with BOS
too. Policies: ``full`` (the question with as much of the trial as fits the context),
``sink``, window-only, ``retrieve`` and recompute chunk=1. Records
``{"policy", "sinks", "window", "distance", "accuracy", "n"}`` (``retrieve`` adds ``"budget"``, in the
perplexity records too).

Shapes: B rows, T tokens, V vocabulary. Everything here is numpy over a Backend; no torch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .memory import ContextMemory, MemoryConfig, MemoryConfigError, stream_prefix
from .recall_facts import Fact, FactGenerator

log = logging.getLogger("ctxmem.memory_eval")

STREAM_WINDOWS = 20  # default stream length, in windows
BEYOND_WINDOWS = 10  # the "far past the window" range starts here, in windows
RESULT_FILE = "memory_eval.json"
STREAMING_PNG = "memory_eval_streaming.png"
RECALL_PNG = "memory_eval_recall.png"
LOGITS_BUDGET = 1 << 26  # float32 logits held at once per forward (256 MiB)


class MemoryEvalError(ValueError):
    """A memory evaluation that cannot run as asked (text too short, window too large, ...)."""


# ---- what is compared -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicyRun:
    """One memory setting measured. window: recent tokens kept (the context for ``full``)."""

    policy: str
    sinks: int
    window: int
    chunk: int | None = None
    budget: int | None = None  # retrieve: tokens put back at most

    @property
    def label(self) -> str:
        return run_label(self.policy, self.sinks, self.window, self.chunk, self.budget)

    def memory_config(self) -> MemoryConfig:
        if self.policy == "full":
            return MemoryConfig("full")
        if self.policy == "retrieve":
            return MemoryConfig("retrieve", window=self.window, sinks=self.sinks, budget=self.budget)
        return MemoryConfig(self.policy, window=self.window, sinks=self.sinks, chunk=self.chunk or 1)

    def fields(self) -> dict[str, Any]:
        """What identifies the run in a record."""
        out = {"policy": self.policy, "sinks": self.sinks, "window": self.window}
        return {**out, "budget": self.budget} if self.policy == "retrieve" else out


def run_label(policy: str, sinks: int, window: int, chunk: int | None = None, budget: int | None = None) -> str:
    if policy == "full":
        return f"full (context {window})"
    if policy == "sink":
        return f"sink ({sinks} sinks)" if sinks else "window-only"
    if policy == "retrieve":
        return f"retrieve ({sinks} sinks, {budget} back)"
    return f"recompute (chunk={chunk})" if chunk is not None else "recompute"


def streaming_runs(context: int, window: int, sinks: int, rope: bool = True, budget: int = 0) -> list[PolicyRun]:
    """full, sink (S sinks), window-only, retrieve (budget > 0), recompute chunk=1 and chunk=window/4
    (one when equal). Without rotary positions sink and retrieve cannot run (they re-assign
    positions): left out."""
    runs = recall_runs(context, window, sinks, rope, budget)
    if window // 4 > 1:
        runs.append(PolicyRun("recompute", 0, window, window // 4))
    return runs


def recall_runs(context: int, window: int, sinks: int, rope: bool = True, budget: int = 0) -> list[PolicyRun]:
    """full, sink, window-only, retrieve (budget > 0) and the recompute chunk=1 reference (recall
    records carry no chunk)."""
    runs = [PolicyRun("full", 0, context)]
    if rope:
        runs.append(PolicyRun("sink", sinks, window))
        if sinks:
            runs.append(PolicyRun("sink", 0, window))
        if budget:
            runs.append(PolicyRun("retrieve", sinks, window, budget=budget))
    runs.append(PolicyRun("recompute", 0, window, 1))
    return runs


# ---- the result -----------------------------------------------------------------------------------
@dataclass
class MemoryEvalResult:
    text_sha256: str
    streaming: list[dict[str, Any]] = field(default_factory=list)
    recall: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Exactly the saved schema: {"text_sha256", "streaming": [...], "recall": [...]}."""
        return {"text_sha256": self.text_sha256, "streaming": list(self.streaming), "recall": list(self.recall)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> "MemoryEvalResult":
        obj = json.loads(data) if isinstance(data, str) else data
        missing = {"text_sha256", "streaming", "recall"} - set(obj)
        if missing:
            raise MemoryEvalError(f"not a memory evaluation result: missing {sorted(missing)}")
        return cls(obj["text_sha256"], list(obj["streaming"]), list(obj["recall"]))

    # the evaluation window and stream length, read back from the records (so a loaded result has them)
    @property
    def window(self) -> int:
        windows = [r["window"] for r in self.streaming + self.recall if r["policy"] != "full"]
        return min(windows) if windows else 0

    @property
    def length(self) -> int:
        return max((r["end"] for r in self.streaming), default=0)

    def is_beyond(self, record: dict[str, Any]) -> bool:
        """The record covering everything beyond 10x the window (what the promotion gate reads)."""
        return record["start"] == BEYOND_WINDOWS * self.window and record["end"] == self.length \
            and record["end"] - record["start"] > self.window

    def beyond(self, policy: str, sinks: int = 0, chunk: int | None = None) -> dict[str, Any] | None:
        for r in self.streaming:
            if r["policy"] == policy and r["sinks"] == sinks and r["chunk"] == chunk and self.is_beyond(r):
                return r
        return None

    def retrieve_vs_sink(self) -> float | None:
        """Perplexity beyond 10x the window under retrieve / under sink with the same sinks."""
        ours = next((r for r in self.streaming if r["policy"] == "retrieve" and self.is_beyond(r)), None)
        sink = ours and self.beyond("sink", ours["sinks"])
        return ours["ppl"] / sink["ppl"] if ours and sink else None

    def curves(self) -> dict[str, list[dict[str, Any]]]:
        """Per run label, its per-bucket records in stream order (the beyond-10x records left out)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self.streaming:
            if not self.is_beyond(r):
                out.setdefault(run_label(r["policy"], r["sinks"], r["window"], r["chunk"], r.get("budget")),
                               []).append(r)
        return out

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a tracking server: beyond-10x perplexity per run, recall per run and distance."""
        out = {}
        for r in self.streaming:
            if self.is_beyond(r):
                out[f"memory.ppl_beyond_10x.{_metric_name(r)}"] = r["ppl"]
        for r in self.recall:
            out[f"memory.recall.{_metric_name(r)}.d{r['distance']}"] = r["accuracy"]
        return out

    def table(self) -> str:
        lines = [f"streaming perplexity (stream of {self.length} tokens, window {self.window}; "
                 f"buckets of one window)"]
        reference = self.beyond("recompute", 0, 1)
        labels = [run_label(r["policy"], r["sinks"], r["window"], r.get("chunk"), r.get("budget"))
                  for r in self.streaming + self.recall]
        w = max([24, *map(len, labels)])  # the policy column fits its longest label
        head = f"{'policy':<{w}} {'sinks':>5} {'window':>6} {'chunk':>5} {'first':>9} {'last':>9} " \
               f"{'>10x':>9} {'/ recompute(1)':>14}"
        lines += [head, "-" * len(head)]
        for label, records in self.curves().items():
            r0 = records[0]
            beyond = self.beyond(r0["policy"], r0["sinks"], r0["chunk"])
            ratio = beyond["ppl"] / reference["ppl"] if beyond and reference else None
            lines.append(f"{label:<{w}} {r0['sinks']:>5} {r0['window']:>6} {_cell(r0['chunk']):>5} "
                         f"{records[0]['ppl']:>9.4f} {records[-1]['ppl']:>9.4f} {_cell(beyond and beyond['ppl']):>9} "
                         f"{_cell(ratio):>14}")
        if self.retrieve_vs_sink() is not None:
            lines.append(f"retrieve / sink beyond 10x the window: {self.retrieve_vs_sink():.4f}")
        if self.recall:
            distances = sorted({r["distance"] for r in self.recall})
            n = max(r["n"] for r in self.recall)
            lines += ["", f"recall accuracy by distance (greedy answer exact, {n} facts per cell; "
                          f"the value is inside the window when d <= {self.window})"]
            head = f"{'policy':<{w}} {'sinks':>5} {'window':>6} " + " ".join(f"{'d=' + str(d):>7}" for d in distances)
            lines += [head, "-" * len(head)]
            rows: dict[str, dict[int, float]] = {}
            first: dict[str, dict[str, Any]] = {}
            for r in self.recall:
                label = run_label(r["policy"], r["sinks"], r["window"], budget=r.get("budget"))
                rows.setdefault(label, {})[r["distance"]] = r["accuracy"]
                first.setdefault(label, r)
            for label, by_d in rows.items():
                r0 = first[label]
                lines.append(f"{label:<{w}} {r0['sinks']:>5} {r0['window']:>6} "
                             + " ".join(f"{_cell(by_d.get(d)):>7}" for d in distances))
        return "\n".join(lines)

    def save(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """memory_eval.json (+ the two PNGs) in `out`; returns the paths written by name."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / RESULT_FILE}
        paths["json"].write_text(self.to_json())
        if plots:
            paths["streaming_png"] = plot_streaming(self, out / STREAMING_PNG)
            paths["recall_png"] = plot_recall(self, out / RECALL_PNG)
        return paths


def _metric_name(r: dict[str, Any]) -> str:
    if r["policy"] == "sink":
        return f"sink{r['sinks']}" if r["sinks"] else "window_only"
    if r["policy"] == "recompute" and r.get("chunk") is not None:
        return f"recompute_chunk{r['chunk']}"
    if r["policy"] == "retrieve":
        return f"retrieve{r['sinks']}_b{r['budget']}"
    return r["policy"]


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def text_sha256(text: str | bytes) -> str:
    """The identity of an evaluation text (results on different texts are not comparable)."""
    return hashlib.sha256(text.encode("utf-8") if isinstance(text, str) else text).hexdigest()


# ---- plots ----------------------------------------------------------------------------------------
def plot_streaming(result: MemoryEvalResult, path: str | Path) -> Path:
    """Perplexity vs stream position, log y, one line per policy."""
    from matplotlib.figure import Figure  # the train extra; a Figure without pyplot draws with Agg

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    for label, records in result.curves().items():
        x = [(r["start"] + r["end"]) / 2 for r in records]
        ax.plot(x, [r["ppl"] for r in records], marker=".", label=label)
    window = result.window
    if window and result.length > BEYOND_WINDOWS * window:
        ax.axvline(BEYOND_WINDOWS * window, color="grey", linestyle=":", label=f"{BEYOND_WINDOWS}x window")
    ax.set_yscale("log")
    ax.set_xlabel("stream position (tokens)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"streaming perplexity, window {window}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_recall(result: MemoryEvalResult, path: str | Path) -> Path:
    """Recall accuracy vs distance, one line per policy, the window marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in result.recall:
        label = run_label(r["policy"], r["sinks"], r["window"], budget=r.get("budget"))
        lines.setdefault(label, []).append((r["distance"], r["accuracy"]))
    for label, points in lines.items():
        points.sort()
        ax.plot([d for d, _ in points], [a for _, a in points], marker="o", label=label)
    if result.window:
        ax.axvline(result.window, color="grey", linestyle=":", label=f"window ({result.window})")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("distance from the fact's value to the answer (tokens)")
    ax.set_ylabel("recall accuracy")
    ax.set_title("recall by distance")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---- the evaluation -------------------------------------------------------------------------------
def evaluate_memory(backend, tokens: Sequence[int] | np.ndarray, tokenizer, *, text_hash: str,
                    window: int | None = None, sinks: int = 4, length: int | None = None,
                    distances: Sequence[int] | None = None, trials: int = 32, seed: int = 0,
                    piece: int | None = None, reference_tokens: int | None = 1024,
                    batch: int = 16, recall: bool = True, budget: int = 32) -> MemoryEvalResult:
    """Streaming perplexity and recall by distance of `backend` on `tokens` (the evaluation text,
    tokenised with `tokenizer`). window: recent tokens kept (default half the model's context);
    length: stream tokens (default 20x the window); distances: recall distances (default spread
    inside and beyond the window); trials: facts per distance and policy; budget: the retrieve
    policy's tokens put back (0: retrieve not measured)."""
    context = stream_context(backend)
    window = backend.max_seq_len // 2 if window is None else window
    _check_window(backend, window, sinks)
    budget = retrieve_budget(backend, window, sinks, budget)
    length = STREAM_WINDOWS * window if length is None else length
    if length <= window + 1:
        raise MemoryEvalError(f"length ({length}) must exceed the window ({window}) + 1: nothing past the window "
                              "would be measured")
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(tokens) < length:
        raise MemoryEvalError(
            f"the evaluation text has {len(tokens)} tokens; this run needs at least {length} (one stream of "
            f"{length} tokens = {length / window:g}x the window of {window}): give a longer text, or a smaller "
            "length or window")
    if len(tokens) and int(tokens.max()) >= backend.vocab_size:
        raise MemoryEvalError(f"the text has token id {int(tokens.max())}, outside the model's vocabulary of "
                              f"{backend.vocab_size}: it was tokenised with another tokenizer")
    piece = window if piece is None else piece
    if piece < 1:
        raise MemoryEvalError(f"piece must be >= 1, got {piece}")

    stream = tokens[:length]
    result = MemoryEvalResult(text_hash)
    if not backend.uses_rope:
        log.warning("the model has learned absolute positions: the sink policy cannot run, measuring full and "
                    "recompute only")
    for run in streaming_runs(context, window, sinks, backend.uses_rope, budget):
        log.info("streaming perplexity: %s over %d tokens", run.label, length)
        nll = streaming_nll(backend, stream, run, piece=piece, reference_tokens=reference_tokens, batch=batch)
        result.streaming.extend(perplexity_records(nll, run, window))
    if recall:
        result.recall = recall_by_distance(backend, tokens, tokenizer, window=window, sinks=sinks,
                                           distances=distances, trials=trials, seed=seed, piece=piece, batch=batch,
                                           budget=budget)
    return result


def stream_context(backend) -> int:
    """Stream tokens the model's context holds under ``full``: fewer by the model's stream prefix
    (ModelConfig.stream_prefix: sink token, BOS), which ContextMemory puts first in every stream (a
    stream that brings its own BOS gets only the sink token added: then one token of room is spare)."""
    return backend.max_seq_len - len(stream_prefix(backend))


def retrieve_budget(backend, window: int, sinks: int, budget: int) -> int:
    """The retrieve policy's budget to measure, or 0 (left out, with the reason logged) where it cannot
    run: a backend that does not give its queries (an export made before the policy), learned
    positions, or sinks + window + budget past the model's context."""
    if budget <= 0:
        return 0
    if not backend.uses_rope or not getattr(backend, "gives_queries", False):
        log.warning("the retrieve policy is not measured: %s", "the model has learned absolute positions"
                    if not backend.uses_rope else "this backend does not give its queries (re-export the model)")
        return 0
    try:
        MemoryConfig("retrieve", window=window, sinks=sinks, budget=budget).resolve(backend.max_seq_len)
    except MemoryConfigError as err:
        log.warning("the retrieve policy is not measured: %s", err)
        return 0
    return budget


def _check_window(backend, window: int, sinks: int) -> None:
    configs = [MemoryConfig("recompute", window=window, chunk=1)]
    if backend.uses_rope:
        configs.append(MemoryConfig("sink", window=window, sinks=sinks))
    for cfg in configs:
        try:
            cfg.resolve(backend.max_seq_len, backend.uses_rope)
        except MemoryConfigError as err:
            raise MemoryEvalError(f"window {window} with {sinks} sinks: {err}") from None


# ---- streaming perplexity -------------------------------------------------------------------------
def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target: logits (..., V), targets (...) -> (...), in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return np.log(np.exp(z).sum(axis=-1)) - picked


def streaming_nll(backend, stream: np.ndarray, run: PolicyRun, *, piece: int, reference_tokens: int | None = None,
                  batch: int = 16) -> np.ndarray:
    """Per stream position t (N,), the NLL of stream[t] given what `run` keeps of stream[:t];
    NaN where not measured (position 0; unsampled positions of the chunk=1 reference)."""
    inputs, targets = stream[:-1], stream[1:]  # input column j predicts stream position j + 1
    nll = np.full(len(stream), np.nan)
    if run.policy == "full":
        cols, values = _strided_full(backend, inputs, targets, run.window, batch)
    elif run.policy == "recompute" and run.chunk == 1:
        # every column predicting a position >= 10x the window, a sample of those before
        far = min(len(inputs), max(0, BEYOND_WINDOWS * run.window - 1))
        cols = np.concatenate((_sample_columns(far, reference_tokens), np.arange(far, len(inputs))))
        logits = sliding_window_logits(backend, inputs, cols, run.window, batch)
        values = token_nll(logits, targets[cols])
    else:
        if run.policy in ("sink", "retrieve"):
            pieces = [piece]
        else:  # recompute: its token-by-token run fills the window, then re-prefills every `chunk` tokens
            pieces = [run.window, run.chunk]
        cols, values = np.arange(len(inputs)), _fed_nll(backend, run, inputs, targets, pieces)
    nll[cols + 1] = values
    return nll


def _piece_bounds(total: int, pieces: list[int]) -> list[tuple[int, int]]:
    """[start, end) of consecutive pieces: pieces[0], then pieces[1] (or the last size) repeatedly."""
    bounds, start, k = [], 0, 0
    while start < total:
        size = pieces[min(k, len(pieces) - 1)]
        bounds.append((start, min(start + size, total)))
        start, k = start + size, k + 1
    return bounds


def _fed_nll(backend, run: PolicyRun, inputs: np.ndarray, targets: np.ndarray, pieces: list[int]) -> np.ndarray:
    memory = ContextMemory(backend, run.memory_config())
    state = memory.start(1)
    out = np.empty(len(inputs))
    for a, b in _piece_bounds(len(inputs), pieces):
        logits = memory.feed(state, inputs[None, a:b], all_logits=True)  # (1, b-a, V)
        out[a:b] = token_nll(logits[0], targets[a:b])
    return out


def _strided_full(backend, inputs: np.ndarray, targets: np.ndarray, context: int,
                  batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of `context` input columns every context/2; each column scored once, in the first block
    that gives it at least context/2 columns before it (all columns of the first block)."""
    stride = max(1, context // 2)
    blocks, start, scored_to = [], 0, 0
    while True:
        end = min(start + context, len(inputs))
        blocks.append((start, end, scored_to))  # score columns [scored_to, end) of this block
        scored_to = end
        if end == len(inputs):
            break
        start += stride
    memory = ContextMemory(backend, MemoryConfig("full"))
    cols, values = [], []
    for group in _equal_length_groups(blocks, rows_per_forward(batch, context, backend.vocab_size)):
        rows = np.stack([inputs[a:b] for a, b, _ in group])  # (B, T)
        logits = memory.feed(memory.start(len(group)), rows, all_logits=True)  # (B, T, V)
        for (a, b, first), row_logits in zip(group, logits):
            keep = np.arange(first, b)
            cols.append(keep)
            values.append(token_nll(row_logits[keep - a], targets[keep]))
    return np.concatenate(cols), np.concatenate(values)


def rows_per_forward(batch: int, columns: int, vocab: int) -> int:
    """At most `batch` rows, fewer when their all-column logits (rows, columns, V) float32 would
    pass LOGITS_BUDGET (a 50k vocabulary at 1k columns is 200 MB a row)."""
    return max(1, min(batch, LOGITS_BUDGET // max(1, columns * vocab)))


def _equal_length_groups(blocks: list[tuple[int, int, int]], batch: int):
    group: list[tuple[int, int, int]] = []
    for block in blocks:
        if group and (len(group) == batch or block[1] - block[0] != group[0][1] - group[0][0]):
            yield group
            group = []
        group.append(block)
    if group:
        yield group


def _sample_columns(total: int, budget: int | None) -> np.ndarray:
    """`budget` evenly spaced columns of range(total) (all of them when budget is None or larger)."""
    if budget is None or budget >= total:
        return np.arange(total)
    if budget < 1:
        raise MemoryEvalError(f"reference_tokens must be >= 1 (or None for all), got {budget}")
    return np.unique(np.linspace(0, total - 1, budget).round().astype(np.int64))


def sliding_window_logits(backend, inputs: np.ndarray, cols: np.ndarray, window: int, batch: int) -> np.ndarray:
    """recompute chunk=1, exactly as its token-by-token run computes it: the logits after input column
    j from a fresh prefill of the `window` columns ending at j (all of them while j < window).
    inputs (T,), cols (K,) -> (K, V)."""
    memory = ContextMemory(backend, MemoryConfig("full"))
    out = []
    for s in range(0, len(cols), batch):
        rows = [inputs[max(0, j - window + 1): j + 1] for j in cols[s:s + batch]]
        if all(len(r) == len(rows[0]) for r in rows):
            out.append(memory.feed(memory.start(len(rows)), np.stack(rows)))  # (B, V): last column
        else:  # early columns: shorter rows, left-padded by the memory (masked, positions from 0)
            out.append(memory.feed(memory.start(len(rows)), [r.tolist() for r in rows]))
    return np.concatenate(out)


def perplexity_records(nll: np.ndarray, run: PolicyRun, window: int) -> list[dict[str, Any]]:
    """One record per bucket of `window` positions, and one for positions >= 10x the window."""
    length = len(nll)
    ranges = [(max(1, a), min(a + window, length)) for a in range(0, length, window)]
    if length - BEYOND_WINDOWS * window > window:  # else it would be the last bucket again
        ranges.append((BEYOND_WINDOWS * window, length))
    records = []
    for start, end in ranges:
        values = nll[start:end]
        values = values[~np.isnan(values)]
        if len(values) == 0:
            continue
        records.append({**run.fields(), "chunk": run.chunk,
                        "start": int(start), "end": int(end), "ppl": float(math.exp(min(values.mean(), 50.0)))})
    return records


# ---- recall by distance ---------------------------------------------------------------------------
@dataclass
class RecallTrials:
    """Trials at one distance, all of one length T: ids (B, T) int64 and per row its answer tokens,
    which end the row."""

    distance: int
    ids: np.ndarray
    answers: list[list[int]]


def default_distances(window: int, shortest: int) -> list[int]:
    """Inside the window (down to the shortest a trial allows) and beyond it, up to 4x."""
    candidates = {window // 4, window // 2, (3 * window) // 4, window, (3 * window) // 2, 2 * window, 4 * window}
    picked = sorted(d for d in candidates if d >= shortest)
    if shortest <= window and shortest not in picked and not any(d <= window for d in picked):
        picked.insert(0, shortest)
    return picked


class RecallBuilder:
    """Builds trials from facts and filler token ids (the evaluation text). head: tokens every trial
    starts with (the BOS a document-trained model saw at position 0 of every sample), none by default."""

    def __init__(self, tokenizer, filler: np.ndarray, trials: int, seed: int, lead: int, head: Sequence[int] = ()):
        self.tokenizer, self.filler, self.lead, self.head = tokenizer, filler, lead, [int(t) for t in head]
        self.facts = FactGenerator(seed).facts(trials)
        self.rng = np.random.default_rng(seed)
        # the pieces of each trial, tokenised once: [lead filler][prefix][value][tail][gap filler][question][answer]
        self.parts = [self._encode(f) for f in self.facts]

    def _encode(self, fact: Fact) -> dict[str, list[int]]:
        enc = self.tokenizer.encode
        value = enc(fact.answer)
        return {"prefix": enc(" " + fact.prefix), "value": value, "tail": enc(". "),
                "question": enc(" " + fact.question), "answer": value}

    def shortest(self) -> int:
        """The smallest distance every trial allows: its value, tail and question with no filler."""
        return max(len(p["value"]) + len(p["tail"]) + len(p["question"]) for p in self.parts)

    def needed_filler(self, distance: int) -> int:
        return max(self.lead + self._head_room(), distance)

    def _head_room(self) -> int:
        return max(len(p["prefix"]) + len(p["answer"]) for p in self.parts)

    def build(self, distance: int) -> RecallTrials:
        shortest = self.shortest()
        if distance < shortest:
            raise MemoryEvalError(f"recall distance {distance} is shorter than a trial allows: the fact's value, "
                                  f"'. ' and the question take up to {shortest} tokens; use distances >= {shortest}")
        # every row gets the same length: its lead filler absorbs the differences in prefix/answer length
        total = len(self.head) + self.lead + self._head_room() + distance
        rows, answers = [], []
        for p in self.parts:
            gap = distance - len(p["value"]) - len(p["tail"]) - len(p["question"])
            lead = total - len(self.head) - distance - len(p["prefix"]) - len(p["answer"])
            row = (self.head + self._filler(lead) + p["prefix"] + p["value"] + p["tail"] + self._filler(gap) + p["question"]
                   + p["answer"])
            assert len(row) == total
            rows.append(row)
            answers.append(p["answer"])
        return RecallTrials(distance, np.asarray(rows, dtype=np.int64), answers)

    def _filler(self, n: int) -> list[int]:
        if n <= 0:
            return []
        start = int(self.rng.integers(0, len(self.filler) - n + 1))
        return self.filler[start:start + n].tolist()


def recall_by_distance(backend, tokens: np.ndarray, tokenizer, *, window: int, sinks: int,
                       distances: Sequence[int] | None = None, trials: int = 32, seed: int = 0,
                       piece: int | None = None, batch: int = 16, budget: int = 0) -> list[dict[str, Any]]:
    """Accuracy per (policy, distance): the share of `trials` facts whose value the model answers
    exactly, greedy, when asked `distance` tokens after the value (see the module docstring)."""
    if trials < 1:
        raise MemoryEvalError(f"trials must be >= 1, got {trials}")
    lead = max(16, 2 * sinks)  # filler before the fact, so the fact is never held by the sinks
    tokens = np.asarray(tokens, dtype=np.int64)
    # a stream that starts with BOS (a document-trained model's, see training.final_memory_eval) starts
    # every trial with it too, as every sample the model learnt from did; the filler is what follows
    bos = getattr(tokenizer, "bos_id", None)
    head = tokens[:1] if bos is not None and len(tokens) and int(tokens[0]) == bos else tokens[:0]
    builder = RecallBuilder(tokenizer, tokens[len(head):], trials, seed, lead, head)
    shortest = builder.shortest()
    distances = default_distances(window, shortest) if distances is None else sorted(set(int(d) for d in distances))
    if not distances:
        raise MemoryEvalError(f"no recall distance fits: a trial needs a distance >= {shortest} tokens")
    need = builder.needed_filler(max(distances))
    if len(builder.filler) < need:
        raise MemoryEvalError(f"the evaluation text has {len(builder.filler)} tokens; recall at distance {max(distances)} "
                              f"needs at least {need} tokens of filler text")
    records = []
    runs = recall_runs(stream_context(backend), window, sinks, backend.uses_rope,
                       retrieve_budget(backend, window, sinks, budget))  # checked once, not per distance
    for d in distances:
        trial = builder.build(d)
        for run in runs:
            log.info("recall: %s at distance %d (%d trials)", run.label, d, trials)
            correct = answer_correct(backend, trial, run, piece=piece or window, batch=batch)
            records.append({**run.fields(), "distance": d,
                            "accuracy": float(correct.mean()), "n": int(len(correct))})
    return records


def answer_correct(backend, trial: RecallTrials, run: PolicyRun, *, piece: int, batch: int) -> np.ndarray:
    """(B,) bool: every answer token of a row is the argmax given the row's tokens before it."""
    ids = trial.ids
    B, T = ids.shape
    longest = max(len(a) for a in trial.answers)
    # predicted[:, k] = argmax after input column T - 1 - longest + k, i.e. for the last `longest` tokens
    predicted = np.empty((B, longest), dtype=np.int64)
    first = T - 1 - longest  # input column predicting the first of the last `longest` tokens
    step = rows_per_forward(batch, min(T, max(piece, run.window)), backend.vocab_size)
    for s in range(0, B, step):
        rows = ids[s:s + step]
        if run.policy == "recompute":  # chunk=1: a fresh window prefill per answer token
            for r, row in enumerate(rows):
                cols = np.arange(first, T - 1)
                logits = sliding_window_logits(backend, row[:-1], cols, run.window, batch)  # (longest, V)
                predicted[s + r] = logits.argmax(-1)
            continue
        if run.policy == "full":  # as much of the trial as fits the model's context
            inputs = rows[:, max(0, T - 1 - run.window): T - 1]
            offset = T - 1 - inputs.shape[1]
            memory = ContextMemory(backend, MemoryConfig("full"))
            logits = memory.feed(memory.start(len(rows)), inputs, all_logits=True)  # (B, T', V)
            predicted[s:s + len(rows)] = logits[:, first - offset:].argmax(-1)
            continue
        memory = ContextMemory(backend, run.memory_config())
        state = memory.start(len(rows))
        inputs = rows[:, :-1]
        tail = []
        for a, b in _piece_bounds(inputs.shape[1], [piece]):
            logits = memory.feed(state, inputs[:, a:b], all_logits=True)  # (B, b-a, V)
            if b > first:
                tail.append(logits[:, max(0, first - a):].argmax(-1))
        predicted[s:s + len(rows)] = np.concatenate(tail, axis=1)
    targets = ids[:, T - longest:]
    correct = np.empty(B, dtype=bool)
    for r, answer in enumerate(trial.answers):
        k = len(answer)
        correct[r] = bool(np.array_equal(predicted[r, longest - k:], targets[r, longest - k:]))
    return correct
