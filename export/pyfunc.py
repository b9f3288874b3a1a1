"""The MLflow pyfunc wrapper of an export: `mlflow.pyfunc.load_model("models:/NAME@champion")`
gives a model whose predict() actually generates text, with the export's own runtime config,
tokenizer, sampler and memory policy (it runs ctxmem.export.runtime.load_onnx_generator).

Signature (tensor-based, every dimension dynamic):
    inputs   prompt  str (-1,)        one prompt per row
    outputs  text    str (-1,)        the completion of each prompt
    params   max_new_tokens, temperature, top_k, top_p, seed, policy, window, sinks

MLflow params must have a typed default, so "not set" is spelled with a sentinel no one would mean:
seed -1, policy "", window 0 and sinks -1 mean "keep the export's own value" (its runtime config).
`requested()` turns them into None, the core's "unset", in this one place; the overrides then go
through GenerationConfig.with_overrides and MemoryConfig.with_overrides like every other caller's.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT_KEY = "export"
GENERATION_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
MEMORY_PARAMS = ("policy", "window", "sinks")
UNSET = {"seed": -1, "policy": "", "window": 0, "sinks": -1}  # the schema defaults that mean "not set"


def signature():
    """The pyfunc signature: string tensors with a dynamic (-1) batch dimension, and params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(str), (-1,), "prompt")]),
        outputs=Schema([TensorSpec(np.dtype(str), (-1,), "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0),
                            ParamSpec("top_k", "long", 0), ParamSpec("top_p", "double", 1.0),
                            ParamSpec("seed", "long", UNSET["seed"]), ParamSpec("policy", "string", UNSET["policy"]),
                            ParamSpec("window", "long", UNSET["window"]), ParamSpec("sinks", "long", UNSET["sinks"])]))


def requested(params: dict[str, Any] | None) -> dict[str, Any]:
    """Every known param, None where the caller did not set it (absent, or its sentinel default)."""
    params = params or {}
    out = {}
    for key in GENERATION_PARAMS + MEMORY_PARAMS:
        value = params.get(key)
        if value is None or (key in UNSET and value == UNSET[key]):
            out[key] = None
        elif key == "policy":
            out[key] = str(value)
        elif key in ("temperature", "top_p"):
            out[key] = float(value)
        else:  # MLflow "long" params may arrive as numpy integers
            out[key] = int(value)
    return out


def onnx_signature(contract) -> dict[str, Any]:
    """The graph's own contract as an MLflow tensor signature (dynamic dims are -1), for reference."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(t):
        return TensorSpec(np.dtype(t.dtype), tuple(d if isinstance(d, int) else -1 for d in t.dims), t.name)

    return ModelSignature(inputs=Schema([spec(t) for t in contract.inputs()]),
                          outputs=Schema([spec(t) for t in contract.outputs()])).to_dict()


class OnnxGeneratorModel(mlflow.pyfunc.PythonModel):
    """Loads the export shipped as the `export` artifact and generates with it."""

    def load_context(self, context) -> None:
        from .runtime import load_onnx_generator

        self.generator = load_onnx_generator(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        prompts = _prompts(model_input)
        given = requested(params)
        config = self.generator.defaults.with_overrides(**{k: given[k] for k in GENERATION_PARAMS})
        memory = None  # None: the export's own memory policy
        if any(given[k] is not None for k in MEMORY_PARAMS):
            backend = self.generator.backend
            memory = self.generator.memory_config.with_overrides(
                backend.max_seq_len, backend.uses_rope, **{k: given[k] for k in MEMORY_PARAMS})
        done = self.generator.generate(prompts, config, memory)
        return {"text": np.asarray([c.text for c in done], dtype=str)}


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, dict):
        model_input = model_input.get("prompt")
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        model_input = model_input["prompt"] if "prompt" in model_input.columns else model_input.iloc[:, 0]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in np.asarray(model_input).reshape(-1).tolist()]
