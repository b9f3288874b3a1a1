"""The Transformer: config validation, and cached decoding equal to the uncached forward."""
import pytest
import torch

from ctxmem.config import PRESETS, ConfigError, ModelConfig, preset
from ctxmem.model import Transformer, count_parameters


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        preset("huge")


def test_heads_that_do_not_divide_d_model_are_refused_with_the_reason():
    with pytest.raises(ConfigError, match="n_heads=5 does not divide d_model=64"):
        ModelConfig(d_model=64, n_heads=5)


def test_grouped_query_heads_must_divide_query_heads():
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        ModelConfig(d_model=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("field,value", [("norm", "batchnorm"), ("ffn", "tanh"), ("pos", "alibi"), ("dropout", 1.5),
                                         ("vocab_size", 0)])
def test_invalid_choices_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{field: value})


def test_config_round_trips_through_json(tmp_path):
    cfg = preset("small", vocab_size=512)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == cfg


def test_presets_have_the_promised_sizes():
    assert 2e5 <= preset("tiny").num_params() <= 6e5  # a few hundred thousand
    assert 8e6 <= preset("small", vocab_size=512).num_params() <= 12e6  # ~10M
    assert 110e6 <= preset("gpt-124m").num_params() <= 135e6  # GPT-2 small class
    with torch.device("meta"):
        for name in PRESETS:
            assert count_parameters(Transformer(preset(name))) == preset(name).num_params()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cached_decoding_equals_the_uncached_forward_for_every_preset(name):
    # fp32; the cached path multiplies (1 x D) rows where the uncached one multiplies (T x D)
    # blocks, so reductions run in a different order: 1e-4 absolute on logits of size ~1 covers
    # that and nothing else (a wrong position or mask moves logits by >1e-2). Tokens must match.
    # Every preset's own depth, width, heads and positions, with a 300-token vocabulary: the cache
    # never touches the embedding, and gpt-124m's 50257 rows were a third of its parameters to draw.
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=300)).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(ids)
        logits, past = model(ids[:, :8], use_cache=True)
        steps = [logits]
        for t in range(8, ids.shape[1]):
            logits, past = model(ids[:, t:t + 1], past=past, use_cache=True)
            steps.append(logits)
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.argmax(-1), full.argmax(-1))


def test_left_padding_does_not_change_a_rows_logits():
    # positions come from the slot mask, so padding slots are invisible to the real tokens
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=300)).eval()
    ids = torch.randint(0, 300, (1, 10))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        ref = model(ids)
        out = model(padded, attention_mask=mask)
    torch.testing.assert_close(out[:, 4:], ref, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any()
