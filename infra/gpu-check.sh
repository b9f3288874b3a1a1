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
#   5. the `gpu`-marked tests (tests/test_infra_gpu.py): the real trainer in bf16 with ZeRO-2 on
#      NCCL, then the export of what it trained against PyTorch on CUDA (logits and greedy tokens);
#   4. the recall recipe search (bench/train_recall.py), alongside step 5: five recipes of the
#      `small` preset at once on the one GPU (byte and BPE data from `ctxmem data prepare --corpus
#      stdlib recall:0.8`, with and without a copying curriculum) until CTXMEM_GPU_SECONDS (540) after
#      the start; every recipe's log in the output, and the recipe with the best in-window recall
#      packed as OUT/best-recall.tar.part-* (a ctxmem checkpoint: `cat` the parts, untar, then
#      `ctxmem eval memory --model recall-best/final ...`).
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

step "1/5 install the carried wheels and ctxmem (offline)"
ls "$WHEELS"/deepspeed-*.tar.gz >/dev/null 2>&1 || { echo "no DeepSpeed sdist in $WHEELS: run bash infra/gpu-wheels.sh first"; exit 2; }
pipi() { timeout 300 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --disable-pip-version-check "$@"; }
pipi "$WHEELS"/*.whl || exit 1
DS_BUILD_OPS=0 pipi "$WHEELS"/deepspeed-*.tar.gz || exit 1   # JIT ops only; ctxmem uses torch AdamW
pipi -e . || exit 1

# the recall search's data, prepared on this machine's cores while the GPU steps run
mkdir -p runs/recall-data
( timeout 240 "$PY" -m ctxmem data prepare --corpus stdlib recall:0.8 --out runs/recall-data/byte --no-progress
  timeout 240 "$PY" -m ctxmem data prepare --corpus stdlib recall:0.8 --tokenizer bpe --vocab-size 2048 \
    --out runs/recall-data/bpe --no-progress ) > runs/recall-data/prepare.log 2>&1 &
prepare_pid=$!

step "2/5 the stack"
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

step "3/5 gpt-124m bf16 training steps: tokens/s and MFU (plain PyTorch, DeepSpeed ZeRO-1 on NCCL)"
if [ "$cuda" = 1 ]; then
  DS_ACCELERATOR=cuda timeout 200 "$PY" bench/bench_train.py --gpu-only --steps 10 --warmup 3 || failed=1
else
  echo "SKIPPED (dry run): no CUDA device"
fi

step "4/5 the recall recipe search starts (bench/train_recall.py, in the background)"
wait "$prepare_pid"; cat runs/recall-data/prepare.log
budget=${CTXMEM_GPU_SECONDS:-540}
left=$(( budget - 40 - ($(date +%s) - started) ))   # 40 s for the final probes, saving and packing
[ "$left" -lt 90 ] && left=90
minutes=$(awk -v s="$left" 'BEGIN { printf "%.2f", s / 60 }')
device=$([ "$cuda" = 1 ] && echo cuda || echo cpu)
sweep=runs/recall-sweep
recipes=()
recipe() {  # name, data, extra flags
  local name=$1 data=$2; shift 2
  "$PY" bench/train_recall.py --data "runs/recall-data/$data" --out "$sweep/$name" --device "$device" \
    --minutes "$minutes" "$@" > "$sweep/$name.log" 2>&1 &
  recipes+=($!)
}
mkdir -p "$sweep"
echo "5 recipes of the small preset, $minutes minutes each, at once on $device"
recipe byte-lr1e-3 byte --lr 1e-3
recipe byte-lr1e-3-copy byte --lr 1e-3 --copy 0.25
recipe byte-lr2e-3-copy byte --lr 2e-3 --copy 0.25
recipe bpe-lr1e-3 bpe --lr 1e-3
recipe bpe-lr1e-3-copy bpe --lr 1e-3 --copy 0.25

step "5/5 the gpu-marked tests (while the recipes train)"
if [ "$cuda" = 1 ]; then export DS_ACCELERATOR=cuda; fi
# only the modules that hold gpu tests: the others import ray/mlflow, which this machine lacks
mapfile -t gpu_tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs "${gpu_tests[@]}" || failed=1

step "the recall recipes: waiting for them, then their results"
wait "${recipes[@]}"   # by pid: a bare `wait` would also wait for the tee above, which ends only with the script
for f in "$sweep"/*.log; do echo "--- $f"; cat "$f"; done
best=$("$PY" - "$sweep" <<'PY'
import json, sys
from pathlib import Path
rows = []
for f in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(f.read_text())
    rows.append(((s["recall_d48"] + s["recall_d64"]) / 2, f.parent.name, s))
for inside, name, s in sorted(rows, reverse=True):
    print(f"{name:20} steps {s['steps']:6}  tokens {s['tokens'] / 1e6:6.1f}M  copy {s['copy_ratio']:.3f}  in-window recall "
          f"{inside:.2f}  d96 {s['recall_d96']:.2f}  d160 {s['recall_d160']:.2f}", file=sys.stderr)
print(sorted(rows, reverse=True)[0][1] if rows else "")
PY
)
if [ -n "$best" ] && [ -n "${OUT:-}" ]; then
  for f in "$sweep"/*/log.jsonl; do echo "{\"recipe\": \"$(basename "$(dirname "$f")")\"}"; cat "$f"; done > "$OUT/recall-logs.jsonl"
  tar -C "$sweep" -cf - "$best" | split -b 15M - "$OUT/best-recall.tar.part-"
  echo "best recipe: $best (packed in $OUT/best-recall.tar.part-*)"
else
  echo "no recipe finished"; failed=1
fi

step "done in $(( $(date +%s) - started ))s ($([ "$cuda" = 1 ] && echo "on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')" || echo "dry run, no GPU"))"
exit $failed
