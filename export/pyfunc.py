"""The MLflow pyfunc wrapper of an export: `mlflow.pyfunc.load_model("models:/NAME@champion")`
gives a model whose predict() actually generates text, with the export's own runtime config,
tokenizer, sampler and memory policy (it runs ctxmem.export.runtime.load_onnx_generator).

Signature (tensor-based, every dimension dynamic):
    inputs   prompt  str (-1,)        one prompt per row
    outputs  text    str (-1,)        the completion of each prompt
    params   max_new_tokens, temperature, top_k, top_p, seed (-1 = none), policy, window, sinks
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT_KEY = "export"


def signature():
    """The pyfunc signature: string tensors with a dynamic (-1) batch dimension, and params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(str), (-1,), "prompt")]),
        outputs=Schema([TensorSpec(np.dtype(str), (-1,), "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("temperature", "double", 0.0),
                            ParamSpec("top_k", "long", 0), ParamSpec("top_p", "double", 1.0),
                            ParamSpec("seed", "long", -1), ParamSpec("policy", "string", ""),
                            ParamSpec("window", "long", 0), ParamSpec("sinks", "long", -1)]))


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
        from dataclasses import replace

        from ctxmem.memory import MemoryConfig

        prompts = _prompts(model_input)
        params = params or {}
        gen = {k: params[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p") if k in params}
        if params.get("seed", -1) is not None and int(params.get("seed", -1)) >= 0:
            gen["seed"] = int(params["seed"])
        config = replace(self.generator.defaults, **gen)
        memory = None
        if params.get("policy") or params.get("window") or int(params.get("sinks", -1)) >= 0:
            base = self.generator.memory_config
            policy = params.get("policy") or base.policy
            start = base if policy == base.policy else MemoryConfig(policy=policy)
            memory = replace(start, policy=policy,
                             **({"window": int(params["window"])} if params.get("window") else {}),
                             **({"sinks": int(params["sinks"])} if int(params.get("sinks", -1)) >= 0 else {}))
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
