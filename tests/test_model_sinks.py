"""Attention sinks trained into the model (ModelConfig.sink): 'learned' (a logit per head in the
softmax denominator) and 'token' (a dedicated token that starts every stream)."""
import numpy as np
import pytest
import torch

from ctxmem.backend import TorchBackend
from ctxmem.config import ConfigError, preset
from ctxmem.memory import ContextMemory, MemoryConfig
from ctxmem.model import Transformer
from test_memory_exact import ATOL, random_pieces, reference_logits

VOCAB = 300


def make(sink: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("tiny", vocab_size=VOCAB, max_seq_len=64, sink=sink)).eval()
    if sink == "learned":  # trained values are not zero: give the sinks weight to carry
        with torch.no_grad():
            for block in model.blocks:
                block.attn.head_sink.copy_(torch.linspace(-1.0, 2.0, block.attn.head_sink.numel()))
    return model


def test_learned_sink_logit_takes_attention_mass_and_trains():
    model = make("learned")
    ids = torch.randint(0, VOCAB, (2, 20))
    with_sink = model(ids)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.head_sink.fill_(-1e4)  # a sink nobody attends to = plain softmax
    plain = model(ids)
    reference = make("none")(ids)  # same seed, same weights but for the sink logits
    torch.testing.assert_close(plain, reference, atol=1e-5, rtol=0)
    assert (with_sink - plain).abs().max() > 1e-2
    model = make("learned").train()
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(b.attn.head_sink.grad is not None and b.attn.head_sink.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("sinks,window", [(0, 16), (2, 12)])
def test_learned_sink_model_is_exact_under_any_piecing(sinks, window):
    model = make("learned")
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, 4 * (sinks + window)).tolist()
    ref = reference_logits(model, tokens, sinks, window)
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=sinks, window=window))
    state = mem.start(1)
    got = np.concatenate([mem.feed(state, [tokens[a:b]], all_logits=True)[0]
                          for a, b in random_pieces(rng, len(tokens), 2 * window)])
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_token_sink_starts_every_stream_and_logits_stay_aligned():
    model = make("token")
    sink_id = model.cfg.sink_token_id
    assert sink_id == VOCAB - 1
    mem = ContextMemory(TorchBackend(model), MemoryConfig("sink", sinks=1, window=20))
    tokens = np.random.default_rng(1).integers(0, VOCAB - 1, 70).tolist()
    ref = reference_logits(model, [sink_id] + tokens, sinks=1, window=20)[1:]  # the stream as trained
    state = mem.start(2)
    got = mem.feed(state, [tokens[:30], tokens[:5]], all_logits=True)  # rows start now: both get the sink
    np.testing.assert_allclose(got[0], ref[:30], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1, -5:], ref[:5], atol=ATOL, rtol=0)
    assert state.kept_tokens(1)[:1] == [sink_id] and int(state.seen[1]) == 6
    later = mem.feed(state, [tokens[30:70], tokens[5:9]])  # running rows get no second sink
    np.testing.assert_allclose(later[0], ref[69], atol=ATOL, rtol=0)
    assert state.kept_tokens(0)[0] == sink_id and int(state.seen[0]) == 71


def test_config_checks_the_sink_kind_and_hf_export_refuses_learned():
    with pytest.raises(ConfigError, match="sink"):
        preset("tiny", sink="both")
    with pytest.raises(ConfigError, match="learned"):
        preset("llama", sink="learned").to_hf_llama()
    assert preset("tiny", sink="learned").num_params() == Transformer(preset("tiny", sink="learned")).cfg.num_params()
    counted = sum(p.numel() for p in Transformer(preset("tiny", sink="learned")).parameters())
    assert preset("tiny", sink="learned").num_params() == counted


def test_checkpoint_round_trip_keeps_the_sink(tmp_path):
    from ctxmem.checkpoint import load_model, save_checkpoint
    from ctxmem.tokenizer import ByteTokenizer

    model = make("learned")
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, sink="learned"))
    save_checkpoint(tmp_path, model, tok)
    loaded = load_model(tmp_path)
    assert loaded.cfg.sink == "learned"
    torch.testing.assert_close(loaded.blocks[0].attn.head_sink, model.blocks[0].attn.head_sink)


@pytest.mark.slow
@pytest.mark.parametrize("sink", ["learned", "token"])
def test_sink_models_export_to_onnx_with_the_usual_parity(sink, tmp_path):
    """The export verifies (values within 1e-4 at prefill, decode, after 3 window slides, the end of
    the context; greedy tokens identical), with the sink logit or the sink token on both sides."""
    import json

    from ctxmem.checkpoint import save_checkpoint
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size + (sink == "token"), sink=sink))
    if sink == "learned":
        with torch.no_grad():
            for block in model.blocks:
                block.attn.head_sink.uniform_(-1, 2)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    out = export_onnx(tmp_path / "ckpt", tmp_path / "export",
                      memory=MemoryConfig("sink", sinks=1 if sink == "token" else 0, window=60))
    report = json.loads((out / "verification.json").read_text())
    assert report["status"] == "passed" and report["greedy"]["identical"]


def test_recompute_keeps_the_sink_token_first():
    model = make("token")
    mem = ContextMemory(TorchBackend(model), MemoryConfig("recompute", window=16, chunk=4))
    state = mem.start(1)
    tokens = np.random.default_rng(2).integers(0, VOCAB - 1, 40).tolist()
    for t in tokens:
        mem.feed(state, [[t]])
    kept = state.kept_tokens(0)
    assert kept[0] == model.cfg.sink_token_id and kept[-1] == tokens[-1] and len(kept) <= 16
    assert kept[1:] == tokens[len(tokens) - (len(kept) - 1):]
