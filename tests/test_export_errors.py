"""Bad input gives one clear line, never a traceback."""
from __future__ import annotations

import pytest

from helpers_export import copy_export

from ctxmem.cli import main
from ctxmem.export.errors import ExportError, ExportModelError, ModelSpecError, RuntimeConfigError


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_export_of_a_missing_checkpoint_is_a_one_line_error(capsys, tmp_path):
    code, err = _run(capsys, "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert code == 1 and "does not exist" in err and "models:/NAME@ALIAS" in err
    assert not (tmp_path / "out").exists()


def test_export_of_a_directory_without_weights_names_the_missing_file(tmp_path):
    from ctxmem.checkpoint import CheckpointError
    from ctxmem.config import preset
    from ctxmem.export.onnx_export import export_onnx

    preset("tiny").save(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        export_onnx(tmp_path, tmp_path / "out")


def test_export_refuses_opset_17_and_two_variants_at_once(tiny_checkpoint, tmp_path):
    from ctxmem.export.onnx_export import export_onnx

    with pytest.raises(ExportError, match="opset >= 18"):
        export_onnx(tiny_checkpoint, tmp_path / "o", opset=17)
    with pytest.raises(ExportError, match="two variants"):
        export_onnx(tiny_checkpoint, tmp_path / "o", int8=True, fp16=True)


def test_corrupt_model_onnx_is_a_typed_error(tiny_export, tmp_path, capsys):
    from ctxmem.export.runtime import load_onnx_generator

    bad = copy_export(tiny_export, tmp_path / "corrupt")
    (bad / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf graph" * 10)
    with pytest.raises(ExportModelError, match="corrupt or incomplete"):
        load_onnx_generator(bad)
    code, err = _run(capsys, "eval", "--model", str(bad), "--data", str(bad / "tokenizer.json"))
    assert code == 1 and "ONNX Runtime cannot load" in err


def test_missing_external_weights_are_a_typed_error(tiny_export, tmp_path):
    from ctxmem.export.runtime import OrtBackend

    bad = copy_export(tiny_export, tmp_path / "noweights")
    (bad / "model.onnx.data").unlink()
    with pytest.raises(ExportModelError, match="model.onnx.data"):
        OrtBackend(bad)


def test_export_dir_without_runtime_config_says_to_rerun_export(tiny_export, tmp_path, capsys):
    from ctxmem.export.runtime import load_onnx_generator

    bad = copy_export(tiny_export, tmp_path / "noconfig")
    (bad / "runtime_config.json").unlink()
    with pytest.raises(RuntimeConfigError, match=r"re-run `ctxmem export"):
        load_onnx_generator(bad)


def test_spec_that_is_a_file_or_a_malformed_uri_is_a_model_spec_error(tiny_export, tmp_path):
    from ctxmem.export.resolve import resolve_model
    from ctxmem.export.runtime import load_onnx_generator

    with pytest.raises(ModelSpecError, match="is a file"):
        resolve_model(tiny_export / "model.onnx")
    with pytest.raises(ModelSpecError, match="models:/NAME@ALIAS"):
        resolve_model("models:/only-a-name", tracking_uri=f"sqlite:///{tmp_path}/m.db")
    # the ONNX Runtime engine loads directories only; resolution is the layer above it
    with pytest.raises(ModelSpecError, match="open_onnx_generator"):
        load_onnx_generator("models:/ctx@champion")


def test_provider_settings_are_auto_cpu_or_cuda(capsys, tiny_export):
    from ctxmem.export.errors import ProviderError
    from ctxmem.export.resolve import choose_provider

    assert choose_provider(None) == choose_provider("auto") == choose_provider("AUTO")
    assert choose_provider("cpu") == choose_provider("CPUExecutionProvider") == "cpu"
    with pytest.raises(ProviderError, match="'tpu' is not one of auto, cpu, cuda"):
        choose_provider("tpu")
    code, err = _run(capsys, "eval", "--model", str(tiny_export), "--data", str(tiny_export / "tokenizer.json"),
                     "--provider", "tpu")
    assert code == 1 and "not one of auto, cpu, cuda" in err


def test_explicit_cuda_provider_without_onnxruntime_gpu_is_refused(tiny_export):
    import onnxruntime

    from ctxmem.export.errors import ProviderError
    from ctxmem.export.runtime import OrtBackend

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        OrtBackend(tiny_export, provider="cuda")
