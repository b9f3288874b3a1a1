"""Loading the served model: a spec (export dir, checkpoint dir, runs:/..., models:/NAME@ALIAS) -> a
`LoadedModel` the scheduler can run. Spec resolution is the export stage's (`ctxmem.export.resolve`),
and so is the ONNX Runtime provider choice (its runtime makes it); what is decided here is which
runtime runs the directory and the server's memory policy.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ctxmem.export.resolve import resolve_model
from ctxmem.generation import Generator
from ctxmem.memory import MemoryConfig

from .config import EngineConfig, MemoryOverrides

log = logging.getLogger("ctxmem.serving.loading")


@dataclass
class LoadedModel:
    """A generator plus what the scheduler needs to know about it."""

    spec: str
    path: Path
    generator: Generator
    kind: str  # "onnx" (ONNX Runtime, production) or "torch" (checkpoint fallback)
    provider: str  # "cpu" or "cuda"
    memory: MemoryConfig  # the server's default policy for this model, resolved
    version: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def template(self, style: str = "model"):
        """How a chat becomes tokens: "model" = the tokenizer's chat template, "text" = one running text
        (`ctxmem.chat_template`; EngineConfig.chat_template)."""
        from ctxmem.chat_template import template_for

        made = self.__dict__.setdefault("_templates", {})
        if style not in made:
            made[style] = template_for(self.generator.tokenizer, style)
        return made[style]


def model_directory(config: EngineConfig) -> Path:
    """The local directory of the configured model (a registry alias is looked up now: it moves when a
    new champion is promoted; downloads are cached per version)."""
    return Path(resolve_model(config.model, tracking_uri=config.tracking_uri))


def server_memory(generator: Generator, overrides: MemoryOverrides | None) -> MemoryConfig:
    """The model's saved policy, upgraded from 'full' to a window so long conversations never fail
    (unless the server asks for 'full'), then the server's overrides (MemoryConfigError when they do
    not fit the model)."""
    backend = generator.backend
    given = overrides.model_dump() if overrides else {}
    base = generator.memory_config
    if base.policy == "full" and given.get("policy") is None:
        base = MemoryConfig(policy="sink" if backend.uses_rope else "recompute")
    return base.with_overrides(backend.max_seq_len, backend.uses_rope, **given)


def load_served_model(config: EngineConfig) -> LoadedModel:
    """Export dir (has model.onnx) -> ONNX Runtime; checkpoint dir (model.safetensors) -> PyTorch."""
    path = model_directory(config)
    if (path / "model.onnx").exists():
        from ctxmem.export.runtime import load_onnx_generator

        threads = config.intra_op_threads or 1  # one thread per CPU replica: scale out with replicas
        # the runtime chooses (auto: CUDA where this onnxruntime has it; cuda: an error where it does not
        # take); report what actually runs
        # no greedy loop (OrtBackend.decode_greedy): the scheduler steps its batch itself (rows join and
        # leave at every step), and its decode session would be another copy of the weights per replica
        generator = load_onnx_generator(path, provider=config.provider, intra_op_threads=threads,
                                        decode_session=config.decode_session, greedy_loop=False)
        provider = "cuda" if generator.backend.provider.startswith("CUDA") else "cpu"
        kind = "onnx"
    elif (path / "model.safetensors").exists():
        import torch

        from ctxmem.generation import load_generator

        provider = "cuda" if config.provider != "cpu" and torch.cuda.is_available() else "cpu"
        threads = config.intra_op_threads or (1 if provider == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        generator = load_generator(path, device=provider)
        kind = "torch"
    else:
        raise FileNotFoundError(f"{path} holds neither model.onnx (an export) nor model.safetensors (a checkpoint); "
                                "pass an export dir, a checkpoint dir, runs:/RUN_ID/PATH or models:/NAME@ALIAS")
    memory = server_memory(generator, config.memory)
    log.info("loaded %s from %s (%s, provider=%s, intra_op_threads=%s, policy=%s window=%s sinks=%s)",
             config.model, path, kind, provider, threads, memory.policy, memory.window, memory.sinks)
    return LoadedModel(config.model, path, generator, kind, provider, memory)
