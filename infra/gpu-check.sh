#!/usr/bin/env bash
# One command for a lent GPU machine (e.g. one H200, no network, Python 3.12 with torch CUDA, onnx and
# CPU onnxruntime installed; no ray, deepspeed, mlflow or onnxruntime-gpu): everything in this
# project that needs a GPU, in well under 8 minutes.
#
#   bash infra/gpu-wheels.sh                  # here, once: DeepSpeed's sdist + the wheels it lacks
#   bash infra/gpu-check.sh                   # there (the device tool: carry .cache/gpu-wheels)
#
#   1. installs what it carries (.cache/gpu-wheels: DeepSpeed 0.19.8 from source, pydantic, hjson)
#      and ctxmem itself into that machine's Python, offline (--no-index);
#   2. imports the stack and prints its versions and the GPU;
#   3. bench/bench_train.py --gpu-only: bf16 training steps of the gpt-124m preset (1024-token
#      windows, batch 16), a plain PyTorch loop and DeepSpeed ZeRO-1 on NCCL, tokens/s and model
#      FLOPs utilisation against the GPU's dense bf16 peak (H200/H100: 989 TFLOP/s; target >= 45%);
#   4. the `gpu`-marked tests (tests/test_infra_gpu.py): the real trainer in bf16 with ZeRO-2 on
#      NCCL, then the export of what it trained against PyTorch on CUDA (logits and greedy tokens).
# Where torch sees no CUDA device (a dry run on a CPU machine) steps 3 and 4 say so and skip; the
# install and import steps run the same. Output also goes to $OUT/gpu-check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${CTXMEM_GPU_WHEELS:-.cache/gpu-wheels}
log=${OUT:+$OUT/gpu-check.log}
exec > >(tee ${log:+"$log"}) 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
started=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - started ))s] $*"; }
failed=0

step "1/4 install the carried wheels and ctxmem (offline)"
ls "$WHEELS"/deepspeed-*.tar.gz >/dev/null 2>&1 || { echo "no DeepSpeed sdist in $WHEELS: run bash infra/gpu-wheels.sh first"; exit 2; }
pipi() { timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check "$@"; }
pipi "$WHEELS"/*.whl || exit 1
DS_BUILD_OPS=0 pipi "$WHEELS"/deepspeed-*.tar.gz || exit 1   # JIT ops only; ctxmem uses torch AdamW
pipi -e . || exit 1

step "2/4 the stack"
timeout 120 "$PY" - <<'PY' || exit 1
import sys, torch, numpy, onnx, onnxruntime, deepspeed, pydantic
from importlib.metadata import version
import ctxmem.training.trainer, ctxmem.export.onnx_export  # noqa: F401  (the GPU paths import)
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (CUDA {torch.version.cuda})  numpy {numpy.__version__}")
print(f"onnx {onnx.__version__}  onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
print(f"deepspeed {deepspeed.__version__}  pydantic {pydantic.__version__}  ctxmem {version('ctxmem')}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("no CUDA device: DRY RUN - the GPU steps below skip")
PY
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

step "3/4 gpt-124m bf16 training steps: tokens/s and MFU (plain PyTorch, DeepSpeed ZeRO-1 on NCCL)"
if [ "$cuda" = 1 ]; then
  DS_ACCELERATOR=cuda timeout 300 "$PY" bench/bench_train.py --gpu-only --steps 10 --warmup 3 || failed=1
else
  echo "SKIPPED (dry run): no CUDA device"
fi

step "4/4 the gpu-marked tests"
if [ "$cuda" = 1 ]; then export DS_ACCELERATOR=cuda; fi
# only the modules that hold gpu tests: the others import ray/mlflow, which this machine lacks
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "${gpu_tests[@]}" || failed=1

step "done in $(( $(date +%s) - started ))s ($([ "$cuda" = 1 ] && echo "on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" || echo "dry run, no GPU"))"
exit $failed
