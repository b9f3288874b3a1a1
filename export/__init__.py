"""Export stage: ONNX export with a declared contract, structured verification against PyTorch, an
ONNX Runtime generation engine on the core's memory/sampling code, and the MLflow model registry.

Modules (nothing heavy is imported here; each loads torch / onnx / onnxruntime / mlflow itself):
    contract.py     the graph's input/output names, dynamic axes, cache layout; export-only patches
    onnx_export.py  export_onnx(): trace, offline ORT optimisation, int8/fp16 variants, runtime config
    runtime.py      RuntimeConfig (runtime_config.json), OrtBackend, load_onnx_generator()
    verify.py       verify_export(): names -> shapes -> values (prefill, decode, after slides) -> greedy
    evaluate.py     validation loss / perplexity for checkpoints and exports (`ctxmem eval`)
    registry.py     register / promote (gated aliases) / list; resolve_model() for runs:/ and models:/
    pyfunc.py       the MLflow pyfunc wrapper that generates text from a registered export
    errors.py       typed errors, printed by the CLI without a traceback
    cli.py          `ctxmem export`, `ctxmem registry ...`, `ctxmem eval`
See export/README.md.
"""
