#!/usr/bin/env bash
# Prints one hash of every file that goes into the fastloss wheel (sources, build files, the Python package), by
# content and path. scripts/prebuild_gpu.sh stores it with the prebuilt wheel; scripts/gpu_check.sh installs that
# wheel only if the tree still hashes the same. The file list is git's (tracked + untracked, not ignored: what the
# device tool copies) where there is a repository, else every file but build and cache outputs (the device
# machine's copy of the tree may have no .git).
set -euo pipefail
cd "$(dirname "$0")/.."
paths=(csrc cmake python third_party CMakeLists.txt pyproject.toml)
list() {
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -z -co --exclude-standard -- "${paths[@]}" | while IFS= read -r -d '' f; do
      [ -f "$f" ] && [ ! -L "$f" ] && printf '%s\0' "$f"  # skip tracked files deleted from the tree
    done
  else
    find "${paths[@]}" -type f ! -name '*.so' ! -name '*.pyc' ! -path '*/__pycache__/*' ! -path '*.egg-info/*' \
      ! -path '*/.hypothesis/*' ! -path '*/.pytest_cache/*' ! -path '*/.ruff_cache/*' -print0
  fi
}
list | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
