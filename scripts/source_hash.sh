#!/usr/bin/env bash
# Prints one hash of every file that goes into the fastloss wheel (sources, build files, the Python package), by
# content and path, without git (the GPU machine's copy of the tree may have no .git). scripts/prebuild_gpu.sh
# stores it with the prebuilt wheel; scripts/gpu_check.sh installs that wheel only if the tree still hashes the same.
set -euo pipefail
cd "$(dirname "$0")/.."
find csrc cmake python third_party CMakeLists.txt pyproject.toml -type f \
  ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 |
  LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
