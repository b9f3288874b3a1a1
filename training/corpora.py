"""Where training text comes from: embedded corpora that install offline, and the user's files.

A document is either plain text (`str`) or a conversation (a list of {"role", "content"} messages,
rendered later with the core's chat template).

Embedded corpora (no download: they are Python packages or Python itself)
    chatterbot[:LANG[,LANG...]|:all]   the `chatterbot-corpus` package (BSD-3-Clause): short
                                       multi-turn dialogues in ~25 languages; default English.
    stdlib                             the .py sources of the running Python's standard library
                                       (PSF licence): a large plain-text stream.
Synthetic
    recall[:FRACTION|:DOCUMENTS]       key-value recall documents (ctxmem.recall_facts): facts such
                                       as "The code of the blue door is 4812." among filler, then
                                       questions about them with their answers. Mixed with other
                                       corpora it makes FRACTION of the characters (default 0.1) and
                                       takes its filler from their text; alone, or as recall:N, it
                                       writes N documents (default 2000) with synthetic filler.
Paths
    FILE.txt / .md / .rst / .py / ...  one document per file (UTF-8)
    FILE.jsonl                         one document per line: {"text": ...} or {"messages": [...]}
    FILE.yml / .yaml                   chatterbot-format {"conversations": [[utterance, ...], ...]}
    DIR                                every such file below it (hidden entries skipped), sorted
"""
from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ctxmem.recall_facts import FactGenerator

from .errors import DataError

Document = Union[str, list[dict]]
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
STRUCTURED_SUFFIXES = (".jsonl", ".yml", ".yaml")
EMBEDDED = ("chatterbot", "stdlib", "recall")
DEFAULT_CORPUS = "chatterbot"
RECALL_FRACTION = 0.1  # `recall` mixed into other corpora: its share of the characters
RECALL_DOCUMENTS = 2000  # `recall` alone: documents written
RECALL_FACTS = 8  # facts (each asked soon after it is stated) per recall document
# filler before each statement or question: at most this many characters, so with at most 2 facts
# waiting for their question a question comes ~40-250 characters after its fact's value (median ~90):
# inside a small model's training context (256 byte tokens) wherever a crop falls, spread over the
# distances the memory evaluation asks at, and dense (about one answered question per 115 characters)
RECALL_GAP_CHARS = 40
RECALL_OPEN_FACTS = 2  # facts stated and not yet asked, at most
RECALL_FILLER_POOL = 2_000_000  # characters of the other corpora sampled for filler


@dataclass(frozen=True)
class Corpus:
    spec: str  # what the user typed
    name: str  # "chatterbot", "stdlib", "recall" or "path"
    files: tuple[Path, ...]
    license: str
    fraction: float | None = None  # recall: share of the mix's characters (None: the default)
    documents: int | None = None  # recall: documents to write (None: sized by the fraction)


def resolve(spec: str) -> Corpus:
    """A corpus name or path -> the files it reads. Raises DataError naming what exists."""
    name, _, arg = spec.partition(":")
    if name == "chatterbot" and not Path(spec).exists():
        return _chatterbot(spec, arg)
    if name == "stdlib" and not arg and not Path(spec).exists():
        return _stdlib(spec)
    if name == "recall" and not Path(spec).exists():
        return _recall(spec, arg)
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"corpus {spec!r} is neither an existing file or folder nor an embedded corpus "
                        f"({', '.join(EMBEDDED)}; e.g. chatterbot:english,chinese)")
    if path.is_file():
        return Corpus(spec, "path", (path,), "user")
    files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and _readable(p, path)))
    if not files:
        raise DataError(f"corpus folder {path} holds no readable files ({', '.join(TEXT_SUFFIXES + STRUCTURED_SUFFIXES)})")
    return Corpus(spec, "path", files, "user")


def _readable(path: Path, root: Path) -> bool:
    rel = path.relative_to(root).parts
    return not any(part.startswith(".") for part in rel) and path.suffix.lower() in TEXT_SUFFIXES + STRUCTURED_SUFFIXES


def _chatterbot(spec: str, arg: str) -> Corpus:
    try:
        import chatterbot_corpus
    except ImportError:
        raise DataError("the embedded chatterbot corpus needs the chatterbot-corpus package: "
                        "pip install -e '.[train]'") from None
    root = Path(chatterbot_corpus.__file__).parent / "data"
    languages = sorted(p.name for p in root.iterdir() if p.is_dir())
    wanted = languages if arg == "all" else [lang.strip() for lang in (arg or "english").split(",") if lang.strip()]
    missing = [lang for lang in wanted if lang not in languages]
    if missing:
        raise DataError(f"chatterbot has no language(s) {missing}; available: {', '.join(languages)}")
    files = tuple(f for lang in wanted for f in sorted((root / lang).glob("*.yml")))
    return Corpus(spec, "chatterbot", files, "BSD-3-Clause (chatterbot-corpus)")


def _stdlib(spec: str) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}
    files = tuple(sorted(p for p in root.rglob("*.py")
                         if not skip.intersection(p.relative_to(root).parts)))
    return Corpus(spec, "stdlib", files, "PSF-2.0 (Python standard library)")


def _recall(spec: str, arg: str) -> Corpus:
    if not arg:
        return Corpus(spec, "recall", (), "synthetic (ctxmem)")
    try:
        number = float(arg)
    except ValueError:
        number = None
    if number is not None and 0.0 < number < 1.0:
        return Corpus(spec, "recall", (), "synthetic (ctxmem)", fraction=number)
    if number is not None and number >= 1 and number == int(number) and "." not in arg:
        return Corpus(spec, "recall", (), "synthetic (ctxmem)", documents=int(number))
    raise DataError(f"corpus {spec!r}: recall takes a fraction of the mix in (0, 1) (recall:0.2) or a number "
                    f"of documents (recall:500), got {arg!r}")


def recall_documents(corpus: Corpus, others: list[Document], seed: int = 0) -> list[str]:
    """The documents of a `recall` corpus, sized against `others` (the other corpora's documents,
    whose text also gives the filler; synthetic filler when there are none)."""
    gen = FactGenerator(seed)
    pool = _filler_pool(others, seed)
    filler = (lambda chars: _pool_slice(pool, chars, gen.rng)) if pool else None
    if corpus.documents is not None or not others:
        if corpus.fraction is not None:
            raise DataError(f"corpus {corpus.spec!r}: a fraction needs other corpora to mix into (e.g. "
                            f"--corpus chatterbot {corpus.spec}); alone, give a number of documents (recall:500)")
        count = corpus.documents or RECALL_DOCUMENTS
        return [gen.document(RECALL_FACTS, max_gap_chars=RECALL_GAP_CHARS, filler=filler, open_facts=RECALL_OPEN_FACTS) for _ in range(count)]
    fraction = corpus.fraction or RECALL_FRACTION
    target = fraction / (1.0 - fraction) * sum(_chars(d) for d in others)
    docs, size = [], 0
    while size < target:
        docs.append(gen.document(RECALL_FACTS, max_gap_chars=RECALL_GAP_CHARS, filler=filler, open_facts=RECALL_OPEN_FACTS))
        size += len(docs[-1])
    return docs


def add_recall(sources: list[Corpus], documents: list[Document], seed: int = 0) -> list[dict[str, Any]]:
    """Append the documents of every `recall` source (generated after the others were read, so they
    can be sized against them) to `documents`; returns their meta.json entries."""
    meta = []
    others = list(documents)
    for corpus in sources:
        if corpus.name == "recall":
            docs = recall_documents(corpus, others, seed)
            documents.extend(docs)
            meta.append({"spec": corpus.spec, "kind": "recall", "license": corpus.license, "files": 0,
                         "documents": len(docs)})
    return meta


def _chars(doc: Document) -> int:
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def _filler_pool(documents: list[Document], seed: int) -> str:
    """Up to RECALL_FILLER_POOL characters of the documents' text (plain text and message contents)."""
    texts = [t for d in documents for t in ([d] if isinstance(d, str) else [m["content"] for m in d])]
    random.Random(seed).shuffle(texts)
    pool, size = [], 0
    for text in texts:
        if size >= RECALL_FILLER_POOL:
            break
        pool.append(text)
        size += len(text) + 1
    return " ".join(pool)


def _pool_slice(pool: str, chars: int, rng: random.Random) -> str:
    chars = min(chars, len(pool))
    start = rng.randint(0, len(pool) - chars)
    return pool[start:start + chars].strip()


def read_file(path: Path, conversations_only: bool = False) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix in (".yml", ".yaml"):
        yield from _read_conversations_yaml(path, required=conversations_only)
    else:
        text = _read_text(path)
        if text.strip():
            yield text


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err})") from None
    if b"\x00" in data[:4096]:
        raise DataError(f"{path} looks binary (NUL bytes); corpora are UTF-8 text")
    return data.decode("utf-8", errors="replace")


def _read_jsonl(path: Path) -> Iterator[Document]:
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n} is not valid JSON ({err.msg}); each line must be one JSON object") from None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            if row["text"].strip():
                yield row["text"]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            messages = row["messages"]
            for m in messages:
                if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                        and isinstance(m.get("content"), str)):
                    raise DataError(f"{path}:{n}: each message needs a role (system, user, assistant) and a "
                                    f"string content, got {m!r}")
            if messages:
                yield [{"role": m["role"], "content": m["content"]} for m in messages]
        else:
            raise DataError(f"{path}:{n}: expected an object with a 'text' string or a 'messages' list, "
                            f"got {line[:80]!r}")


def _read_conversations_yaml(path: Path, required: bool) -> Iterator[Document]:
    import yaml

    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as err:
        raise DataError(f"{path} is not valid YAML ({err})") from None
    conversations = data.get("conversations") if isinstance(data, dict) else None
    if conversations is None:
        if required:
            raise DataError(f"{path} has no 'conversations' list")
        text = _read_text(path)  # a YAML file that is not a dialogue set: plain text
        if text.strip():
            yield text
        return
    for conversation in conversations:
        if isinstance(conversation, str):
            conversation = [conversation]
        turns = [str(t).strip() for t in conversation if t is not None and str(t).strip()]
        if turns:
            # chatterbot dialogues alternate speakers: the first is the user, the reply the assistant
            yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
