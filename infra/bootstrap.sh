#!/usr/bin/env bash
# Sets up .venv with ctxmem and its whole stack (torch, deepspeed, onnx, onnxruntime, ray, mlflow).
# Idempotent: a second run only checks. Usage: bash infra/bootstrap.sh
#
# torch is installed first and on its own so that no later package can pull a multi-GB CUDA
# build onto a CPU machine: CPU machines get torch==2.13.0 (CPU build); machines with an NVIDIA
# driver get the default (CUDA) build and onnxruntime-gpu. Override with CTXMEM_TORCH="torch==X".
#
# The container images (infra/docker/) install through this same script, where no driver is
# visible at build time; these optional variables select what a plain run would guess:
#   CTXMEM_FLAVOUR=cpu|gpu    the variant (default: gpu where nvidia-smi lists a GPU, else cpu)
#   CTXMEM_EXTRAS=a,b         the extras besides the flavour (default: all; images: no dev tools)
#   CTXMEM_VENV=DIR           where the environment goes (default: .venv); PYTHON=python3.X its interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CTXMEM_VENV:-.venv}

flavour=${CTXMEM_FLAVOUR:-}
if [ -z "$flavour" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then flavour=gpu; else flavour=cpu; fi
fi
case "$flavour" in
  gpu) torch_spec=${CTXMEM_TORCH:-"torch>=2.5,<=2.14.1"} ;;
  cpu) torch_spec=${CTXMEM_TORCH:-"torch==2.13.0"} ;;
  *) echo "[bootstrap] CTXMEM_FLAVOUR must be cpu or gpu, got '$flavour'" >&2; exit 2 ;;
esac
extras=${CTXMEM_EXTRAS:-all}
case "$extras" in
  *[!a-z,]*|"") echo "[bootstrap] CTXMEM_EXTRAS must be comma-separated extras of pyproject.toml, got '$extras'" >&2; exit 2 ;;
esac

# The chat page's browser test (tests/test_chat_page.py) drives Debian's chromium through Playwright;
# the browser comes from apt, never from Playwright's own download. Checked on every run (not part of
# the venv stamp) so an up-to-date venv on a new machine still gets it.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing chromium (apt-get) for the chat page's browser test" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
  else
    echo "[bootstrap] warning: no chromium; tests/test_chat_page.py needs it: apt-get install chromium (as root)" >&2
  fi
fi

sum=$(cat pyproject.toml | cksum | cut -d' ' -f1)
stamp="$VENV/.ctxmem-$flavour-$sum"
[ "$extras" = all ] || stamp="$VENV/.ctxmem-$flavour-${extras//,/-}-$sum"
if [ -f "$stamp" ]; then
  echo "[bootstrap] $VENV is up to date ($flavour)" >&2
  exit 0
fi

echo "[bootstrap] creating $VENV for $flavour ($torch_spec; extras $extras)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >&2
"$VENV/bin/python" -m pip install -q "$torch_spec" >&2
"$VENV/bin/python" -m pip install -q -e ".[$extras,$flavour]" >&2
rm -f "$VENV"/.ctxmem-* && touch "$stamp"
echo "[bootstrap] ready: $VENV/bin/ctxmem --help" >&2
