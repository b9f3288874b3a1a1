"""`eval.memory`: the memory evaluation (ctxmem.memory_eval) of a run's final checkpoint over its
validation split - streaming perplexity past the window per memory policy and recall by distance -
written to OUT/memory_eval/ (memory_eval.json and the two PNGs) and logged to the run.

The stream is the validation split's tokens in order, as `ctxmem eval memory --data DIR` reads
them. A run trained on document samples (data.samples=document) always saw BOS at position 0, so
its stream starts with BOS too, as its streams would at inference; the text hash covers the tokens
actually evaluated, so results on different streams never compare as the same text. A model with a
sink token needs nothing here: ContextMemory puts the sink token first in every stream.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TrainConfig
from .errors import TrainConfigError

log = logging.getLogger("ctxmem.training")

FOLDER = "memory_eval"
MAX_EVAL_TOKENS = 1 << 22  # validation tokens read at most (the stream and the recall filler come from them)


@dataclass
class FinalMemoryEval:
    result: Any  # ctxmem.memory_eval.MemoryEvalResult
    paths: dict[str, Path]  # "json", "streaming_png", "recall_png"
    params: dict[str, str]  # what was measured, for the run's record


def eval_tokens(cfg: TrainConfig, data) -> np.ndarray:
    """The evaluated stream, (N,) int64: the validation split in order, BOS first for document samples."""
    tokens = data.stream("val", MAX_EVAL_TOKENS)
    if cfg.data.samples == "document":
        bos = data.tokenizer().bos_id
        tokens = np.concatenate([[bos], tokens[: MAX_EVAL_TOKENS - 1]]).astype(np.int64)
    return tokens


def needed_tokens(cfg: TrainConfig, max_seq_len: int) -> tuple[int, int]:
    """(window, stream length) the evaluation will use for a model of `max_seq_len` tokens."""
    from ctxmem.memory_eval import STREAM_WINDOWS

    memory = cfg.eval.memory
    window = memory.window or max_seq_len // 2
    return window, memory.length or STREAM_WINDOWS * window


def check_memory_eval(cfg: TrainConfig, data) -> None:
    """Refuse before training what the evaluation at its end could not do: a validation split too
    short for the stream (the message says how long it must be)."""
    model_cfg = cfg.model.build(data.vocab_size)
    window, length = needed_tokens(cfg, model_cfg.max_seq_len)
    if window + cfg.eval.memory.sinks > model_cfg.max_seq_len:
        raise TrainConfigError(f"eval.memory: window ({window}) + sinks ({cfg.eval.memory.sinks}) exceeds the "
                               f"model's max_seq_len={model_cfg.max_seq_len}; lower eval.memory.window")
    have = data.meta["splits"]["val"]["tokens"] + (cfg.data.samples == "document")
    if min(have, MAX_EVAL_TOKENS) < length:
        raise TrainConfigError(
            f"eval.memory needs a validation split of at least {length} tokens (a stream of {length / window:g}x "
            f"the window of {window}); {data.path} has {have}: prepare more data or a larger --val-fraction, or "
            "lower eval.memory.length / eval.memory.window")


def run_memory_eval(cfg: TrainConfig, final: Path, data, out: Path, device: str = "cpu") -> FinalMemoryEval:
    """Evaluate the checkpoint in `final` on this process (rank 0, on `device`) and save the files in `out`."""
    from ctxmem.backend import TorchBackend
    from ctxmem.checkpoint import load_model
    from ctxmem.memory_eval import evaluate_memory

    memory = cfg.eval.memory
    model = load_model(final)
    tokens = eval_tokens(cfg, data)
    digest = hashlib.sha256(tokens.astype("<i8").tobytes()).hexdigest()
    result = evaluate_memory(TorchBackend(model, device), tokens, data.tokenizer(), text_hash=digest,
                             window=memory.window, sinks=memory.sinks, length=memory.length,
                             distances=memory.distances, trials=memory.trials, seed=cfg.seed,
                             reference_tokens=memory.reference_tokens)
    paths = result.save(out)
    params = {"memory_eval.source": f"{data.path} (validation split, {len(tokens)} tokens"
                                    + (", BOS first)" if cfg.data.samples == "document" else ")"),
              "memory_eval.text_sha256": digest, "memory_eval.window_resolved": str(result.window),
              "memory_eval.length_resolved": str(result.length)}
    return FinalMemoryEval(result, paths, params)
