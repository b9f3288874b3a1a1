"""Tokenised corpora on disk, and the batches every rank reads from them.

`ctxmem data prepare` writes a folder:

    DIR/meta.json          format, dtype, tokenizer, corpora (with licences), the two splits
    DIR/tokenizer.json     the tokenizer (ctxmem.tokenizer format)
    DIR/train_000.bin ...  token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    DIR/val_000.bin ...

Documents are shuffled (seeded) and split whole into train/validation by characters; each one ends
with EOS. Conversations are rendered with `ctxmem.tokenizer.ChatTemplate`. The shards are read back
with `numpy.memmap`, so training never loads a corpus into memory.

Batches: the training split is cut into samples of seq_len + 1 tokens (inputs and shifted targets),
see `Split`: with `data.samples: crop` (the default) consecutive windows wherever they fall, with
`document` windows that start at a document with the tokenizer's BOS in front. A model with a sink
token gets it in front of every sample. Optimizer step s reads global sample positions [s*G, (s+1)*G) of an endless
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
SAMPLES = ("crop", "document")
IGNORE = -100  # a target the loss skips (torch's cross_entropy ignore_index)


def sample_prefix(samples: str, sink_token_id: int | None, bos_id: int | None) -> tuple[int, ...]:
    """The fixed tokens every sample starts with: the model's sink token (sink=token), then BOS
    (samples=document). Raises DataError when document samples need a BOS the tokenizer lacks."""
    if samples not in SAMPLES:
        raise DataError(f"data.samples={samples!r} is not one of {SAMPLES}")
    prefix = [] if sink_token_id is None else [int(sink_token_id)]
    if samples == "document":
        if bos_id is None:
            raise DataError("data.samples=document starts every sample with the tokenizer's BOS token, and this "
                            "tokenizer has none; use data.samples=crop or prepare the data with a tokenizer that has one")
        prefix.append(int(bos_id))
    return tuple(prefix)


class Split:
    """Samples of `seq_len + 1` tokens over memory-mapped shards (a sample never crosses shards).

    A sample is `prefix` (P fixed tokens: the sink token and/or BOS, see `sample_prefix`) followed
    by n = seq_len + 1 - P tokens of the stream starting at a sample offset. Inputs are its first
    seq_len tokens, targets its last seq_len; a target that is a prefix token is IGNORE, so the
    first target scored is the first stream token after the prefix (with no prefix: the second).
    Offsets advance by `stride` = the stream tokens a sample scores, so every token is a target once:
      crop      every stride tokens from each shard's start (P=0: the plain seq_len windows).
      document  every document start (a shard's start, the token after each EOS) and, inside a
                document longer than one sample, every stride tokens further - so each sample has
                its BOS at position 0 and a long document is still read whole. A sample runs on
                into the next documents when its own is shorter (packed; EOS separates them).
    """

    def __init__(self, arrays: list[np.ndarray], seq_len: int, prefix: tuple[int, ...] = (),
                 samples: str = "crop", eos_id: int | None = None):
        if samples not in SAMPLES:
            raise DataError(f"data.samples={samples!r} is not one of {SAMPLES}")
        if len(prefix) >= seq_len:
            raise DataError(f"data.seq_len={seq_len} leaves no stream tokens after the {len(prefix)} fixed "
                            "token(s) every sample starts with; raise data.seq_len")
        if samples == "document" and eos_id is None:
            raise DataError("data.samples=document needs the data's EOS id to find documents; prepare the data again")
        self.arrays, self.seq_len, self.samples = arrays, seq_len, samples
        self.prefix = np.asarray(prefix, dtype=np.int64)
        self.n = seq_len + 1 - len(prefix)  # stream tokens per sample
        self.stride = self.n if len(prefix) else self.n - 1
        # per shard: None = offsets i * stride (crop), else the offsets themselves (document)
        self._offsets: list[np.ndarray | None] = []
        counts = []
        for a in arrays:
            if samples == "crop":
                self._offsets.append(None)
                counts.append(max(0, (len(a) - self.n) // self.stride + 1))
            else:
                offsets = self._document_offsets(a, int(eos_id))
                self._offsets.append(offsets)
                counts.append(len(offsets))
        self.starts = np.cumsum([0] + counts)
        self.n_windows = int(self.starts[-1])
        self.tokens = sum(len(a) for a in arrays)

    def _document_offsets(self, tokens: np.ndarray, eos_id: int) -> np.ndarray:
        """Offsets (k,) int64 of the document-aligned samples of one shard whose n tokens fit in it."""
        ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1  # one past each EOS
        bounds = np.unique(np.concatenate([[0], ends, [len(tokens)]]))
        starts, lengths = bounds[:-1], np.diff(bounds)
        # a document of L tokens (its EOS included) is scored by ceil((L - 1) / stride) samples, at least one
        per_doc = np.maximum(1, -(-(lengths - 1) // self.stride))
        first = np.repeat(starts, per_doc)
        within = np.arange(len(first)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
        offsets = first + within * self.stride
        return offsets[offsets + self.n <= len(tokens)].astype(np.int64)

    def window(self, i: int) -> np.ndarray:
        """Sample i: its prefix and stream tokens, (seq_len + 1,) int64."""
        shard = int(np.searchsorted(self.starts, i, side="right") - 1)
        k = i - int(self.starts[shard])
        offsets = self._offsets[shard]
        offset = k * self.stride if offsets is None else int(offsets[k])
        stream = np.asarray(self.arrays[shard][offset: offset + self.n], dtype=np.int64)
        return np.concatenate([self.prefix, stream]) if len(self.prefix) else stream

    def batch(self, indices) -> "tuple[Any, Any]":
        """(inputs, targets), each (len(indices), seq_len) int64 tensors; targets IGNORE where they
        would predict a prefix token."""
        import torch

        rows = np.stack([self.window(int(i)) for i in indices])
        tokens = torch.from_numpy(rows)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[:, : max(0, len(self.prefix) - 1)] = IGNORE
        return inputs, targets


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

    def stream(self, name: str, limit: int) -> np.ndarray:
        """Split `name`'s tokens in order (shards concatenated), at most `limit`, (k,) int64."""
        parts, left = [], limit
        for a in self._arrays[name]:
            if left <= 0:
                break
            parts.append(np.asarray(a[:left], dtype=np.int64))
            left -= len(parts[-1])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def split(self, name: str, seq_len: int, prefix: tuple[int, ...] = (), samples: str = "crop") -> Split:
        """The samples of split `name` (see Split; prefix from `sample_prefix`)."""
        split = Split(self._arrays[name], seq_len, prefix, samples, self.meta.get("eos_id"))
        if split.n_windows == 0:
            what = "training" if name == "train" else "validation"
            raise DataError(f"the {what} split of {self.path} has {split.tokens} tokens, fewer than one sample of "
                            f"{split.n} stream tokens (data.seq_len + 1 = {seq_len + 1}"
                            + (f", less {len(prefix)} fixed token(s)" if prefix else "") + "); use a larger corpus"
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
