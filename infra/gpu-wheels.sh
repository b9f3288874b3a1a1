#!/usr/bin/env bash
# Prepares what infra/gpu-check.sh carries to a lent GPU machine that has no network: DeepSpeed's
# source distribution and the few wheels it needs that the GPU image lacks (pydantic and its
# dependencies, hjson), for that image's CPython 3.12 on x86-64 Linux. Run here, where pip reaches
# the package index; writes .cache/gpu-wheels/ (ignored by git, well under the 64 MiB a call carries).
#
#   bash infra/gpu-wheels.sh
#
# Versions: the ones this project's tests run on (DeepSpeed 0.19.8 = infra/docker/constraints.txt).
# What the image already holds (torch 2.11 CUDA, numpy, onnx, onnxscript, onnxruntime CPU,
# safetensors, tokenizers, pyyaml, tqdm, packaging, psutil, py-cpuinfo, msgpack, ninja, einops,
# pytest) is not carried; ray, mlflow and onnxruntime-gpu are not needed by the check.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${CTXMEM_GPU_WHEELS:-.cache/gpu-wheels}
pip=${PIP:-.venv/bin/python -m pip}
mkdir -p "$out"
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
$pip download -q --no-deps -d "$out" --no-binary :all: "deepspeed==0.19.8"
# shellcheck disable=SC2086
$pip download -q --no-deps -d "$out" --only-binary :all: --python-version 3.12 --implementation cp $platforms \
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5" \
  "typing-extensions==4.16.0" "hjson==3.1.0"
du -sh "$out" >&2
ls "$out" >&2
