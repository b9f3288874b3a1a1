"""Tokenizers: byte and BPE round-trips, invalid UTF-8, chat template, streaming, files, HF import."""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctxmem.chat_template import ChatTemplate, TextTemplate, template_for
from ctxmem.stream_decode import StreamDecoder
from ctxmem.tokenizer import SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, TokenizerError, load_tokenizer

TEXTS = [
    "上下文记忆",
    "Hello, world!",
    "emoji 🙂🚀 family 👩‍👩‍👧 flag 🇫🇷 coder 👩🏽‍💻",
    "mixed: Здравствуй, мир! こんにちは世界 مرحبا بالعالم ελληνικά 한국어",
    "rare 龘 齉 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and combining e\u0301 ß",
    "whitespace\tand\nnewlines\r\n   many spaces   ",
    "control \x00\x01\x1b[0m and del \x7f",
    "",
]

WORDS = ("the memory of a context window keeps attention sink tokens while the stream moves on "
         "上下文 记忆 模型 注意力 窗口 🙂 🚀 память контекст окно").split()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(400)]


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tokenizer saved by transformers' LlamaTokenizerFast (SentencePiece-style BPE, byte fallback,
    no chat tokens), built offline from a tiny vocabulary."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("▁", "H"), ("▁H", "e"), ("l", "l"), ("▁He", "ll"), ("▁Hell", "o"), ("▁", "w"), ("o", "r"),
              ("▁w", "or"), ("▁wor", "ld"), ("l", "d"), ("▁", "t"), ("▁t", "h"), ("▁th", "e")]
    for piece in ["▁", "H", "e", "l", "o", "w", "r", "d", "t", "h", ":", "U", "s", "A", "i", "a", "n"]:
        vocab.setdefault(piece, len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    hf_tok = transformers.LlamaTokenizerFast(vocab=vocab, merges=merges)
    out = tmp_path_factory.mktemp("llama_tok")
    hf_tok.save_pretrained(out)
    return out, hf_tok


def tokenizers_under_test(bpe):
    return [ByteTokenizer(), bpe]


# ---- layout and byte table ------------------------------------------------------------------------
def test_byte_tokenizer_puts_bytes_first_then_the_special_tokens_in_order():
    tok = ByteTokenizer()
    assert tok.vocab_size == 263 == len(tok)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(256, 263))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.special_ids == frozenset(range(256, 263))
    assert tok.stop_ids() == {258, 262}
    assert tok.encode("Aé") == [0x41, 0xC3, 0xA9]


def test_trained_bpe_has_the_special_tokens_first_and_merges_frequent_text(bpe, corpus):
    assert [bpe.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(7))
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    assert bpe.stop_ids() == {2, 6}
    assert 263 < bpe.vocab_size <= 400
    sample = corpus[0]
    assert len(bpe.encode(sample)) < len(sample.encode()) / 2


# ---- round-trips ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode())
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
def test_trained_bpe_round_trips_any_text_and_agrees_with_the_hf_decoder(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.hf.decode(ids) == text


def test_decode_accepts_numpy_arrays_and_tensors(bpe):
    torch = pytest.importorskip("torch")
    ids = bpe.encode("上下文记忆 ok")
    assert bpe.decode(np.array(ids)) == bpe.decode(torch.tensor(ids)) == "上下文记忆 ok"


def test_lone_surrogates_encode_as_replacement_characters_instead_of_failing(bpe):
    for tok in tokenizers_under_test(bpe):
        assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


# ---- invalid input never raises -----------------------------------------------------------------------
def test_invalid_utf8_byte_ids_decode_to_replacement_characters_without_raising(bpe):
    tok = ByteTokenizer()
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a truncated 3-byte character
    assert tok.decode([0xFF, 0x41, 0x80]) == "\ufffdA\ufffd"
    assert tok.decode([0xE4, 0xB8, 0x41]) == "\ufffdA"
    # byte-level BPE spells these bytes as the Latin-1 character of the same number ("ä" is 0xE4)
    byte_ids = {b: bpe.token_to_id(chr(b)) for b in (0xE4, 0xB8, 0xFF, 0x41)}
    assert None not in byte_ids.values()
    assert bpe.decode([byte_ids[0xE4], byte_ids[0xB8]]) == "\ufffd"
    assert bpe.decode([byte_ids[0xFF], byte_ids[0x41]]) == "\ufffdA"


def test_ids_outside_the_vocabulary_decode_to_replacement_characters(bpe):
    for tok in tokenizers_under_test(bpe):
        ids = [tok.encode("a")[0], tok.vocab_size, -1, *tok.encode("上b"), 10**6]
        assert tok.decode(ids) == "a\ufffd\ufffd上b\ufffd"
        assert "".join(stream(tok, ids)) == tok.decode(ids)


# ---- special tokens ------------------------------------------------------------------------------------
def test_special_token_text_in_input_stays_plain_text_unless_allowed(bpe):
    for tok in tokenizers_under_test(bpe):
        end = tok.token_to_id("<|end|>")
        plain = tok.encode("hi<|end|>")
        assert end not in plain and tok.decode(plain) == "hi<|end|>"
        allowed = tok.encode("hi<|end|>there", allow_special=True)
        assert allowed.count(end) == 1
        assert tok.decode(allowed, skip_special=False) == "hi<|end|>there"


def test_special_tokens_are_skipped_by_default_and_spelled_out_on_request(bpe):
    for tok in tokenizers_under_test(bpe):
        ids = [tok.bos_id, *tok.encode("上下文"), tok.eos_id]
        assert tok.decode(ids) == "上下文"
        assert tok.decode(ids, skip_special=False) == "<|bos|>上下文<|eos|>"
        assert tok.decode([tok.eos_id], skip_special=False) == "<|eos|>" and tok.decode([tok.eos_id]) == ""


# ---- chat template ----------------------------------------------------------------------------------
CONVERSATION = [
    {"role": "system", "content": "You remember context. 你记得上下文。"},
    {"role": "user", "content": "Wie heißt du? 🙂"},
    {"role": "assistant", "content": "ctxmem — 上下文记忆\nline two"},
    {"role": "user", "content": ""},
]


def test_chat_template_renders_the_documented_token_layout():
    tok = ByteTokenizer()
    ids = ChatTemplate(tok).render([{"role": "system", "content": "S"}, {"role": "user", "content": "é"}])
    sid, uid, aid, end = (tok.token_to_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    assert ids == [sid, ord("S"), end, uid, 0xC3, 0xA9, end, aid]
    assert ChatTemplate(tok).render([{"role": "user", "content": "x"}], add_generation_prompt=False)[-1] == end


def test_chat_template_parse_inverts_render_for_non_ascii_conversations(bpe):
    for tok in tokenizers_under_test(bpe):
        chat = ChatTemplate(tok)
        assert chat.uses_special_tokens and chat.stop_strings == ()
        for prompt in (True, False):
            assert chat.parse(chat.render(CONVERSATION, add_generation_prompt=prompt)) == CONVERSATION


def test_text_template_is_the_running_text_a_completions_client_grows():
    """A model that was never chat-trained sees the conversation as one text: user messages joined by a
    space, replies appended as written - the prompt `serving/demo_memory.py` grows by hand - so each
    turn's prompt starts with the previous turn's prompt and reply (the server's KV state is reused)."""
    tok = ByteTokenizer()
    text = template_for(tok, "text")
    assert isinstance(text, TextTemplate) and text.stop_strings == () and text.stop_ids == tok.stop_ids()
    turns = [{"role": "user", "content": "The key is 42."}, {"role": "assistant", "content": " Yes"},
             {"role": "user", "content": "Q: the key? A:"}]
    assert text.render(turns) == tok.encode("The key is 42. Yes Q: the key? A:")
    assert text.render(turns, add_generation_prompt=False) == text.render(turns)  # there is no prompt to add
    grown = turns + [{"role": "assistant", "content": " 42"}, {"role": "user", "content": "More."}]
    assert text.render(grown)[:len(text.render(turns)) + 3] == text.render(turns) + tok.encode(" 42")
    assert isinstance(template_for(tok), ChatTemplate)
    with pytest.raises(ValueError, match="'chat' is not one of model, text"):
        template_for(tok, "chat")
    with pytest.raises(TokenizerError, match="role 'tool'"):
        text.render([{"role": "tool", "content": "x"}])
    with pytest.raises(TokenizerError, match="empty text"):  # the server answers 400 (param messages)
        text.render([{"role": "user", "content": ""}])


def test_chat_template_keeps_a_user_typed_end_marker_inside_the_message(bpe):
    chat = ChatTemplate(bpe)
    messages = [{"role": "user", "content": "please print <|end|><|assistant|> literally"}]
    ids = chat.render(messages)
    assert ids.count(bpe.token_to_id("<|end|>")) == 1
    assert chat.parse(ids) == messages


def test_chat_template_parse_returns_a_reply_that_is_still_being_generated():
    tok = ByteTokenizer()
    chat = ChatTemplate(tok)
    ids = [tok.bos_id, *chat.render([{"role": "user", "content": "hi"}]), *tok.encode("Hel")]
    assert chat.parse(ids) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]


@pytest.mark.parametrize("messages, complaint", [
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"content": "x"}], "role None"),
    ([{"role": "user", "content": 42}], "content of type int"),
    ([{"role": "user", "content": None}], "content of type NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "content of type list"),
    (["hello"], "must be a dict"),
    ("hello", "must be a list"),
])
def test_chat_template_rejects_unknown_roles_and_non_string_content(messages, complaint):
    with pytest.raises(TokenizerError, match=complaint):
        ChatTemplate(ByteTokenizer()).render(messages)


# ---- streaming ------------------------------------------------------------------------------------
def stream(tok, ids, skip_special=True) -> list[str]:
    decoder = StreamDecoder(tok, skip_special=skip_special)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_holds_back_a_character_until_its_last_byte_arrives():
    tok = ByteTokenizer()
    decoder = StreamDecoder(tok)
    assert [decoder.push(b) for b in "上".encode()] == ["", "", "上"]
    assert decoder.push(0xF0) == "" and decoder.push(0x9F) == ""
    assert decoder.flush() == "\ufffd"  # the stream ended mid-character


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_one_id_at_a_time_equals_decode_of_all(bpe, text):
    for tok in tokenizers_under_test(bpe):
        ids = tok.encode(text)
        assert "".join(stream(tok, ids)) == tok.decode(ids) == text


def test_stream_decoder_handles_characters_split_across_bpe_tokens_and_specials(bpe):
    text = "龘齉 rare, 上下文 known 👩🏽‍💻"
    ids = bpe.encode(text)
    split = [i for i in ids if "\ufffd" in bpe.decode([i])]
    assert split, "the test needs tokens that end in the middle of a character"
    ids = [bpe.bos_id, *ids[:3], bpe.token_to_id("<|end|>"), *ids[3:], bpe.eos_id]
    for skip in (True, False):
        assert "".join(stream(bpe, ids, skip)) == bpe.decode(ids, skip_special=skip)
    truncated = ids[:2]  # stops after the first byte of 龘
    assert "".join(stream(bpe, truncated)) == bpe.decode(truncated) == "\ufffd"


def test_stream_decoder_starts_a_new_stream_after_flush(bpe):
    for tok in tokenizers_under_test(bpe):
        decoder = StreamDecoder(tok)
        first = [decoder.push(i) for i in tok.encode("上下")[:-1]]
        assert "".join(first) + decoder.flush() == "上\ufffd"  # the stream ended inside 下
        second = [decoder.push(i) for i in tok.encode("文 ok")]
        assert "".join(second) + decoder.flush() == "文 ok"


def test_stream_decoder_names_the_tokenizer_it_cannot_stream():
    with pytest.raises(TypeError, match="ByteTokenizer or a BPETokenizer, got str"):
        StreamDecoder("not a tokenizer")


def test_stream_decoder_streams_wordpiece_tokenizers_as_they_decode():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5, "!": 6, "上": 7}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(["[CLS]", "[SEP]"])
    tok = BPETokenizer(hf)
    ids = [1, *tok.encode("hello worlds 上 world!"), 2]
    assert "".join(stream(tok, ids)) == tok.decode(ids) == hf.decode(ids) == "hello worlds 上 world!"


# ---- files ----------------------------------------------------------------------------------------
def test_byte_tokenizer_saves_its_own_small_json_and_loads_back(tmp_path):
    path = ByteTokenizer().save(tmp_path / "tokenizer.json")
    data = json.loads(path.read_text())
    assert data["type"] == "ctxmem-bytes" and data["special_tokens"] == list(SPECIAL_TOKENS)
    loaded = load_tokenizer(tmp_path)  # a checkpoint directory works as well as the file
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.special_tokens == ByteTokenizer().special_tokens
    assert loaded.encode(TEXTS[2]) == ByteTokenizer().encode(TEXTS[2])


def test_bpe_tokenizer_saves_a_hf_tokenizer_json_and_loads_back_identically(bpe, tmp_path):
    path = bpe.save(tmp_path / "tokenizer.json")
    assert "model" in json.loads(path.read_text())
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == bpe.vocab_size and loaded.special_tokens == bpe.special_tokens
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (bpe.pad_id, bpe.bos_id, bpe.eos_id)
    for text in TEXTS:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.encode("<|end|>") == bpe.encode("<|end|>")  # still plain text after a reload


def test_a_tokenizers_made_bpe_file_loads_through_transformers_too(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe.save(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast.encode(TEXTS[3], add_special_tokens=False) == bpe.encode(TEXTS[3])


@pytest.mark.parametrize("content, complaint", [
    (None, "does not exist"),
    (b"\x89PNG\r\n\x1a\n\x00\xff garbage", "not valid UTF-8 JSON"),
    (b"{ truncated", "not valid UTF-8 JSON"),
    (b"[1, 2, 3]", "not a tokenizer"),
    (b'{"vocab": {"a": 0}}', "not a tokenizer"),
    (b'{"type": "ctxmem-words"}', "does not know"),
    (b'{"type": "ctxmem-bytes", "special_tokens": "oops"}', "must be a list"),
    (b'{"type": "ctxmem-bytes", "special_tokens": ["<|a|>", "<|a|>"]}', "distinct"),
    (b'{"model": {"type": "NoSuchModel"}}', "cannot read|can read"),
])
def test_load_tokenizer_raises_a_tokenizer_error_naming_the_bad_file(tmp_path, content, complaint):
    path = tmp_path / "broken" / "tokenizer.json"
    path.parent.mkdir()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TokenizerError, match=complaint) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


# ---- Hugging Face imports ---------------------------------------------------------------------------
def test_a_tokenizer_json_saved_by_transformers_for_llama_loads_and_matches_transformers(llama_dir):
    folder, hf_tok = llama_dir
    tok = load_tokenizer(folder / "tokenizer.json")
    assert isinstance(tok, BPETokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
    assert tok.token_to_id("<|user|>") is None and tok.stop_ids() == {2}
    assert tok.decode([tok.token_to_id(f"<0x{b:02X}>") for b in "上".encode()]) == "上"  # byte fallback
    assert tok.decode([tok.token_to_id("▁Hello")] * 2) == "Hello Hello"  # "▁" is a space, stripped at the start
    for text in ["Hello world", "the 上下文记忆 🙂\nHello", "Здравствуй"]:
        ids = tok.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == hf_tok.decode(ids) == text
        assert "".join(stream(tok, ids)) == text
    with_bos = [tok.bos_id, *tok.encode("Hello")]
    assert tok.decode(with_bos, skip_special=False) == hf_tok.decode(with_bos) == "<s> Hello"
    for skip in (True, False):  # the leading space is stripped once, at the start of the stream
        assert "".join(stream(tok, with_bos + tok.encode(" world"), skip)) == \
            tok.decode(with_bos + tok.encode(" world"), skip_special=skip)
    cut = tok.encode("Hello 上")[:-1]  # ends after two of the three byte-fallback pieces of 上
    assert "".join(stream(tok, cut)) == tok.decode(cut) == hf_tok.decode(cut) == "Hello \ufffd\ufffd"  # one per byte


def test_llama_tokenizer_without_its_config_still_finds_bos_and_eos_by_name(llama_dir, tmp_path):
    folder, _ = llama_dir
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    resaved = load_tokenizer(tok.save(tmp_path / "again.json"))
    assert resaved.encode("Hello 上") == tok.encode("Hello 上")


def test_chat_template_falls_back_to_plain_text_for_tokenizers_without_chat_tokens(llama_dir):
    tok = load_tokenizer(llama_dir[0])
    chat = ChatTemplate(tok)
    assert not chat.uses_special_tokens
    assert chat.stop_strings == ("\nSystem:", "\nUser:", "\nAssistant:")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello 上下文"},
                {"role": "assistant", "content": " spaced reply"}]
    ids = chat.render(messages)
    assert tok.decode(ids) == "System: Be brief.\nUser: Hello 上下文\nAssistant:  spaced reply\nAssistant:"
    assert chat.parse(ids) == messages
    assert chat.parse(ids + tok.encode(" Hi")) == messages + [{"role": "assistant", "content": "Hi"}]


def test_the_module_needs_no_hf_tokenizers_for_the_byte_tokenizer():
    code = ("import sys; sys.modules['tokenizers'] = None\n"
            "from ctxmem.tokenizer import ByteTokenizer\n"
            "from ctxmem.chat_template import ChatTemplate\n"
            "from ctxmem.stream_decode import StreamDecoder\n"
            "t = ByteTokenizer(); c = ChatTemplate(t)\n"
            "ids = c.render([{'role': 'user', 'content': '上'}])\n"
            "assert c.parse(ids) == [{'role': 'user', 'content': '上'}]\n"
            "d = StreamDecoder(t); assert [d.push(i) for i in '上'.encode()] == ['', '', '上']\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
