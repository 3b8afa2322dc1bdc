#!/usr/bin/env bash
# Builds the fastloss wheel here for the GPU machine, so that scripts/gpu_check.sh skips its build there (minutes
# of the session's 15 of device time): against the GPU machine's torch (2.11.0+cu130 in every GPU run so far,
# Python 3.12; the extension uses the stable Python ABI, so a build from Python 3.11 loads there), sm_90 only,
# CUTLASS fused GEMMs included. Output in .prebuilt/ (git-ignored): the wheel, TORCH_VERSION and SOURCE_HASH
# (scripts/source_hash.sh). gpu_check.sh installs it only when both match; otherwise it builds from source.
#   usage: bash scripts/prebuild_gpu.sh     (after the session's last source change; ~5 min on 2 cores,
#          plus a one-time torch download into .venv-gpu/; GPU_TORCH_PYTHON=<python> uses another interpreter)
#   then:  run(command="bash scripts/gpu_check.sh", carry=[".whl", ".prebuilt"])
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_TORCH=${GPU_TORCH:-torch==2.11.0}
PY=${GPU_TORCH_PYTHON:-.venv-gpu/bin/python}
if [ -z "${GPU_TORCH_PYTHON:-}" ] && ! "$PY" -c "import torch, scikit_build_core" 2>/dev/null; then
  python3 -m venv .venv-gpu
  "$PY" -m pip install -q "$GPU_TORCH" numpy "scikit-build-core>=0.10" cmake ninja
  "$PY" -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
fi
rm -rf .prebuilt
mkdir -p .prebuilt
TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$PY" -m pip wheel -q --no-build-isolation --no-deps -C build-dir=build/gpu-prebuilt -w .prebuilt .
"$PY" -c "import torch; print(torch.__version__)" > .prebuilt/TORCH_VERSION
bash scripts/source_hash.sh > .prebuilt/SOURCE_HASH
ls -la .prebuilt
[ "$(cat .prebuilt/TORCH_VERSION)" = "2.11.0+cu130" ] || echo "warning: every GPU run so far had torch 2.11.0+cu130;" \
  "with this one gpu_check.sh would build from source (GPU_TORCH_PYTHON: an interpreter with that torch)"
echo "prebuilt for torch $(cat .prebuilt/TORCH_VERSION), sources $(cut -c1-12 .prebuilt/SOURCE_HASH)"
