"""Tokenised corpora on disk, and the batches every rank reads from them.

`ctxmem data prepare` writes a folder:

    DIR/meta.json          format, dtype, tokenizer, corpora (with licences), the two splits
    DIR/tokenizer.json     the tokenizer (ctxmem.tokenizer format)
    DIR/train_000.bin ...  token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    DIR/val_000.bin ...

Documents are shuffled (seeded) and split whole into train/validation by characters; each one ends
with EOS. Conversations are rendered with `ctxmem.tokenizer.ChatTemplate`. The shards are read back
with `numpy.memmap`, so training never loads a corpus into memory.

Batches: the training split is cut into non-overlapping windows of seq_len + 1 tokens (inputs and
shifted targets). Optimizer step s reads global sample positions [s*G, (s+1)*G) of an endless
sequence of seeded epoch permutations; micro-step m of rank r reads the slice
[(m*W + r)*b, (m*W + r + 1)*b) of it (G global batch, W world size, b micro batch). So the samples
of a step do not depend on the world size (the one-process vs ZeRO-ranks parity test relies on
it) and a resumed run reads exactly what an uninterrupted one would (its position is the step).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import corpora
from .errors import DataError

FORMAT = "ctxmem-tokens"
META = "meta.json"
SHARD_TOKENS = 1 << 27  # 128M tokens (256 MiB of uint16) per shard file
DEFAULT_BPE_VOCAB = 4096
BPE_TRAIN_CHARS = 50_000_000  # BPE merges are learnt from at most this much text


# ---- preparing ---------------------------------------------------------------------------------
@dataclass
class PrepareResult:
    out: Path
    meta: dict[str, Any]

    def summary(self) -> str:
        s = self.meta["splits"]
        return (f"{self.out}: {s['train']['tokens']:,} train / {s['val']['tokens']:,} validation tokens "
                f"({s['train']['documents']:,} + {s['val']['documents']:,} documents), "
                f"{self.meta['tokenizer_kind']} tokenizer with {self.meta['vocab_size']} ids")


def prepare(specs: list[str], out: str | Path, tokenizer: str = "byte", vocab_size: int | None = None,
            val_fraction: float = 0.05, seed: int = 0, progress: bool = True) -> PrepareResult:
    """Read, tokenise and split `specs` (corpus names or paths) into `out`.

    Everything is checked and written to a sibling temporary folder first: an error leaves `out` as it was.
    """
    from tqdm import tqdm

    out = Path(out)
    if tokenizer not in ("byte", "bpe"):
        raise DataError(f"--tokenizer must be byte or bpe, got {tokenizer!r}")
    if tokenizer == "byte" and vocab_size is not None:
        raise DataError("--vocab-size applies to --tokenizer bpe only (the byte tokenizer has a fixed vocabulary)")
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"--val-fraction must be in (0, 0.5), got {val_fraction}")
    if not specs:
        specs = [corpora.DEFAULT_CORPUS]
    _check_out(out)
    sources = [corpora.resolve(spec) for spec in specs]  # missing paths fail here, before any reading

    documents: list[corpora.Document] = []
    corpus_meta = []
    bar = tqdm(total=sum(len(c.files) for c in sources), desc="reading", unit="file", disable=not progress)
    for corpus in sources:
        if corpus.name == "recall":
            continue  # synthetic: generated below, sized against the corpora read here
        before = len(documents)
        for path in corpus.files:
            documents.extend(corpora.read_file(path, conversations_only=corpus.name == "chatterbot"))
            bar.update(1)
        if len(documents) == before:
            bar.close()
            raise DataError(f"corpus {corpus.spec!r} is empty: its {len(corpus.files)} file(s) hold no text")
        corpus_meta.append({"spec": corpus.spec, "kind": corpus.name, "license": corpus.license,
                            "files": len(corpus.files), "documents": len(documents) - before})
    bar.close()
    corpus_meta += corpora.add_recall(sources, documents, seed)

    tok = _make_tokenizer(tokenizer, vocab_size, documents, progress)
    from ctxmem.chat_template import ChatTemplate

    template = ChatTemplate(tok)
    eos = tok.eos_id
    if eos is None:
        raise DataError("the tokenizer has no EOS id; documents could not be separated")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32

    order = np.random.default_rng(seed).permutation(len(documents))
    sizes = np.array([_chars(documents[i]) for i in order])
    val_docs = set()
    if len(documents) > 1:  # whole documents, in shuffled order, until val_fraction of the characters
        budget, taken = val_fraction * sizes.sum(), 0
        for k in range(len(order) - 1):
            if taken >= budget:
                break
            val_docs.add(int(order[k]))
            taken += sizes[k]

    tmp = out.with_name(f".{out.name}.tmp-{int(time.time() * 1000)}")
    tmp.mkdir(parents=True)
    try:
        writers = {split: _ShardWriter(tmp, split, dtype) for split in ("train", "val")}
        bar = tqdm(total=len(documents), desc="tokenising", unit="doc", disable=not progress)
        for i in order:
            doc = documents[int(i)]
            ids = template.render(doc, add_generation_prompt=False) if isinstance(doc, list) else tok.encode(doc)
            ids.append(eos)
            if len(documents) == 1:  # one document: its tail is the validation split
                cut = len(ids) - max(1, int(len(ids) * val_fraction))
                writers["train"].write(np.asarray(ids[:cut], dtype))
                writers["val"].write(np.asarray(ids[cut:], dtype))
                writers["val"].documents += 1
            else:
                writers["val" if int(i) in val_docs else "train"].write(np.asarray(ids, dtype))
            bar.update(1)
        bar.close()
        splits = {name: w.close() for name, w in writers.items()}
        if splits["train"]["tokens"] == 0:
            raise DataError(f"the corpora {specs} produced no tokens")
        tok.save(tmp / "tokenizer.json")
        meta = {
            "format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "tokenizer": "tokenizer.json",
            "tokenizer_kind": tokenizer, "vocab_size": tok.vocab_size, "eos_id": eos, "pad_id": tok.pad_id,
            "val_fraction": val_fraction, "seed": seed, "corpora": corpus_meta, "splits": splits,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PrepareResult(out, meta)


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / META).exists():
        raise DataError(f"--out {out} exists and is not a prepared data folder (no {META}); "
                        "choose an empty or new folder so nothing of yours is replaced")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time() * 1000)}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _chars(doc: corpora.Document) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def _make_tokenizer(kind: str, vocab_size: int | None, documents: list, progress: bool):
    from ctxmem.tokenizer import BPETokenizer, ByteTokenizer, TokenizerError

    if kind == "byte":
        return ByteTokenizer()

    def texts():
        budget = BPE_TRAIN_CHARS
        for doc in documents:
            for text in ([doc] if isinstance(doc, str) else [m["content"] for m in doc]):
                yield text
                budget -= len(text)
                if budget <= 0:
                    return
    try:
        return BPETokenizer.train(texts(), vocab_size or DEFAULT_BPE_VOCAB, show_progress=progress)
    except TokenizerError as err:
        raise DataError(f"--vocab-size: {err}") from None


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] >= SHARD_TOKENS:
                self._open()
            room = SHARD_TOKENS - self.shards[-1]["tokens"]
            chunk, ids = ids[:room], ids[room:]
            self._file.write(chunk.astype(np.dtype(self.dtype).newbyteorder("<")).tobytes())
            self.shards[-1]["tokens"] += len(chunk)

    def _open(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._file.close()
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents, "shards": self.shards}


# ---- reading -----------------------------------------------------------------------------------
class Split:
    """Non-overlapping windows of `seq_len + 1` tokens over memory-mapped shards (never across shards)."""

    def __init__(self, arrays: list[np.ndarray], seq_len: int):
        self.arrays, self.seq_len = arrays, seq_len
        counts = [max(0, (len(a) - 1) // seq_len) for a in arrays]
        self.starts = np.cumsum([0] + counts)
        self.n_windows = int(self.starts[-1])
        self.tokens = sum(len(a) for a in arrays)

    def window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        offset = (i - int(self.starts[shard])) * self.seq_len
        return self.arrays[shard][offset: offset + self.seq_len + 1]

    def batch(self, indices) -> "tuple[Any, Any]":
        """(inputs, targets), each (len(indices), seq_len) int64 tensors."""
        import torch

        rows = np.stack([self.window(int(i)).astype(np.int64) for i in indices])
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


class TokenData:
    """A folder written by `prepare`, checked and memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.exists():
            hint = ("" if self.path.exists() else " (the folder does not exist)")
            raise DataError(f"{self.path} is not a prepared data folder: no {META}{hint}; "
                            f"create it with `ctxmem data prepare --out {self.path}`")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{meta_path} is not valid JSON ({err}); prepare the data again") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} is not a ctxmem token folder (format {self.meta.get('format')!r})")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self._arrays: dict[str, list[np.ndarray]] = {}
        for split in ("train", "val"):
            arrays = []
            for shard in self.meta["splits"][split]["shards"]:
                file = self.path / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                if not file.exists() or file.stat().st_size != expected:
                    raise DataError(f"{file} is missing or truncated (expected {expected} bytes); "
                                    "prepare the data again")
                if shard["tokens"]:
                    arrays.append(np.memmap(file, dtype=self.dtype, mode="r"))
            self._arrays[split] = arrays

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def tokenizer(self):
        from ctxmem.tokenizer import load_tokenizer

        return load_tokenizer(self.path / self.meta["tokenizer"])

    def split(self, name: str, seq_len: int) -> Split:
        split = Split(self._arrays[name], seq_len)
        if split.n_windows == 0:
            what = "training" if name == "train" else "validation"
            raise DataError(f"the {what} split of {self.path} has {split.tokens} tokens, fewer than one window of "
                            f"data.seq_len + 1 = {seq_len + 1}; use a larger corpus"
                            + (", a larger --val-fraction" if name == "val" else "") + " or a shorter data.seq_len")
        return split


class BatchPlan:
    """Which training windows each rank reads at each step (see the module docstring)."""

    def __init__(self, n_windows: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n_windows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def step_indices(self, step: int) -> np.ndarray:
        """Window indices of the whole global batch of optimizer step `step` (0-based), (G,)."""
        pos = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        return np.array([self._perm(int(p // self.n))[int(p % self.n)] for p in pos])

    def micro_indices(self, step: int, micro_step: int, rank: int, world: int, micro_batch: int) -> np.ndarray:
        start = (micro_step * world + rank) * micro_batch
        return self.step_indices(step)[start: start + micro_batch]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n


def eval_plan(n_windows: int, samples: int, rank: int, world: int, micro_batch: int) -> list[tuple[list[int], list[float]]]:
    """Validation micro-batches of one rank: the first min(samples, n) windows dealt round-robin.

    Every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively, so
    an uneven count would hang); padding rows repeat window 0 with weight 0."""
    k = min(samples, n_windows)
    mine = list(range(rank, k, world))
    per_rank = math.ceil(math.ceil(k / world) / micro_batch) * micro_batch
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + [0] * (per_rank - len(mine))
    return [(mine[i: i + micro_batch], weights[i: i + micro_batch]) for i in range(0, per_rank, micro_batch)]
