"""Validation loss and perplexity of a checkpoint (PyTorch) or an export (ONNX Runtime), through the
same Backend.forward the generation loop uses, so both paths are measured by one piece of code.

Data: a folder written by `ctxmem data prepare` (its validation split), or a UTF-8 text file
(tokenised with the model's tokenizer). Windows of `block` + 1 tokens, non-overlapping; the loss is
the mean next-token cross-entropy over every predicted token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctxmem.layout import build_layout

from .errors import EvalError


@dataclass
class EvalResult:
    loss: float
    ppl: float
    tokens: int  # predicted tokens
    windows: int
    block: int
    data: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def validation_split(folder: Path, block: int):
    """The validation split of a `ctxmem data prepare` folder, in windows of `block` tokens."""
    try:
        from ctxmem.training.data import TokenData
    except ImportError as err:  # the training stage not installed
        raise EvalError(f"reading the data folder {folder} needs the training stage ({err})") from None
    try:
        return TokenData(folder).split("val", block)
    except Exception as err:  # noqa: BLE001 - DataError and friends carry the user's message
        raise EvalError(f"{folder}: {err}") from None


def load_windows(data: str | Path, tokenizer, block: int, max_windows: int | None = None) -> np.ndarray:
    """(N, block + 1) int64 token windows from a prepared data folder or a text file."""
    data = Path(data)
    if data.is_dir():
        split = validation_split(data, block)
        n = split.n_windows if max_windows is None else min(split.n_windows, max_windows)
        return np.stack([np.asarray(split.window(i), dtype=np.int64) for i in range(n)])
    if not data.is_file():
        raise EvalError(f"{data} does not exist; --data takes a folder from `ctxmem data prepare` or a text file")
    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EvalError(f"{data} is not a readable UTF-8 text file ({err})") from None
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    n = (len(ids) - 1) // block
    if n < 1:
        raise EvalError(f"{data} has {len(ids)} tokens, fewer than one window of {block + 1}; use more text "
                        "or a smaller --block")
    if max_windows is not None:
        n = min(n, max_windows)
    return np.stack([ids[i * block: i * block + block + 1] for i in range(n)])


def window_logits(backend, windows: np.ndarray, batch: int = 8):
    """Yields (inputs, targets, logits float32 (b, block, V)) batch by batch, from a fresh cache each time."""
    for start in range(0, len(windows), batch):
        rows = windows[start:start + batch]
        inputs, targets = rows[:, :-1], rows[:, 1:]
        b, t = inputs.shape
        positions = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
        layout = build_layout(positions, np.ones((b, t), dtype=bool), t)  # plain causal over the window
        logits, _ = backend.forward(inputs, layout, None, last_only=False)
        yield inputs, targets, logits


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-token negative log-likelihood (b, t), computed in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    picked = np.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return log_norm - picked


def evaluate_backend(backend, windows: np.ndarray, batch: int = 8, data: str = "") -> EvalResult:
    if windows.size == 0:
        raise EvalError("no evaluation windows")
    if int(windows.max()) >= backend.vocab_size:
        raise EvalError(f"the data has token id {int(windows.max())}, outside the model's vocabulary of "
                        f"{backend.vocab_size}: it was tokenised with another tokenizer")
    total, count = 0.0, 0
    for _, targets, logits in window_logits(backend, windows, batch):
        nll = cross_entropy(logits, targets)
        total += float(nll.sum())
        count += nll.size
    loss = total / count
    return EvalResult(loss, math.exp(min(loss, 50.0)), count, len(windows), windows.shape[1] - 1, data)


def compare_backends(reference, candidate, windows: np.ndarray, batch: int = 8) -> dict[str, float]:
    """Loss of both, its relative change and top-1 agreement of the candidate with the reference."""
    ref_total = cand_total = 0.0
    agree = count = 0
    for (_, targets, ref_logits), (_, _, cand_logits) in zip(window_logits(reference, windows, batch),
                                                           window_logits(candidate, windows, batch)):
        ref_total += float(cross_entropy(ref_logits, targets).sum())
        cand_total += float(cross_entropy(cand_logits, targets).sum())
        agree += int((ref_logits.argmax(-1) == cand_logits.argmax(-1)).sum())
        count += targets.size
    ref_loss, cand_loss = ref_total / count, cand_total / count
    return {"reference_loss": ref_loss, "loss": cand_loss,
            "loss_rel_change": (cand_loss - ref_loss) / max(abs(ref_loss), 1e-12),
            "top1_agreement": agree / count, "tokens": count}


def open_backend(spec: str | Path, provider: str | None = None, tracking_uri: str | None = None):
    """(backend, tokenizer, kind) for a checkpoint directory, an export directory or a model URI."""
    from ctxmem.tokenizer import load_tokenizer

    from .resolve import resolve_model
    from .runtime import RUNTIME_CONFIG, OrtBackend

    path = resolve_model(spec, tracking_uri)
    if (path / RUNTIME_CONFIG).is_file():
        return OrtBackend(path, provider=provider), load_tokenizer(path / "tokenizer.json"), "onnx"
    from ctxmem.backend import TorchBackend
    from ctxmem.checkpoint import TOKENIZER, load_model

    return TorchBackend(load_model(path)), load_tokenizer(path / TOKENIZER), "torch"


def evaluate(spec: str | Path, data: str | Path, block: int | None = None, batch: int = 8,
             max_windows: int | None = None, provider: str | None = None,
             tracking_uri: str | None = None) -> EvalResult:
    """`ctxmem eval`: loss and perplexity of a checkpoint or an export on `data`."""
    backend, tokenizer, _ = open_backend(spec, provider, tracking_uri)
    block = min(block or backend.max_seq_len, backend.max_seq_len)
    windows = load_windows(data, tokenizer, block, max_windows)
    return evaluate_backend(backend, windows, batch, str(data))
