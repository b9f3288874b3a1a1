"""Tokenizers: a dependency-free byte tokenizer, byte-level BPE (Hugging Face `tokenizers`), any
Hugging Face tokenizer.json, the chat template and a streaming detokenizer.

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
    * `decode` joins the raw bytes of the tokens (`token_bytes`) and decodes them as UTF-8 with
      errors replaced by U+FFFD: it never raises, whatever the ids (an id outside the vocabulary,
      e.g. a padded embedding row, decodes to U+FFFD as well).
    * Token bytes are exact for the two schemes real checkpoints use:
        byte-level BPE (GPT-2, Llama 3, Qwen, ours): token strings map to bytes through the GPT-2
            byte<->unicode table (`BYTE_TO_UNICODE`, below);
        SentencePiece-style ("metaspace": Llama 2, Mistral v1, Gemma, T5): "▁" is a space and
            "<0xNN>" byte-fallback pieces are the byte NN. The leading space such decoders strip
            from the start of a text (their `Strip`/`Metaspace` step) is stripped here too, so
            `decode` equals the Hugging Face decode.
      Added tokens (special or not) are their literal text. Any other decoder (WordPiece "##",
      ...) sets `byte_exact = False`: `decode` then defers to the Hugging Face decoder and
      `StreamDecoder` falls back to decode-diffing.
      Known differences from Hugging Face's own decoders, both only for malformed input: invalid
      UTF-8 is replaced per maximal ill-formed subsequence (Python's rule; HF's ByteFallback emits
      one U+FFFD per byte), and a non-ASCII *added* token such as "café" in a byte-level vocabulary
      decodes to its text (HF's ByteLevel decoder garbles it).

Chat (`ChatTemplate`)
    With our special tokens:  <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|> [<|assistant|>]
    Without them (an imported HF tokenizer): plain text, one line per message,
        "System: …\\nUser: …\\nAssistant: …\\n" [+ "Assistant:"]
    and generation should also stop at `ChatTemplate.stop_strings`.

Only the stdlib is imported here at module level; `tokenizers` is imported by the BPE code only.
"""
from __future__ import annotations

import abc
import codecs
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
REPLACEMENT = "\ufffd".encode()

# Names imported tokenizers use for the same roles (looked up among their *added* tokens only, so a
# plain vocabulary piece such as "<s>" in HTML-heavy byte-level vocabularies is never mistaken for one).
_KNOWN_BOS = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
_KNOWN_EOS = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")
_KNOWN_PAD = (PAD, "<pad>", "[PAD]", "<|padding|>")
_KNOWN_END_OF_TURN = (END, "<|eot_id|>", "<|im_end|>", "<end_of_turn>")


class TokenizerError(ValueError):
    """A tokenizer file or input that cannot be used; the message says what is wrong and what to do."""


# ---- the GPT-2 byte <-> unicode table ----------------------------------------------------------
def _byte_to_unicode() -> dict[int, str]:
    """Byte-level BPE spells every byte as one printable character: bytes that are already visible,
    non-space Latin-1 characters stand for themselves; the other 68 (controls, space, 0x7F-0xA0,
    the soft hyphen 0xAD) are moved, in byte order, to U+0100 onwards. So space is "Ġ" (U+0120)."""
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in visible}
    moved = (b for b in range(256) if b not in table)
    for offset, b in enumerate(moved):
        table[b] = chr(0x100 + offset)
    return dict(sorted(table.items()))


BYTE_TO_UNICODE: dict[int, str] = _byte_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in UNICODE_TO_BYTE.items()})
_NOT_BYTE_SYMBOL = re.compile("[^" + re.escape("".join(UNICODE_TO_BYTE)) + "]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SURROGATE = re.compile("[\ud800-\udfff]")


def byte_level_bytes(token: str) -> bytes:
    """Raw bytes of a byte-level BPE token string ("Ġworld" -> b" world"). Characters outside the
    table (only in malformed vocabularies) count as their own UTF-8."""
    if _NOT_BYTE_SYMBOL.search(token) is None:
        return token.translate(_TO_LATIN1).encode("latin-1")
    return b"".join(bytes([UNICODE_TO_BYTE[c]]) if c in UNICODE_TO_BYTE else c.encode() for c in token)


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
    return _SURROGATE.sub("\ufffd", text)


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
    """Common interface. Subclasses fill `_table` (raw bytes per id; None = no token), `special_ids`,
    `_specials` (special token text -> id) and the pad/bos/eos ids (None where the tokenizer has none).

    `byte_exact` is True when `_table` holds every token's exact bytes; then decoding and streaming
    work on bytes. When False (unknown HF decoders) `_decode_fallback` and decode-diffing are used.
    `_strip_leading` is how many leading spaces the decoder removes from the start of a text.
    """

    byte_exact: bool = True
    _strip_leading: int = 0

    def __init__(self) -> None:
        self._table: list[bytes | None] = []
        self.special_ids: frozenset[int] = frozenset()
        self._specials: dict[str, int] = {}
        self.pad_id: int | None = None
        self.bos_id: int | None = None
        self.eos_id: int | None = None

    # -- sizes and names --
    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token's text -> id."""
        return dict(self._specials)

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Implemented by each tokenizer kind."""

    @abc.abstractmethod
    def id_to_token(self, id: int) -> str | None:
        """Implemented by each tokenizer kind."""

    def stop_ids(self) -> set[int]:
        """Ids that end a generation: eos, <|end|>, and the end-of-turn tokens of imported chat
        vocabularies (<|eot_id|>, <|im_end|>, <end_of_turn>) where present."""
        ids = {self.eos_id, *(self._specials.get(name) for name in _KNOWN_END_OF_TURN)}
        return {i for i in ids if i is not None}

    # -- encoding --
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

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Implemented by each tokenizer kind."""

    # -- decoding --
    def token_bytes(self, id: int, *, skip_special: bool = False) -> bytes:
        """Raw bytes of one token: a special token is its text (b"<|end|>"), or b"" with
        skip_special=True. Bytes of a multi-byte character may be split across tokens, so one
        token's bytes need not be valid UTF-8. An id outside the vocabulary raises TokenizerError."""
        id = operator.index(id)
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._piece(id, skip_special)

    def _piece(self, id: int, skip_special: bool) -> bytes:
        """Bytes of one id for decoding; never raises (unknown ids -> U+FFFD)."""
        if skip_special and id in self.special_ids:
            return b""
        if 0 <= id < len(self._table):
            data = self._table[id]
            return REPLACEMENT if data is None else data
        return REPLACEMENT

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids` (list, tuple, numpy array or tensor). Invalid UTF-8 -> U+FFFD; never raises."""
        ids = _as_ids(ids)
        if not self.byte_exact:
            return self._decode_fallback(ids, skip_special)
        text = b"".join([self._piece(i, skip_special) for i in ids]).decode("utf-8", "replace")
        return self._lstrip(text)

    def _lstrip(self, text: str) -> str:
        if self._strip_leading:
            spaces = len(text) - len(text.lstrip(" "))
            text = text[min(spaces, self._strip_leading):]
        return text

    def _decode_fallback(self, ids: list[int], skip_special: bool) -> str:
        """Decoding for tokenizers that are not byte-exact; byte-exact ones never get here."""
        return b"".join(self.token_bytes(i, skip_special=skip_special) for i in ids
                        if 0 <= i < self.vocab_size).decode("utf-8", errors="replace")

    # -- files --
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
        self._table = [bytes([b]) for b in range(256)] + [s.encode() for s in specials]
        self._specials = {s: 256 + n for n, s in enumerate(specials)}
        self.special_ids = frozenset(self._specials.values())
        self.pad_id, self.bos_id, self.eos_id = (self._specials.get(s) for s in (PAD, BOS, EOS))

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

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

    def id_to_token(self, id: int) -> str | None:
        """Printable ASCII bytes as themselves, other bytes as "<0xNN>", specials as their text."""
        id = operator.index(id)
        if 0 <= id < 256:
            return chr(id) if 0x21 <= id < 0x7F else f"<0x{id:02X}>"
        if 256 <= id < self.vocab_size:
            return self._table[id].decode()
        return None

    @property
    def special_token_list(self) -> list[str]:
        return [t.decode() for t in self._table[256:]]

    def save(self, path: str | Path) -> Path:
        data = {"type": BYTE_FORMAT, "version": 1, "special_tokens": self.special_token_list}
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
def _flatten(component: Any) -> list[dict[str, Any]]:
    """The steps of a tokenizer.json decoder/pre_tokenizer, Sequence or single, as a flat list."""
    if not isinstance(component, dict):
        return []
    inner = component.get("decoders") or component.get("pretokenizers")
    if component.get("type") == "Sequence" and isinstance(inner, list):
        return [step for sub in inner for step in _flatten(sub)]
    return [component]


def _analyse(spec: dict[str, Any]) -> tuple[str, str, bool, int]:
    """(scheme, metaspace replacement, byte fallback, leading spaces stripped) of a tokenizer.json."""
    decoders = _flatten(spec.get("decoder"))
    kinds = [d.get("type") for d in decoders]
    replacement, scheme, strip = "▁", "other", 0
    if "ByteLevel" in kinds or (not decoders and "ByteLevel" in
                                [p.get("type") for p in _flatten(spec.get("pre_tokenizer"))]):
        scheme = "byte_level"
    for d in decoders:
        if d.get("type") == "Metaspace":
            scheme, replacement = "metaspace", d.get("replacement") or d.get("str_rep") or "▁"
            if d.get("prepend_scheme", "always" if d.get("add_prefix_space", True) else "never") != "never":
                strip = max(strip, 1)
        elif (d.get("type") == "Replace" and d.get("content") == " " and scheme != "byte_level"
              and isinstance(d.get("pattern"), dict) and len(d["pattern"].get("String") or "") == 1):
            scheme, replacement = "metaspace", d["pattern"]["String"]
        elif d.get("type") == "Strip" and d.get("content") == " ":
            strip += int(d.get("start", d.get("left", 0)) or 0)
    modelled = {"byte_level": {"ByteLevel", "Fuse"},
                "metaspace": {"Metaspace", "Replace", "ByteFallback", "Fuse", "Strip"}}.get(scheme, set())
    if not set(kinds) <= modelled and kinds:
        scheme = "other"  # a decoder step we do not model: let Hugging Face decode
    return scheme, replacement, "ByteFallback" in kinds, strip if scheme == "metaspace" else 0


def _config_token(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # older tokenizer_config.json spell AddedTokens out
        value = value.get("content")
    return value if isinstance(value, str) else None


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer`: our byte-level BPE (`train`) or any tokenizer.json
    (`from_file`). `scheme` says how token strings map to bytes: "byte_level", "metaspace" or
    "other" (see the module docstring). `hf` is the wrapped object; it has
    encode_special_tokens=True so that special-token text in input stays plain text."""

    def __init__(self, hf: Any, *, config: Mapping[str, Any] | None = None, source: str | None = None):
        super().__init__()
        self._hf = hf
        self._hf_with_specials = None  # made on first encode(allow_special=True)
        self.source = source
        spec = json.loads(hf.to_str())
        self.scheme, self._replacement, self._byte_fallback, self._strip_leading = _analyse(spec)
        self.byte_exact = self.scheme != "other"

        vocab: dict[str, int] = hf.get_vocab(with_added_tokens=True)
        added = {i: t for i, t in hf.get_added_tokens_decoder().items()}
        size = max([*vocab.values(), *added, -1]) + 1
        self._tokens: list[str | None] = [None] * size
        for token, i in vocab.items():
            self._tokens[i] = token
        for i, t in added.items():
            self._tokens[i] = t.content
        self._table = [None if s is None else s.encode() if i in added else self._bytes_of(s)
                       for i, s in enumerate(self._tokens)]
        added_by_text = {t.content: i for i, t in added.items()}
        self._specials = {t.content: i for i, t in added.items() if t.special}
        self._specials.update({s: added_by_text[s] for s in SPECIAL_TOKENS if s in added_by_text})
        self.special_ids = frozenset(self._specials.values())
        self._added = added_by_text

        config = config or {}
        for attr, key, known in (("pad_id", "pad_token", _KNOWN_PAD), ("bos_id", "bos_token", _KNOWN_BOS),
                                 ("eos_id", "eos_token", _KNOWN_EOS)):
            name = _config_token(config, key)
            found = hf.token_to_id(name) if name else None
            if found is None:
                found = next((added_by_text[n] for n in known if n in added_by_text), None)
            setattr(self, attr, found)
        hf.encode_special_tokens = True

    def _bytes_of(self, token: str) -> bytes | None:
        if self.scheme == "byte_level":
            return byte_level_bytes(token)
        if self.scheme == "metaspace":
            match = _BYTE_PIECE.fullmatch(token) if self._byte_fallback else None
            return bytes([int(match[1], 16)]) if match else token.replace(self._replacement, " ").encode()
        return None  # "other": see token_bytes / _decode_fallback

    def __repr__(self) -> str:
        src = f", source={self.source!r}" if self.source else ""
        return f"BPETokenizer(vocab_size={self.vocab_size}, scheme={self.scheme!r}{src})"

    @property
    def hf(self) -> Any:
        return self._hf

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

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = [_without_surrogates(_check_text(t)) for t in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    # -- names --
    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        id = operator.index(id)
        return self._tokens[id] if 0 <= id < len(self._tokens) else None

    # -- decoding --
    def token_bytes(self, id: int, *, skip_special: bool = False) -> bytes:
        if self.byte_exact:
            return super().token_bytes(id, skip_special=skip_special)
        id = operator.index(id)
        if not 0 <= id < self.vocab_size:
            raise TokenizerError(f"token id {id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if skip_special and id in self.special_ids:
            return b""
        return self._hf.decode([id], skip_special_tokens=False).encode()  # approximate: see module doc

    def _decode_fallback(self, ids: list[int], skip_special: bool) -> str:
        valid = [i for i in ids if 0 <= i < self.vocab_size]  # out-of-range ids are dropped here
        return self._hf.decode(valid, skip_special_tokens=skip_special)

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


# ---- chat --------------------------------------------------------------------------------------
ROLES = ("system", "user", "assistant")
_PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_MARK = re.compile(r"^(System|User|Assistant):", re.MULTILINE)


class ChatTemplate:
    """Messages [{"role": "system"|"user"|"assistant", "content": str}, ...] <-> token ids.

    Tokenizers with <|system|>, <|user|>, <|assistant|> and <|end|> (ours):
        <|system|>content<|end|><|user|>content<|end|><|assistant|>content<|end|> ... [<|assistant|>]
    Others (imported HF tokenizers) use plain text, one "Role: content" line per message:
        "System: ...\\nUser: ...\\nAssistant: ...\\n" [+ "Assistant:"]
    which a base model continues naturally; a content line that itself starts with "User:" etc.
    reads back as a new message. Generation should stop at `stop_ids` and, in plain mode, at
    `stop_strings` (the model starting the next turn).

    `render` adds no BOS: prepend `tokenizer.bos_id` if the model was trained with one. Content is
    encoded as plain text, so a user typing "<|end|>" cannot close their own turn.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._role_ids = {role: tokenizer.token_to_id(f"<|{role}|>") for role in ROLES}
        self._end_id = tokenizer.token_to_id(END)
        self.uses_special_tokens = self._end_id is not None and None not in self._role_ids.values()
        self.stop_ids: set[int] = tokenizer.stop_ids()
        self.stop_strings: tuple[str, ...] = () if self.uses_special_tokens else tuple(
            f"\n{name}:" for name in _PLAIN_NAMES.values())

    @staticmethod
    def _check(messages: Any) -> list[tuple[str, str]]:
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
            raise TokenizerError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                                 f"got {type(messages).__name__}")
        checked = []
        for n, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise TokenizerError(f"message {n} must be a dict with 'role' and 'content', "
                                     f"got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise TokenizerError(f"message {n} has role {role!r}; the roles are {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise TokenizerError(f"message {n} ({role}) has content of type {type(content).__name__}; "
                                     "content must be a str (join multi-part content into one string)")
            checked.append((role, content))
        return checked

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation, ending with the assistant prompt if add_generation_prompt."""
        checked = self._check(messages)
        tok = self.tokenizer
        if not self.uses_special_tokens:
            text = "".join(f"{_PLAIN_NAMES[role]}: {content}\n" for role, content in checked)
            return tok.encode(text + ("Assistant:" if add_generation_prompt else ""))
        ids: list[int] = []
        for role, content in checked:
            ids.append(self._role_ids[role])
            ids.extend(tok.encode(content))
            ids.append(self._end_id)
        if add_generation_prompt:
            ids.append(self._role_ids["assistant"])
        return ids

    def parse(self, ids) -> list[dict]:
        """Messages from token ids (the inverse of render). A message cut short (no <|end|>, e.g. a
        reply still being generated) is returned if it has text; the empty generation prompt is not.
        Tokens outside any message (BOS, EOS, padding) are ignored."""
        ids = _as_ids(ids)
        if not self.uses_special_tokens:
            return self._parse_plain(self.tokenizer.decode(ids))
        roles = {i: role for role, i in self._role_ids.items()}
        messages: list[dict] = []
        role: str | None = None
        body: list[int] = []
        for i in ids:
            if i in roles:
                if role is not None:  # the previous message was never closed
                    messages.append({"role": role, "content": self.tokenizer.decode(body)})
                role, body = roles[i], []
            elif i == self._end_id:
                if role is not None:
                    messages.append({"role": role, "content": self.tokenizer.decode(body)})
                role, body = None, []
            elif role is not None:
                body.append(i)
        if role is not None:
            content = self.tokenizer.decode(body)
            if content:
                messages.append({"role": role, "content": content})
        return messages

    @staticmethod
    def _parse_plain(text: str) -> list[dict]:
        marks = list(_PLAIN_MARK.finditer(text))
        names = {v: k for k, v in _PLAIN_NAMES.items()}
        messages = []
        for n, mark in enumerate(marks):
            body = text[mark.end(): marks[n + 1].start() if n + 1 < len(marks) else len(text)]
            closed = body.endswith("\n")
            body = body[1:] if body.startswith(" ") else body
            body = body[:-1] if closed else body
            if closed or body:
                messages.append({"role": names[mark[1]], "content": body})
        return messages


# ---- streaming ---------------------------------------------------------------------------------
class StreamDecoder:
    """Turns ids into text one id at a time; the pieces joined equal `tokenizer.decode(all ids)`.

    Byte-exact tokenizers: bytes go through an incremental UTF-8 decoder, which holds back a
    multi-byte character until its last byte arrives (a token may end mid-character). Other
    tokenizers: decode-diffing over a short window (the text of the window with the new id minus
    the text without it, held back while it ends in U+FFFD). `flush` returns what is left
    (incomplete bytes as U+FFFD) and resets the decoder for a new stream.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.reset()

    def reset(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = self.tokenizer._strip_leading
        self._ids: list[int] = []
        self._prefix = self._read = 0

    def push(self, token_id: int) -> str:
        """Text that became final with this id ("" while a character is incomplete)."""
        token_id = operator.index(token_id)
        if self.tokenizer.byte_exact:
            return self._lstrip(self._utf8.decode(self.tokenizer._piece(token_id, self.skip_special)))
        self._ids.append(token_id)
        before, after = self._window()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        if self.tokenizer.byte_exact:
            text = self._lstrip(self._utf8.decode(b"", final=True))
        else:
            before, after = self._window()
            text = after[len(before):]
        self.reset()
        return text

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        return (decode(self._ids[self._prefix:self._read], self.skip_special),
                decode(self._ids[self._prefix:], self.skip_special))

    def _lstrip(self, text: str) -> str:
        """The leading spaces a SentencePiece-style decoder drops from the start of the stream."""
        if self._strip and text:
            cut = min(len(text) - len(text.lstrip(" ")), self._strip)
            text = text[cut:]
            self._strip = self._strip - cut if not text else 0
        return text
