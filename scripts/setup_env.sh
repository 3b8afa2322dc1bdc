#!/usr/bin/env bash
# Creates .venv (if missing) with torch and the build/test tools, then builds and installs fastloss into it.
# Idempotent: a second run only rebuilds fastloss. CUDA kernels are built when nvcc and a CUDA torch exist;
# under CI=true for one architecture (TORCH_CUDA_ARCH_LIST=9.0) to keep the compile short.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC" numpy pytest hypothesis expecttest ruff tqdm matplotlib \
  "scikit-build-core>=0.10" cmake ninja
# open_clip's loss module is the parity peer of tests/test_contrastive.py. --no-deps: it must never pull another
# torch or torchvision; the package __init__ then fails to import (torchvision), so the test loads loss.py alone.
.venv/bin/python -m pip install -q --no-deps open_clip_torch || echo "open_clip_torch not installed: parity tests skip"
# Peers compared in the tests; --no-deps keeps pip from resolving another torch.
.venv/bin/python -m pip install -q --no-deps entmax
# CUTLASS headers (the sm_90 fused contrastive GEMM; only its headers are used, so no dependencies).
.venv/bin/python -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
# clang++ for the tests' CUDA emulator (tests/cuemu: GCC 12 stops with an internal error on the CUDA sources)
if ! command -v clang++ >/dev/null && ! command -v clang++-14 >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -q clang >/dev/null || { $SUDO apt-get update -q && $SUDO apt-get install -y -q clang; }
fi
if [ "${CI:-}" = "true" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST=9.0
fi
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps .
.venv/bin/python -c "import fastloss, json; print(json.dumps(fastloss.build_info()))"
