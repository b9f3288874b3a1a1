"""Where training text comes from: embedded corpora that install offline, and the user's files.

A document is either plain text (`str`) or a conversation (a list of {"role", "content"} messages,
rendered later with the core's chat template).

Embedded corpora (no download: they are Python packages or Python itself)
    chatterbot[:LANG[,LANG...]|:all]   the `chatterbot-corpus` package (BSD-3-Clause): short
                                       multi-turn dialogues in ~25 languages; default English.
    stdlib                             the .py sources of the running Python's standard library
                                       (PSF licence): a large plain-text stream.
Paths
    FILE.txt / .md / .rst / .py / ...  one document per file (UTF-8)
    FILE.jsonl                         one document per line: {"text": ...} or {"messages": [...]}
    FILE.yml / .yaml                   chatterbot-format {"conversations": [[utterance, ...], ...]}
    DIR                                every such file below it (hidden entries skipped), sorted
"""
from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .errors import DataError

Document = Union[str, list[dict]]
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
STRUCTURED_SUFFIXES = (".jsonl", ".yml", ".yaml")
EMBEDDED = ("chatterbot", "stdlib")
DEFAULT_CORPUS = "chatterbot"


@dataclass(frozen=True)
class Corpus:
    spec: str  # what the user typed
    name: str  # "chatterbot", "stdlib" or "path"
    files: tuple[Path, ...]
    license: str


def resolve(spec: str) -> Corpus:
    """A corpus name or path -> the files it reads. Raises DataError naming what exists."""
    name, _, arg = spec.partition(":")
    if name == "chatterbot" and not Path(spec).exists():
        return _chatterbot(spec, arg)
    if name == "stdlib" and not arg and not Path(spec).exists():
        return _stdlib(spec)
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
