"""Tokenizers: a dependency-free byte tokenizer, and any Hugging Face tokenizer.json (the byte-level
BPE trained here, Llama, Mistral, Qwen, GPT-2, ...) behind the same interface.

Id layouts
    ByteTokenizer   ids 0..255 are the bytes, then SPECIAL_TOKENS in order (256 <|pad|> ... 262 <|end|>).
                    tokenizer.json is our own small JSON: {"type": "ctxmem-bytes", "version": 1,
                    "special_tokens": [...]}.
    BPETokenizer    wraps a `tokenizers.Tokenizer`. `BPETokenizer.train` makes a byte-level BPE whose
                    ids 0..6 are SPECIAL_TOKENS, then the 256 byte symbols, then the merges; every
                    string round-trips. `from_file` reads any Hugging Face tokenizer.json (Llama,
                    Mistral, Qwen, GPT-2, ...); ids it lacks (pad, our chat tokens) are None.

Rules shared by every tokenizer
    * `encode(text)` is plain text: no BOS is added, and the *text* of a special token ("<|end|>"
      typed by a user) is encoded as ordinary characters, never as the control id. Control ids come
      only from code (ChatTemplate, `tok.eos_id`, ...) or from `encode(text, allow_special=True)`.
    * `decode` never raises, whatever the ids: invalid UTF-8 becomes U+FFFD, and so does an id
      outside the vocabulary (e.g. a padded embedding row). The byte tokenizer decodes its bytes
      with Python's UTF-8 codec; a Hugging Face tokenizer is decoded by its own decoder pipeline
      (`tokenizers.Tokenizer.decode`), so the text is exactly what Hugging Face gives (its
      ByteFallback step, for one, spells each byte of a broken character as its own U+FFFD).

The chat template lives in `ctxmem.chat_template`, the streaming decoder in `ctxmem.stream_decode`.
Only the stdlib is imported here at module level; `tokenizers` is imported by the BPE code only.
"""
from __future__ import annotations

import abc
import itertools
import json
import operator
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END = SPECIAL_TOKENS
BYTE_FORMAT = "ctxmem-bytes"
TOKENIZER_FILE = "tokenizer.json"
REPLACEMENT = "\ufffd"

# Names imported tokenizers use for the same roles (looked up among their *added* tokens only, so a
# plain vocabulary piece such as "<s>" in HTML-heavy byte-level vocabularies is never mistaken for one).
_KNOWN_BOS = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
_KNOWN_EOS = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_KNOWN_PAD = (PAD, "<pad>", "[PAD]", "<|padding|>")
_KNOWN_END_OF_TURN = (END, "<|eot_id|>", "<|im_end|>", "<end_of_turn>")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """A tokenizer file or input that cannot be used; the message says what is wrong and what to do."""


def _as_ids(ids: Any) -> list[int]:
    """A list of ints from a list, tuple, numpy array or torch tensor (or one int)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [operator.index(i) for i in ids]


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TokenizerError(f"encode expects a str, got {type(text).__name__}"
                             + ("; decode bytes to str first" if isinstance(text, (bytes, bytearray)) else ""))
    return text


def _without_surrogates(text: str) -> str:
    """Lone surrogates (from broken JSON, say) cannot be UTF-8: they become U+FFFD."""
    return _SURROGATE.sub(REPLACEMENT, text)


def _write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


# ---- base class --------------------------------------------------------------------------------
class Tokenizer(abc.ABC):
    """Common interface. Subclasses set `_specials` (special token text -> id), `special_ids` and
    the pad/bos/eos ids (None where the tokenizer has none)."""

    def __init__(self) -> None:
        self.special_ids: frozenset[int] = frozenset()
        self._specials: dict[str, int] = {}
        self.pad_id: int | None = None
        self.bos_id: int | None = None
        self.eos_id: int | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: one more than the largest id."""

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token's text -> id."""
        return dict(self._specials)

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of a token string, None when the vocabulary has no such token."""

    def stop_ids(self) -> set[int]:
        """Ids that end a generation: eos, <|end|>, and the end-of-turn tokens of imported chat
        vocabularies (<|eot_id|>, <|im_end|>, <end_of_turn>) where present."""
        ids = {self.eos_id, *(self._specials.get(name) for name in _KNOWN_END_OF_TURN)}
        return {i for i in ids if i is not None}

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS/EOS. Special-token text in `text` stays plain text unless
        `allow_special=True`, which turns the exact special strings (e.g. "<|end|>") into their ids."""
        text = _check_text(text)
        if not allow_special or not self._specials:
            return self._encode_plain(text)
        ids: list[int] = []
        pattern = "(" + "|".join(map(re.escape, sorted(self._specials, key=len, reverse=True))) + ")"
        for n, part in enumerate(re.split(pattern, text)):
            if n % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with special-token text kept as plain text."""

    @abc.abstractmethod
    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (list, tuple, numpy array or tensor); special tokens are left out unless
        skip_special=False. Invalid UTF-8 and unknown ids become U+FFFD; never raises."""

    @abc.abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (atomically) at `path`, or inside it if it is a directory."""


# ---- bytes -------------------------------------------------------------------------------------
class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then the special tokens (SPECIAL_TOKENS by default): vocab 263."""

    def __init__(self, special_tokens: Iterable[str] = SPECIAL_TOKENS):
        super().__init__()
        specials = list(special_tokens)
        if not all(isinstance(s, str) and s for s in specials) or len(set(specials)) != len(specials):
            raise TokenizerError(f"special_tokens must be distinct non-empty strings, got {specials!r}")
        self._pieces = [bytes([b]) for b in range(256)] + [s.encode() for s in specials]
        self._specials = {s: 256 + n for n, s in enumerate(specials)}
        self.special_ids = frozenset(self._specials.values())
        self.pad_id, self.bos_id, self.eos_id = (self._specials.get(s) for s in (PAD, BOS, EOS))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:
            return list(_without_surrogates(text).encode("utf-8"))

    def token_to_id(self, token: str) -> int | None:
        """Special text -> its id; a single ASCII character or "<0xNN>" -> that byte."""
        if token in self._specials:
            return self._specials[token]
        if len(token) == 1 and ord(token) < 128:
            return ord(token)
        match = _BYTE_PIECE.fullmatch(token)
        return int(match[1], 16) if match else None

    def _piece(self, id: int, skip_special: bool) -> bytes:
        """Raw bytes of one id: a byte, or a special token's text (b"" when skipped). A token may be
        one byte of a multi-byte character, so a piece need not be valid UTF-8. Unknown ids are
        U+FFFD. The streaming decoder feeds these to an incremental UTF-8 decoder."""
        if skip_special and id in self.special_ids:
            return b""
        return self._pieces[id] if 0 <= id < len(self._pieces) else REPLACEMENT.encode()

    def decode(self, ids, skip_special: bool = True) -> str:
        return b"".join([self._piece(i, skip_special) for i in _as_ids(ids)]).decode("utf-8", "replace")

    def save(self, path: str | Path) -> Path:
        specials = [piece.decode() for piece in self._pieces[256:]]
        data = {"type": BYTE_FORMAT, "version": 1, "special_tokens": specials}
        return _write_atomic(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path) -> "ByteTokenizer":
        tok = load_tokenizer(path)
        if not isinstance(tok, ByteTokenizer):
            raise TokenizerError(f"{path} holds a {type(tok).__name__}, not a byte tokenizer; use load_tokenizer")
        return tok

    @classmethod
    def _from_data(cls, data: dict[str, Any], path: Path) -> "ByteTokenizer":
        version = data.get("version", 1)
        if version != 1:
            raise TokenizerError(f"{path}: byte tokenizer version {version!r} is newer than this ctxmem "
                                 "understands (1); upgrade ctxmem")
        specials = data.get("special_tokens", list(SPECIAL_TOKENS))
        if not isinstance(specials, list):
            raise TokenizerError(f"{path}: 'special_tokens' must be a list of strings, got {specials!r}")
        try:
            return cls(specials)
        except TokenizerError as err:
            raise TokenizerError(f"{path}: {err}") from None


# ---- Hugging Face tokenizers ---------------------------------------------------------------------
def _config_token(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older tokenizer_config.json spell AddedTokens out
        value = value.get("content")
    return value if isinstance(value, str) else None


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`: our byte-level BPE (`train`) or any tokenizer.json
    (`from_file`). `hf` is the wrapped object; it has encode_special_tokens=True so that
    special-token text in input stays plain text. Decoding is the wrapped tokenizer's own."""

    def __init__(self, hf: Any, *, config: Mapping[str, Any] | None = None, source: str | None = None):
        super().__init__()
        self._hf = hf
        self._hf_with_specials = None  # made on first encode(allow_special=True)
        self.source = source
        added = hf.get_added_tokens_decoder()  # id -> AddedToken
        self._vocab_size = max(hf.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        added_by_text = {t.content: i for i, t in added.items()}
        self._specials = {t.content: i for i, t in added.items() if t.special}
        self._specials.update({s: added_by_text[s] for s in SPECIAL_TOKENS if s in added_by_text})
        self.special_ids = frozenset(self._specials.values())

        config = config or {}
        for attr, key, known in (("pad_id", "pad_token", _KNOWN_PAD), ("bos_id", "bos_token", _KNOWN_BOS),
                                 ("eos_id", "eos_token", _KNOWN_EOS)):
            name = _config_token(config, key)
            found = hf.token_to_id(name) if name else None
            if found is None:
                found = next((added_by_text[n] for n in known if n in added_by_text), None)
            setattr(self, attr, found)
        hf.encode_special_tokens = True

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"BPETokenizer(vocab_size={self.vocab_size}{src})"

    @property
    def hf(self) -> Any:
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    # -- encoding --
    def _encode_with(self, hf: Any, text: str) -> list[int]:
        try:
            return hf.encode(text, add_special_tokens=False).ids
        except (TypeError, UnicodeEncodeError):
            if not _SURROGATE.search(text):
                raise
            return hf.encode(_without_surrogates(text), add_special_tokens=False).ids

    def _encode_plain(self, text: str) -> list[int]:
        return self._encode_with(self._hf, text)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        text = _check_text(text)
        if not allow_special:
            return self._encode_plain(text)
        if self._hf_with_specials is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf_with_specials = HFTokenizer.from_str(self._hf.to_str())  # encode_special_tokens off
        return self._encode_with(self._hf_with_specials, text)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    # -- decoding --
    def decode(self, ids, skip_special: bool = True) -> str:
        ids = _as_ids(ids)
        # Hugging Face silently drops ids it does not know (and rejects negative ones); here each
        # becomes U+FFFD, and the runs of known ids around it are decoded on their own.
        parts = []
        for known, run in itertools.groupby(ids, key=lambda i: 0 <= i < self._vocab_size):
            run = list(run)
            parts.append(self._hf.decode(run, skip_special_tokens=skip_special) if known else REPLACEMENT * len(run))
        return "".join(parts)

    # -- training and files --
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> "BPETokenizer":
        """Train a byte-level BPE on `texts`: ids 0..6 are SPECIAL_TOKENS, 7..262 the 256 byte
        symbols, then merges up to `vocab_size` (fewer if the corpus runs out of pairs)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        floor = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < floor:
            raise TokenizerError(f"vocab_size must be an integer >= {floor} (256 bytes + {len(SPECIAL_TOKENS)} "
                                 f"special tokens), got {vocab_size!r}")
        if isinstance(texts, (str, bytes)):
            raise TokenizerError("texts must be an iterable of strings (e.g. a list of lines), not one string")

        def checked() -> Iterable[str]:
            for n, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TokenizerError(f"training text #{n} is a {type(text).__name__}, expected str")
                yield _without_surrogates(text)

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=show_progress)
        hf.train_from_iterator(checked(), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | Path) -> "BPETokenizer":
        """Any Hugging Face tokenizer.json (a directory means its tokenizer.json). A
        tokenizer_config.json beside it, as save_pretrained writes, names bos/eos/pad."""
        tok = load_tokenizer(path)
        if not isinstance(tok, BPETokenizer):
            raise TokenizerError(f"{path} holds a {type(tok).__name__}, not a Hugging Face tokenizer.json")
        return tok

    @classmethod
    def _from_text(cls, text: str, path: Path) -> "BPETokenizer":
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(f"{path} is a Hugging Face tokenizer.json; reading it needs the `tokenizers` "
                                 "package (pip install tokenizers)") from None
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path} is not a tokenizer.json the `tokenizers` library can read ({err}); "
                                 "re-save it with a recent transformers/tokenizers") from None
        config: dict[str, Any] = {}
        config_path = path.with_name("tokenizer_config.json")
        if config_path.is_file():
            try:
                loaded = json.loads(config_path.read_text(encoding="utf-8"))
                config = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                config = {}  # only a hint for bos/eos/pad names; the well-known names still apply
        return cls(hf, config=config, source=str(path))

    def save(self, path: str | Path) -> Path:
        return _write_atomic(path, self._hf.to_str(pretty=True) + "\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load tokenizer.json (or DIR/tokenizer.json): our byte format or any Hugging Face tokenizer.json.
    A missing, unreadable or unrecognised file raises TokenizerError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerError(f"{path} does not exist; pass a tokenizer.json or a checkpoint directory "
                             "that contains one") from None
    except OSError as err:
        raise TokenizerError(f"{path} cannot be read ({err})") from None
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise TokenizerError(f"{path} is not a tokenizer.json: not valid UTF-8 JSON ({err}); "
                             "re-save the tokenizer or copy the file again") from None
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == BYTE_FORMAT:
        return ByteTokenizer._from_data(data, path)
    if isinstance(kind, str) and kind.startswith("ctxmem-"):
        raise TokenizerError(f"{path} has tokenizer type {kind!r}, which this ctxmem does not know "
                             f"(known: {BYTE_FORMAT!r} and Hugging Face tokenizer.json); upgrade ctxmem")
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        return BPETokenizer._from_text(raw.decode("utf-8"), path)
    raise TokenizerError(f"{path} is JSON but not a tokenizer: expected a ctxmem byte tokenizer "
                         f'({{"type": "{BYTE_FORMAT}", ...}}) or a Hugging Face tokenizer.json '
                         "(an object with a 'model' section)")
