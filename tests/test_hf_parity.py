"""Our Transformer vs the Hugging Face reference implementation, through the import adapter."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ctxmem.backend import TorchBackend  # noqa: E402
from ctxmem.checkpoint import CheckpointError, load_model  # noqa: E402
from ctxmem.generation import Generator  # noqa: E402
from ctxmem.hf import export_hf, import_hf  # noqa: E402
from ctxmem.memory import MemoryConfig  # noqa: E402
from ctxmem.sampling import GenerationConfig  # noqa: E402
from ctxmem.tokenizer import ByteTokenizer  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A randomly initialised tiny LlamaForCausalLM (GQA on, untied embeddings), saved by save_pretrained."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, rope_theta=10000.0,
        eos_token_id=2, bos_token_id=1)
    model = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf_llama")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def imported(hf_llama, tmp_path_factory):
    return import_hf(hf_llama[1], tmp_path_factory.mktemp("ctxmem_llama"))


def test_imported_llama_gives_the_reference_logits(hf_llama, imported):
    # fp32, same operations in the same order except the attention kernel (HF sdpa vs ours):
    # 1e-4 absolute is the bound; we see 0-1e-6.
    ref, _ = hf_llama
    ours = load_model(imported)
    assert ours.cfg.n_kv_heads == 2 and not ours.cfg.tie_embeddings
    ids = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)


def test_imported_llama_continues_greedily_exactly_like_transformers_generate(hf_llama, imported):
    ref, _ = hf_llama
    prompt = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=40, do_sample=False)[0, 12:].tolist()
    generator = Generator(TorchBackend(load_model(imported)), ByteTokenizer(), MemoryConfig("full"))
    [completion] = generator.generate([prompt[0].tolist()], GenerationConfig(max_new_tokens=40, stop_token_ids=[2]))
    expected = expected[:expected.index(2)] if 2 in expected else expected
    assert completion.token_ids == expected


def test_export_back_to_hf_layout_reloads_in_transformers(imported, hf_llama, tmp_path):
    out = export_hf(imported, tmp_path / "hf_again")
    again = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf_llama[0](ids).logits)  # a pure renaming: bit-identical


def test_import_refuses_a_checkpoint_with_a_wrong_shape(hf_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = hf_llama[1]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(sd, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(64, 64\).*\(32, 64\)"):
        import_hf(broken, tmp_path / "out")


def test_import_refuses_unsupported_rope_scaling(hf_llama, tmp_path):
    from ctxmem.config import ConfigError

    cfg = json.loads((hf_llama[1] / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="yarn"):
        import_hf(tmp_path, tmp_path / "out")
