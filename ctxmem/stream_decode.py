"""Streaming detokenisation: token ids go in one at a time, text comes out as soon as it is final.

The pieces joined equal `tokenizer.decode(all ids)`. Text is held back while it ends in an incomplete
character (a byte-level token may stop in the middle of a multi-byte character).

    Hugging Face tokenizers   `tokenizers.decoders.DecodeStream`: the tokenizer's own decoder
                              pipeline over a short window of ids, so byte-level BPE, SentencePiece
                              ("▁", byte fallback, the leading space stripped) and WordPiece ("##")
                              stream exactly as they decode.
    ByteTokenizer             Python's incremental UTF-8 decoder over the token bytes.

Only the stdlib is imported at module level; `tokenizers` only for a Hugging Face tokenizer.
"""
from __future__ import annotations

import codecs
import operator

from .tokenizer import REPLACEMENT, BPETokenizer, ByteTokenizer, Tokenizer


class StreamDecoder:
    """`push(id)` returns the text that became final with that id ("" while a character is
    incomplete); `flush()` returns what is still held back (an incomplete character as U+FFFD) and
    resets the decoder for a new stream."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        if not isinstance(tokenizer, (ByteTokenizer, BPETokenizer)):
            raise TypeError(f"StreamDecoder needs a ByteTokenizer or a BPETokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._hf = tokenizer.hf if isinstance(tokenizer, BPETokenizer) else None
        self.reset()

    def reset(self) -> None:
        """Forget everything pushed so far."""
        if self._hf is None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            return
        from tokenizers.decoders import DecodeStream

        self._stream = DecodeStream(skip_special_tokens=self.skip_special)
        # DecodeStream has no flush: to finish a stream we decode what it holds ourselves, against
        # the same context it diffs against (the ids behind the text it returned last).
        self._context: list[int] = []
        self._held: list[int] = []  # ids pushed since the last text returned

    def push(self, token_id: int) -> str:
        """Text that became final with this id."""
        token_id = operator.index(token_id)
        if self._hf is None:
            return self._utf8.decode(self.tokenizer._piece(token_id, self.skip_special))
        if not 0 <= token_id < self.tokenizer.vocab_size:
            # decode() spells an unknown id U+FFFD and decodes the ids on either side separately
            return self.flush() + REPLACEMENT
        self._held.append(token_id)
        text = self._stream.step(self._hf, token_id)
        if text is None:
            return ""
        self._context, self._held = self._held, []
        return text

    def flush(self) -> str:
        """The text still held back; the decoder is reset afterwards."""
        if self._hf is None:
            text = self._utf8.decode(b"", final=True)
        elif self._held:
            before = self.tokenizer.decode(self._context, self.skip_special)
            text = self.tokenizer.decode(self._context + self._held, self.skip_special)[len(before):]
        else:
            text = ""
        self.reset()
        return text
