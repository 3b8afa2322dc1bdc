#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh), then lints and runs the whole test suite on the installed package,
# then the tests of the ops with CUDA kernels once more with those kernels emulated on the CPU (tests/cuemu).
# On a machine with a GPU the `cuda` tests run too; `pytest -m cuda` selects only them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check python tests bench scripts examples
cd tests  # import the installed fastloss, not the source tree
../.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
# The CUDA kernels again, on the CPU: the emulator (tests/cuemu/README.md) puts them in place of the CPU kernels
# for the tests of the ops that have them (test_cuemu.py, in the run above, checks them against the CPU kernels,
# staged against unstaged, and threads in reverse order).
FASTLOSS_CUEMU=1 ../.venv/bin/python -m pytest -q -p no:cacheprovider --ignore=test_build.py --ignore=test_headers.py \
  --ignore=test_baseline_isa.py --ignore=test_cuemu.py "$@"
