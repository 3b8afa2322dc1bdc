#!/usr/bin/env bash
# The main job: installs everything (scripts/setup_env.sh), then runs the row-loss benchmark with the quick
# preset on this machine (cuda when a GPU is present, else cpu), appending to bench/results/ and plotting.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
DEVICE=$(.venv/bin/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
.venv/bin/python bench/bench_row_losses.py --preset "${PRESET:-quick}" --device "$DEVICE" \
  --out "bench/results/row_losses_${DEVICE}.csv" --plot "$@"
