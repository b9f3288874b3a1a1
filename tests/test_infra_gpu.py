"""GPU checks (marker `gpu`; skipped where torch sees no CUDA device). infra/gpu-check.sh runs them on a lent
GPU machine with DS_ACCELERATOR=cuda: the real trainer in bf16 with DeepSpeed ZeRO-2 on NCCL, then the
export of what it trained against PyTorch on CUDA - logits step by step and greedy tokens."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (infra/gpu-check.sh)")]

# CUDA fp32 (TF32 off) against ONNX Runtime fp32 on CPU: summation order only, as the export's own check
ATOL = 2e-4


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """8 steps of the tiny preset on the GPU through the trainer: bf16, ZeRO-2, NCCL (1 rank)."""
    from helpers_training import losses, train_inprocess, write_text_corpus

    from ctxmem.training.data import prepare

    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        pytest.skip("DS_ACCELERATOR is not cuda (tests/conftest.py defaults it to cpu): run infra/gpu-check.sh")
    root = tmp_path_factory.mktemp("gpu")
    data = root / "data"
    prepare([str(write_text_corpus(root / "corpus"))], data, progress=False)
    out = root / "run"
    result = train_inprocess(out, data, "device=cuda", "precision=bf16", "zero.stage=2", "steps=8")
    return out, result, losses(out)


def test_bf16_zero2_training_on_nccl_runs_and_learns(cuda_run):
    import deepspeed.comm

    out, result, per_step = cuda_run
    assert sorted(per_step) == list(range(1, 9))
    assert all(np.isfinite(v) for v in per_step.values())
    assert per_step[8] < per_step[1]  # 8 steps at lr 3e-3 on a repetitive corpus: the loss falls
    assert (out / "final" / "model.safetensors").is_file() and np.isfinite(result.val_loss)
    if deepspeed.comm.is_initialized():
        assert deepspeed.comm.get_backend() == "nccl"


def test_the_export_of_the_gpu_trained_model_matches_pytorch_on_cuda(cuda_run, tmp_path):
    from ctxmem.checkpoint import load_model
    from ctxmem.export.onnx_export import export_onnx
    from ctxmem.export.runtime import OrtBackend
    from ctxmem.layout import build_layout

    out, _, _ = cuda_run
    export = export_onnx(out / "final", tmp_path / "export")  # traces and verifies (CPU) as `ctxmem export`
    torch.backends.cuda.matmul.allow_tf32 = False
    model = load_model(out / "final").to("cuda").eval()
    ort = OrtBackend(export, provider="cpu")
    rng = np.random.default_rng(0)
    B, T = 2, 12
    ids = rng.integers(0, 256, (B, T))  # byte tokens
    past_t = past_o = None
    tokens_t, tokens_o = [], []
    step_ids = ids
    for step in range(16):  # a prefill, then greedy decoding; each side follows its own argmax
        n = step_ids.shape[1]
        P = 0 if past_t is None else past_t[0][0].shape[2]
        positions = np.broadcast_to(np.arange(P, P + n), (B, n)).copy()
        mask = np.ones((B, P + n), bool)
        with torch.no_grad():
            logits, past_t = model(torch.from_numpy(step_ids).cuda(), positions=torch.from_numpy(positions).cuda(),
                                   attention_mask=torch.from_numpy(mask).cuda(), past=past_t, use_cache=True)
        got, past_o = ort.forward(step_ids, build_layout(np.broadcast_to(np.arange(P + n), (B, P + n)).copy(), mask, n),
                                  past_o, last_only=False)
        reference = logits.float().cpu().numpy()
        np.testing.assert_allclose(got, reference, atol=ATOL, rtol=ATOL, err_msg=f"step {step}")
        next_t, next_o = reference[:, -1].argmax(-1), got[:, -1].argmax(-1)
        tokens_t.append(next_t)
        tokens_o.append(next_o)
        step_ids = next_t[:, None].astype(np.int64)
    assert np.array_equal(np.stack(tokens_t), np.stack(tokens_o))
