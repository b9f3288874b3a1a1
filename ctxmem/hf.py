"""Hugging Face Llama-family checkpoints <-> ctxmem checkpoints, through one adapter.

Reads and writes what `save_pretrained` writes (config.json, model.safetensors or a sharded
index, tokenizer.json); never touches the hub. Both layouts use the half-split RoPE convention,
so the mapping is a renaming with shape checks, no permutation.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .checkpoint import GENERATION, TOKENIZER, CheckpointError, load_state_dict, save_checkpoint, state_dict_for_saving
from .config import ModelConfig


def weight_map(cfg: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(ctxmem name, Hugging Face name, shape) for every tensor of a Llama-layout model."""
    d, kv, f = cfg.d_model, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff
    rows = [("tok_emb.weight", "model.embed_tokens.weight", (cfg.vocab_size, d)),
            ("norm.weight", "model.norm.weight", (d,))]
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head.weight", (cfg.vocab_size, d)))
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        rows += [
            (ours + "attn_norm.weight", theirs + "input_layernorm.weight", (d,)),
            (ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight", (d,)),
            (ours + "attn.wq.weight", theirs + "self_attn.q_proj.weight", (d, d)),
            (ours + "attn.wk.weight", theirs + "self_attn.k_proj.weight", (kv, d)),
            (ours + "attn.wv.weight", theirs + "self_attn.v_proj.weight", (kv, d)),
            (ours + "attn.wo.weight", theirs + "self_attn.o_proj.weight", (d, d)),
            (ours + "ffn.w_gate.weight", theirs + "mlp.gate_proj.weight", (f, d)),
            (ours + "ffn.w_up.weight", theirs + "mlp.up_proj.weight", (f, d)),
            (ours + "ffn.w_down.weight", theirs + "mlp.down_proj.weight", (d, f)),
        ]
    return rows


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    if single.exists():
        return load_state_dict(single)
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_state_dict(hf_dir / shard))
        return out
    if any(hf_dir.glob("*.bin")):
        raise CheckpointError(f"{hf_dir} holds pickled .bin weights; ctxmem never unpickles. Re-save them with "
                              "`model.save_pretrained(dir, safe_serialization=True)`")
    raise CheckpointError(f"{hf_dir} has no model.safetensors (or index): not a save_pretrained directory")


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a local Hugging Face Llama-family checkpoint into a ctxmem checkpoint."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{cfg_path} is missing: pass the directory `save_pretrained` wrote")
    hf_cfg = json.loads(cfg_path.read_text())
    cfg = ModelConfig.from_hf_llama(hf_cfg)
    if hf_cfg.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"head_dim={hf_cfg['head_dim']} differs from hidden_size/num_attention_heads="
                              f"{cfg.head_dim}; such models are not supported")
    theirs = _read_hf_weights(hf_dir)
    if cfg.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    ours: dict[str, torch.Tensor] = {}
    for our_name, hf_name, shape in weight_map(cfg):
        if hf_name not in theirs:
            raise CheckpointError(f"{hf_dir}: tensor {hf_name} is missing (needed for {our_name})")
        tensor = theirs.pop(hf_name)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{hf_dir}: {hf_name} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        ours[our_name] = tensor.float()
    leftovers = [k for k in theirs if not k.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise CheckpointError(f"{hf_dir}: tensors {leftovers[:5]} have no place in a Llama model")
    generation = {"generation": {}}
    eos = hf_cfg.get("eos_token_id")
    gen_file = hf_dir / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id", eos)
    if eos is not None:
        generation["generation"]["stop_token_ids"] = eos if isinstance(eos, list) else [eos]
    out = save_checkpoint(out_dir, config=cfg, state_dict=ours, generation=generation,
                          metadata={"source": "huggingface", "source_dir_name": hf_dir.name})
    if (hf_dir / TOKENIZER).exists():
        shutil.copyfile(hf_dir / TOKENIZER, out / TOKENIZER)
    return out


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a ctxmem checkpoint in the layout `LlamaForCausalLM.from_pretrained` reads."""
    from safetensors.torch import save_file

    from .checkpoint import load_model

    ckpt_dir, out = Path(ckpt_dir), Path(out_dir)
    model = load_model(ckpt_dir)
    cfg = model.cfg
    hf_cfg = cfg.to_hf_llama()
    sd = state_dict_for_saving(model)
    theirs = {}
    for our_name, hf_name, shape in weight_map(cfg):
        assert tuple(sd[our_name].shape) == shape, (our_name, tuple(sd[our_name].shape), shape)
        theirs[hf_name] = sd[our_name]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    save_file(theirs, str(out / "model.safetensors"), metadata={"format": "pt"})
    if (ckpt_dir / TOKENIZER).exists():
        shutil.copyfile(ckpt_dir / TOKENIZER, out / TOKENIZER)
    gen = {}
    if (ckpt_dir / GENERATION).exists():
        gen = json.loads((ckpt_dir / GENERATION).read_text()).get("generation", {})
    if gen.get("stop_token_ids"):
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": gen["stop_token_ids"]}) + "\n")
    return out
