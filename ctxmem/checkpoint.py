"""The ctxmem checkpoint directory, read and written by every stage.

    DIR/config.json             ModelConfig (format: ctxmem)
    DIR/model.safetensors       fp32 weights; tied lm_head stored once (as tok_emb.weight)
    DIR/tokenizer.json          see ctxmem.tokenizer
    DIR/generation_config.json  generation and memory-policy defaults (optional)

Loading never unpickles: safetensors only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ModelConfig
from .model import Transformer

CONFIG, WEIGHTS, TOKENIZER, GENERATION = "config.json", "model.safetensors", "tokenizer.json", "generation_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def state_dict_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    return sd


def save_checkpoint(out: str | Path, model: Transformer | None = None, tokenizer=None,
                    generation: dict[str, Any] | None = None, *, config: ModelConfig | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """Write a checkpoint from a live model, or from a config + state_dict (e.g. gathered from ZeRO)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or model.cfg
    if state_dict is None:
        state_dict = state_dict_for_saving(model)
    elif cfg.tie_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    state_dict = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    cfg.save(out / CONFIG)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt", **(metadata or {})})
    tmp.replace(out / WEIGHTS)  # atomic: an interrupted save never leaves a half-written file
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER)
    if generation is not None:
        (out / GENERATION).write_text(json.dumps(generation, indent=2) + "\n")
    return out


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: a ctxmem checkpoint keeps its weights in {WEIGHTS}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); "
                              "re-export or re-download the checkpoint") from None


def check_state_dict(model: Transformer, sd: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    if model.cfg.tie_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing:
        raise CheckpointError(f"{source} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                              "that config.json requires; the checkpoint is incomplete or from another model")
    if unexpected:
        raise CheckpointError(f"{source} has tensors {unexpected[:5]} that config.json does not describe")
    for name, tensor in expected.items():
        if tuple(sd[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(sd[name].shape)}, "
                                  f"config.json implies {tuple(tensor.shape)}")


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a directory; expected a ctxmem checkpoint "
                              f"({CONFIG}, {WEIGHTS}, {TOKENIZER})")
    try:
        cfg = ModelConfig.load(ckpt_dir / CONFIG)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = load_state_dict(ckpt_dir / WEIGHTS)
    check_state_dict(model, sd, str(ckpt_dir / WEIGHTS))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    model.load_state_dict(sd, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device=device, dtype=dtype).eval()


def load_generation_defaults(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / GENERATION
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
