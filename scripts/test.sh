#!/usr/bin/env bash
# Installs everything (scripts/setup_env.sh), then lints and runs the whole test suite on the installed package.
# On a machine with a GPU the `cuda` tests run too; `pytest -m cuda` selects only them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check python tests bench scripts examples
cd tests  # import the installed fastloss, not the source tree
../.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
