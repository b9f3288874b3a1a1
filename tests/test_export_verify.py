"""A tampered export fails verification with a typed error saying where and by how much."""
from __future__ import annotations

import json

import pytest

from helpers_export import copy_export, cut_logits, tamper_weights

from ctxmem.export.errors import AtolError, OutputNameError, ShapeError, TamperedExportError, VerificationError
from ctxmem.export.verify import check_report, verify_export


def test_changed_weights_fail_the_value_check_at_prefill_with_the_max_difference(tiny_export, tiny_checkpoint,
                                                                                tmp_path):
    bad = copy_export(tiny_export, tmp_path / "bad")
    tensor = tamper_weights(bad)
    with pytest.raises(AtolError) as info:
        verify_export(bad, tiny_checkpoint)
    err = info.value
    assert err.stage == "prefill" and err.max_diff > 1e-3 and "differs from PyTorch by up to" in str(err)
    report = json.loads((bad / "verification.json").read_text())
    assert report["status"] == "failed" and report["checks"]["names"] == "passed"
    assert report["checks"]["shapes"] == "passed" and report["checks"]["values"] == "failed"
    assert report["checks"]["greedy"] == "not run" and report["error"]["type"] == "AtolError", tensor


def test_graph_with_a_wrong_output_shape_fails_the_shape_check(tiny_export, tiny_checkpoint, tmp_path):
    bad = copy_export(tiny_export, tmp_path / "cut")
    cut_logits(bad)
    with pytest.raises(ShapeError, match=r"output logits has shape \(2, \d+, 262\)") as info:
        verify_export(bad, tiny_checkpoint)
    assert info.value.tensor == "logits" and info.value.stage == "prefill"
    assert json.loads((bad / "verification.json").read_text())["checks"]["shapes"] == "failed"


def test_graph_with_a_renamed_output_fails_the_name_check(tiny_export, tiny_checkpoint, tmp_path):
    import onnx

    bad = copy_export(tiny_export, tmp_path / "renamed")
    model = onnx.load(str(bad / "model.onnx"), load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Identity", [model.graph.output[1].name], ["kv_out"]))
    model.graph.output[1].name = "kv_out"
    onnx.save_model(model, str(bad / "model.onnx"))
    with pytest.raises(OutputNameError, match=r"missing \['present_key_0'\], unexpected \['kv_out'\]"):
        verify_export(bad, tiny_checkpoint)


def test_files_changed_after_verification_are_caught_by_the_report_hashes(tiny_export, tmp_path):
    assert check_report(tiny_export)["status"] == "passed"
    bad = copy_export(tiny_export, tmp_path / "bad")
    tamper_weights(bad)
    with pytest.raises(TamperedExportError, match="model.onnx.data"):
        check_report(bad)


def test_verification_needs_the_source_checkpoint(tiny_export, tmp_path):
    with pytest.raises(VerificationError, match="--checkpoint"):
        verify_export(tiny_export, tmp_path / "gone", write_report=False)
