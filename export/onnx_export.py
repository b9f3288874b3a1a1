"""`ctxmem export`: a ctxmem checkpoint -> model.onnx (+ external data), tokenizer.json,
runtime_config.json and verification.json, in one directory that serving reads as it is.

    1. write the Transformer's graph through the contract (export/contract.py): the fused graph of
       export/graph_builder.py (contrib ops), or, for a model it does not cover or on request
       (graph="traced"), torch.onnx.export (dynamo, opset >= 18); weights in model.onnx.data;
    2. for --int8 / --int4 / --fp16, verify the fp32 graph first, then quantise / convert it;
    3. the traced graph only: apply ONNX Runtime's offline optimisations (OFFLINE_LEVEL) and save the result;
    4. write the runtime config and the tokenizer, then verify (export/verify.py) and write the report.
Everything is built in a sibling temporary directory and moved into place at the end; a failed
verification still moves the export in place, with its failed report, and raises.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from ctxmem.memory import MemoryConfig

from .contract import TRACED_CONTRACT_VERSION, ExportContract, wrap_for_export
from .errors import ExportError, VerificationError
from .runtime import DATA_FILE, MODEL_FILE, REPORT_FILE, RUNTIME_CONFIG, TOKENIZER_FILE, RuntimeConfig, file_sha256

log = logging.getLogger(__name__)

MIN_OPSET = 18  # torch 2.13's dynamo exporter at opset 17 produced a graph ONNX Runtime refuses
RUN_FILE = "mlflow_run.json"  # written by the training stage beside its final checkpoint
# Offline ORT optimisation: "basic" (constant folding, redundant-node removal), which helps where it
# matters here - it folds the Transpose of the tied embedding into a constant, so int8 quantisation
# reaches lm_head, and sessions start faster. The provider-specific fusions of "extended"/"all" are
# left to the session (it runs ORT_ENABLE_ALL online, for the provider it actually has): saved
# offline they gave no decode speed-up (small, CPU, batch 1: 4.44 ms/step extended vs 4.40 ms raw +
# online ALL) and would tie the file to one provider.
OFFLINE_LEVEL = "basic"
GRAPHS = ("fused", "traced")
QUANT_BITS = {"int8": 8, "int4": 4}  # weight-only MatMulNBits variants (export/quantize.py)


def export_onnx(checkpoint_dir: str | Path, out_dir: str | Path, *, opset: int = MIN_OPSET, verify: bool = True,
                int8: bool = False, fp16: bool = False, memory: MemoryConfig | None = None,
                source_run_id: str | None = None, eval_data: str | Path | None = None,
                verify_tokens: int = 64, graph: str = "fused", int4: bool = False) -> Path:
    """Export a checkpoint directory to ``out_dir`` and return it (see the module docstring).
    ``graph``: "fused" (export/graph_builder.py, the default) or "traced" (torch.onnx.export)."""
    from ctxmem.checkpoint import TOKENIZER, load_generation_defaults, load_model
    from ctxmem.tokenizer import load_tokenizer

    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported: the dynamo exporter needs opset >= {MIN_OPSET} "
                          "(opset 17 produced a graph ONNX Runtime refuses)")
    if int(int8) + int(fp16) + int(int4) > 1:
        raise ExportError("choose one of --int8, --int4, --fp16, not two variants at once: export each to its own "
                          "directory (int8 and int4 are for CPU serving, fp16 for GPU)")
    if graph not in GRAPHS:
        raise ExportError(f"unknown graph {graph!r}; choose one of {GRAPHS}")
    variant = "int8" if int8 else "int4" if int4 else "fp16" if fp16 else "fp32"
    ckpt, out = Path(checkpoint_dir), Path(out_dir)
    _check_out(out)
    model = load_model(ckpt)  # CheckpointError names what is missing
    tokenizer = load_tokenizer(ckpt / TOKENIZER)
    saved = load_generation_defaults(ckpt)
    cfg = model.cfg
    mem = (memory or MemoryConfig(**saved.get("memory", {}))).resolve(cfg.max_seq_len, cfg.pos == "rope")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    failure: VerificationError | None = None
    try:
        fp32_dir = stage if variant == "fp32" else stage / "fp32"
        config = _runtime_config(model, tokenizer, mem, saved, ckpt, opset, "fp32", source_run_id)
        write_graph(model, fp32_dir, opset, config, graph)
        _write_side_files(fp32_dir, config, tokenizer)
        from .verify import verify_export

        if variant != "fp32":
            # the fp32 graph is verified before it is quantised: quantising a wrong graph would only
            # hide the error behind the quantisation noise (a failure here leaves nothing behind)
            fp32 = verify_export(fp32_dir, model=model, tokens=verify_tokens, write_report=False)
            reference = {"fp32_reference": {k: fp32[k] for k in ("status", "checks", "stages", "greedy")}}
        try:
            if variant == "fp32" and verify:
                verify_export(stage, model=model, tokens=verify_tokens)
            elif variant == "fp32":
                _skipped_report(stage, variant)
            else:
                derive_variant(fp32_dir, stage, variant, model=model, eval_data=eval_data, tokens=verify_tokens,
                               extra=reference)
        except VerificationError as err:  # the export and its failed report still land, for inspection
            failure = err
        if fp32_dir != stage:
            shutil.rmtree(fp32_dir)
        _fix_report_paths(stage, out)
        _move_into_place(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if failure is not None:
        raise failure
    log.info("wrote %s (%s, opset %d)", out, variant, opset)
    return out


def derive_variant(fp32_export: str | Path, out_dir: str | Path, variant: str, *, model=None,
                   checkpoint: str | Path | None = None, eval_data: str | Path | None = None, tokens: int = 64,
                   extra: dict[str, Any] | None = None) -> Path:
    """An int8 or int4 (weight-only MatMulNBits quantisation of the MatMul weights, CPU) or fp16 (GPU)
    export made from a verified fp32 export, then checked: names, shapes, and validation loss within tolerance of fp32
    PyTorch (raises AccuracyError otherwise). `ctxmem export --int8/--int4/--fp16` runs exactly this."""
    import onnx

    from ctxmem.tokenizer import load_tokenizer

    from .verify import verify_export

    src, out = Path(fp32_export), Path(out_dir)
    fp32_config = RuntimeConfig.load(src)
    if fp32_config.variant != "fp32":
        raise ExportError(f"{src} is a {fp32_config.variant} export; variants are made from an fp32 export")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{variant}-work-", dir=out))
    config = RuntimeConfig(**{**fp32_config.to_dict(), "variant": variant})
    try:
        if variant in QUANT_BITS:
            from .quantize import quantize_weights

            config.optimization.update(quantize_weights(src / MODEL_FILE, work / MODEL_FILE, QUANT_BITS[variant]))
        elif variant == "fp16":
            from .fp16 import convert_keeping_angles_fp32
            from .graph_builder import without_decode_branch

            # logits stay float32 for the shared sampler; the cache becomes float16 (half the memory);
            # rotary angles stay float32 (export/fp16.py); the converter does not follow If branches,
            # so the fused graph's decode branch is left out (the general path serves every call)
            half, kept_fp32 = convert_keeping_angles_fp32(without_decode_branch(onnx.load(str(src / MODEL_FILE))))
            onnx.save_model(half, str(work / MODEL_FILE), save_as_external_data=True, location=DATA_FILE,
                            size_threshold=1024)
            config.contract = ExportContract.from_dict({**config.contract, "cache_dtype": "float16"}).to_dict()
            config.optimization.update(conversion="float16 (onnxruntime.transformers.float16), logits kept float32",
                                       fp32_nodes=f"{len(kept_fp32)} rotary-angle nodes (positions to Cos/Sin)")
        else:
            raise ExportError(f"unknown variant {variant!r}; choose int8, int4 or fp16")
        optimize_offline(work / MODEL_FILE, out, OFFLINE_LEVEL, config)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _write_side_files(out, config, load_tokenizer(src / TOKENIZER_FILE))
    verify_export(out, checkpoint, model=model, tokens=tokens, eval_data=eval_data, extra=extra)
    return out


def write_graph(model, out_dir: Path, opset: int, config: RuntimeConfig, graph: str = "fused") -> Path:
    """The fp32 graph of ``model`` in out_dir: the fused graph (export/graph_builder.py, contract v3)
    where it supports the model, else the traced one (torch.onnx.export, then ORT's offline "basic"
    level; contract v2: keys cached before rotation, as the PyTorch model caches them).
    config.optimization records which graph was written, config.contract its version."""
    from .graph_builder import UnsupportedModelError, write_fused_graph

    if graph == "fused":
        try:
            path = write_fused_graph(model, out_dir, opset, MODEL_FILE, DATA_FILE)
            config.optimization["graph"] = "fused"
            return path
        except UnsupportedModelError as err:
            log.warning("the fused graph does not support this model (%s); tracing it instead", err)
    raw = out_dir.parent / f".{out_dir.name}-raw"
    contract = ExportContract.for_model(model.cfg, version=TRACED_CONTRACT_VERSION)
    config.contract = ExportContract.from_dict({**config.contract, "version": contract.version}).to_dict()
    trace(model, contract, raw, opset)
    try:
        optimize_offline(raw / MODEL_FILE, out_dir, OFFLINE_LEVEL, config)
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    config.optimization["graph"] = "traced"
    return out_dir / MODEL_FILE


def trace(model, contract: ExportContract, out_dir: Path, opset: int) -> Path:
    """torch.onnx.export (dynamo) of the model through the contract; weights in external data."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    wrapper = wrap_for_export(model)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                wrapper, contract.example_inputs(), dynamic_shapes=contract.dynamic_shapes(),
                input_names=contract.input_names, output_names=contract.output_names,
                opset_version=opset, dynamo=True, external_data=True, verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter raises many internal types
        raise ExportError(f"torch.onnx.export failed for this model ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:300]})") from err
    program.save(str(path), external_data=True)
    return path


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs every rewrite at INFO and warns about optional packages (torchvision) and
    axis renames it handles itself; keep `ctxmem export` output to what the user needs."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)


def optimize_offline(src: Path, out_dir: Path, level: str, config: RuntimeConfig | None = None) -> Path:
    """Run ONNX Runtime's graph optimiser once and save the optimised graph (weights external)."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}
    out_dir.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[level]  # (B, Hkv, S, D) cache layout is untouched
    options.optimized_model_filepath = str(out_dir / MODEL_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    if config is not None:
        config.optimization["offline_level"] = level
    return out_dir / MODEL_FILE


# ---- pieces ----------------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / RUNTIME_CONFIG).exists())):
        raise ExportError(f"{out} exists and is not a ctxmem export; choose an empty or new --out directory "
                          "(an existing export there is replaced)")


def _read_run_file(ckpt: Path) -> dict[str, Any]:
    path = ckpt / RUN_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("%s is not valid JSON; lineage to the training run is lost", path)
        return {}
    return data if isinstance(data, dict) else {}


def _runtime_config(model, tokenizer, mem: MemoryConfig, saved: dict[str, Any], ckpt: Path, opset: int,
                    variant: str, source_run_id: str | None) -> RuntimeConfig:
    import onnx
    import onnxruntime
    import torch

    from ctxmem.checkpoint import WEIGHTS
    from ctxmem.chat_template import ChatTemplate

    run = _read_run_file(ckpt)
    chat = ChatTemplate(tokenizer)
    specials = tokenizer.special_tokens
    source = {
        "checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt / WEIGHTS),
        "run_id": source_run_id or run.get("run_id"), "tracking_uri": run.get("tracking_uri"),
        "experiment": run.get("experiment"), "val_loss": run.get("val_loss"), "val_ppl": run.get("val_ppl"),
        "step": run.get("step"),
    }
    return RuntimeConfig(
        model=model.cfg.to_dict(), contract=ExportContract.for_model(model.cfg).to_dict(), memory=mem.to_dict(),
        opset=opset, variant=variant, generation=dict(saved.get("generation", {})),
        special_tokens={"bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id,
                        "stop_ids": sorted(tokenizer.stop_ids()), "tokens": specials},
        chat_template={"style": "special-tokens" if chat.uses_special_tokens else "plain",
                       "roles": {r: specials.get(f"<|{r}|>") for r in ("system", "user", "assistant")},
                       "end_id": specials.get("<|end|>"), "stop_strings": list(chat.stop_strings),
                       "add_bos": False},
        source=source, optimization={},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions={"ctxmem": _version("ctxmem"), "torch": torch.__version__,
                  "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    )


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _write_side_files(out_dir: Path, config: RuntimeConfig, tokenizer) -> None:
    tokenizer.save(out_dir / TOKENIZER_FILE)
    config.save(out_dir)


def _skipped_report(export_dir: Path, variant: str) -> None:
    from .verify import STATUS_SKIPPED, write_report_file
    from .runtime import export_hashes

    write_report_file(export_dir, {"status": STATUS_SKIPPED, "variant": variant, "hashes": export_hashes(export_dir),
                                   "reason": "exported with --no-verify; `ctxmem registry register` verifies it"})


def _fix_report_paths(stage: Path, out: Path) -> None:
    """The report names the export where it will live, not the temporary directory it was built in."""
    path = stage / REPORT_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        data["export"] = str(out.resolve())
        path.write_text(json.dumps(data, indent=2, default=float) + "\n")


def _move_into_place(stage: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        stage.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.rename(out)
