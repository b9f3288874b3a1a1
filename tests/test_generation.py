"""The shared sampler and generation loop (used by both the torch and the ONNX Runtime engines)."""
import numpy as np
import pytest

from ctxmem.generation import SequenceDecoder, StopStringFilter, load_generator
from ctxmem.memory import ContextOverflowError, MemoryConfig
from ctxmem.sampling import GenerationConfig, GenerationConfigError, Sampler
from ctxmem.tokenizer import ByteTokenizer

V = ByteTokenizer().vocab_size


def one_hot(token, vocab=V, high=10.0):
    logits = np.zeros(vocab, np.float32)
    logits[token] = high
    return logits


def test_greedy_picks_the_argmax_and_top_k_1_is_greedy_whatever_the_temperature():
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32)
    assert Sampler(GenerationConfig())(logits) == int(np.argmax(logits))
    assert Sampler(GenerationConfig(temperature=5.0, top_k=1, seed=3))(logits) == int(np.argmax(logits))


def test_sampling_is_reproducible_with_a_seed_and_top_p_keeps_only_the_nucleus():
    logits = np.random.default_rng(0).normal(size=V).astype(np.float32)
    draw = lambda seed: [Sampler(GenerationConfig(temperature=1.0, seed=seed))(logits) for _ in range(1)]  # noqa: E731
    a = Sampler(GenerationConfig(temperature=1.0, seed=7))
    b = Sampler(GenerationConfig(temperature=1.0, seed=7))
    assert [a(logits) for _ in range(20)] == [b(logits) for _ in range(20)]
    assert draw(1) != draw(2) or draw(3) != draw(4)
    peaked = one_hot(42, high=8.0)
    nucleus = Sampler(GenerationConfig(temperature=1.0, top_p=0.5, seed=0))
    assert {nucleus(peaked) for _ in range(50)} == {42}


def test_repetition_penalty_moves_away_from_seen_tokens():
    logits = np.zeros(V, np.float32)
    logits[10], logits[11] = 2.0, 1.9
    assert Sampler(GenerationConfig(repetition_penalty=1.5))(logits, history=[10]) == 11
    assert Sampler(GenerationConfig())(logits, history=[10]) == 10


@pytest.mark.parametrize("kwargs", [dict(temperature=float("nan")), dict(temperature=-1), dict(top_p=0.0),
                                    dict(max_new_tokens=-2), dict(top_k=-1), dict(repetition_penalty=0)])
def test_invalid_generation_settings_are_refused_by_name(kwargs):
    with pytest.raises(GenerationConfigError, match=next(iter(kwargs))):
        GenerationConfig(**kwargs)


def test_stop_strings_are_cut_and_partial_matches_held_back():
    f = StopStringFilter(["END"])
    assert f.push("hello E") == ("hello ", False)  # "E" might start "END"
    assert f.push("N") == ("", False)
    assert f.push("Dgone") == ("", True)
    g = StopStringFilter(["END"])
    assert g.push("ENough") == ("ENough", False)


def test_sequence_decoder_stops_on_stop_tokens_strings_and_length():
    tok = ByteTokenizer()
    by_token = SequenceDecoder(tok, GenerationConfig(max_new_tokens=10), [1])
    assert by_token.step(one_hot(ord("a"))).text == "a"
    end = by_token.step(one_hot(tok.token_to_id("<|end|>")))
    assert end.finish_reason == "stop" and by_token.text == "a" and by_token.token_ids == [ord("a")]

    by_string = SequenceDecoder(tok, GenerationConfig(max_new_tokens=10, stop=["xy"]), [1])
    texts = [by_string.step(one_hot(ord(c))).text for c in "abxy"]
    assert "".join(texts) == "ab" and by_string.finish_reason == "stop"

    by_length = SequenceDecoder(tok, GenerationConfig(max_new_tokens=2), [1])
    deltas = [by_length.step(one_hot(b)) for b in "é".encode()]  # one character split over two tokens
    assert [d.text for d in deltas] == ["", "é"] and deltas[-1].finish_reason == "length"


def test_streamed_deltas_add_up_to_the_completion_and_batches_equal_single_runs(tiny_checkpoint):
    gen = load_generator(tiny_checkpoint)
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=[])
    prompts = ["hello", "a much longer prompt about memory", "上下文"]
    singles = [gen.generate([p], config)[0] for p in prompts]
    batch = gen.generate(prompts, config)
    assert [c.token_ids for c in batch] == [c.token_ids for c in singles]
    streamed = {i: "" for i in range(3)}
    for deltas in gen.stream(prompts, config):
        for d in deltas:
            streamed[d.row] += d.text
    assert [streamed[i] for i in range(3)] == [c.text for c in batch]
    assert all(c.completion_tokens == 12 and c.finish_reason == "length" for c in batch)


def test_generation_past_the_context_needs_a_sliding_policy(tiny_checkpoint):
    gen = load_generator(tiny_checkpoint)  # context 128
    long = GenerationConfig(max_new_tokens=300, stop_token_ids=[])
    with pytest.raises(ContextOverflowError, match="choose policy 'sink' or 'recompute'"):
        gen.generate(["hi"], long)
    [sink] = gen.generate(["hi"], long, MemoryConfig("sink", window=60, sinks=4))
    [recompute] = gen.generate(["hi"], long, MemoryConfig("recompute", window=64, chunk=16))
    assert sink.completion_tokens == recompute.completion_tokens == 300
    assert sink.evicted == 2 + 300 - 1 - 64 and recompute.evicted > 0
