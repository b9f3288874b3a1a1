"""Export stage: ONNX export with a declared contract, structured verification against PyTorch, an
ONNX Runtime generation engine on the core's memory/sampling code, and the MLflow model registry.

Modules, bottom to top (each imports only modules above it in this list; a test checks there is
no cycle). Nothing heavy is imported here; each loads torch / onnx / onnxruntime / mlflow itself:
    errors.py       typed errors, printed by the CLI without a traceback
    contract.py     the graph's input/output names, dynamic axes, cache layout; export-only patches
    providers.py    choose_provider(): the one choice of ONNX Runtime execution provider (auto/cpu/cuda)
    runtime.py      RuntimeConfig (runtime_config.json), OrtBackend, load_onnx_generator(export_dir)
    store.py        an MLflow client on a store URI; registered model / alias / version lookups
    model_cache.py  one verified, atomic download per version into the local cache (lock, temp, rename)
    resolve.py      resolve_model(): --model SPEC (dir, runs:/, models:/) -> local directory;
                    open_onnx_generator(SPEC)
    evaluate.py     validation loss / perplexity for checkpoints and exports (`ctxmem eval`)
    verify.py       verify_export(): names -> shapes -> values (prefill, decode, after slides) -> greedy
    graph_builder.py  the fused graph: the contract written with ORT contrib ops from the weights
    quantize.py     weight-only MatMulNBits quantisation (the int8 / int4 variants)
    onnx_export.py  export_onnx(): the fused (or traced) graph, int8/int4/fp16 variants, runtime config
    pyfunc.py       the MLflow pyfunc wrapper that generates text from a registered export
    registry_memory.py  a memory evaluation recorded on a model version; the champion gate's memory part
    registry.py     register / promote (gated aliases) / list
    cli.py          `ctxmem export`, `ctxmem registry ...`, `ctxmem eval`
See export/README.md.

The stage's public API for other stages (serving, the core CLI) is re-exported here, loaded on
first use: resolve_model, choose_provider, open_onnx_generator, load_onnx_generator.
"""
from __future__ import annotations

from typing import Any

__all__ = ["resolve_model", "choose_provider", "open_onnx_generator", "load_onnx_generator"]


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): `import ctxmem.export.cli` at CLI start-up must not load numpy/ONNX code.
    if name in ("resolve_model", "open_onnx_generator"):
        from . import resolve

        return getattr(resolve, name)
    if name == "choose_provider":
        from .providers import choose_provider

        return choose_provider
    if name == "load_onnx_generator":
        from .runtime import load_onnx_generator

        return load_onnx_generator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
