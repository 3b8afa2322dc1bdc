#!/usr/bin/env bash
# One call on a GPU machine (device tool): build fastloss from source against that machine's torch, run the
# CUDA tests, compute-sanitizer memcheck on a small run of every CUDA op, the bandwidth roofline check and the
# quick CUDA benchmark. Logs go to $OUT (default /tmp/fastloss_gpu; at most 8 files, the device tool's limit),
# the rest to /tmp/fastloss_logs. Steps run on even if one fails; summary.txt lists each step's exit status and seconds.
# Steps run in priority order (build, CUDA tests, the issues' targets: bandwidth, Gram form, contrastive; then
# the sanitizer, the profile, the other benchmarks and ncu): a run cut short by the device tool's 600 s limit still
# returns everything written so far.
#   usage: bash scripts/gpu_check.sh            (from the repository root; peers and expecttest come from
#          .whl/, filled by scripts/fetch_gpu_wheels.sh on a machine with network; the build is skipped when
#          .prebuilt/ holds a wheel of these sources from scripts/prebuild_gpu.sh: carry [".whl", ".prebuilt"])
#   a second call after a cut-short first one: GPU_SKIP="<the steps summary.txt lists as done>" (e.g.
#          "pytest_cuda pytest_fused bandwidth bandwidth_unstaged bandwidth_noprefetch bandwidth_general
#          bench_spherical"; the four bandwidth steps append to one CSV: skip all four or none), FUSED_OK=1
#          if the first call's pytest_fused passed, FASTLOSS_ROW_STAGED=0 if its staged_smoke failed:
#          bash scripts/gpu_check.sh
set -u
OUT=${OUT:-/tmp/fastloss_gpu}
mkdir -p "$OUT"
REPO=$(pwd)
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
PY=${PYTHON:-python3}
# Extra wheels carried in .whl/ (e.g. expecttest for torch.library.opcheck), if any.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
LOGS=/tmp/fastloss_logs
mkdir -p "$LOGS"
step() {  # step NAME LOGFILE TIMEOUT_S CMD...   (GPU_SKIP="name ..." skips steps, e.g. on a second call)
  local name=$1 log=$2 limit=$3; shift 3
  case " ${GPU_SKIP:-} " in *" $name "*) echo "$name: skipped" >> "$OUT/summary.txt"; return 2;; esac
  echo "=== $name ($(date -u +%H:%M:%S))" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: exit $rc ($((SECONDS - t0)) s)" >> "$OUT/summary.txt"
  tail -n 30 "$log"
  return $rc
}

step env "$OUT/info.log" 60 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'; nvcc --version | tail -2"
# The wheel prebuilt on the CPU machine (scripts/prebuild_gpu.sh, carried in .prebuilt/) when it was built from
# exactly these sources against this torch and its sm_90 kernels (the fused GEMMs too) load: seconds instead of
# minutes of device time. Anything else builds from source.
build_fastloss() {
  local whl
  whl=$(ls "$REPO"/.prebuilt/fastloss-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ] && [ "$(cat "$REPO"/.prebuilt/SOURCE_HASH)" = "$(bash "$REPO"/scripts/source_hash.sh)" ] &&
     [ "$(cat "$REPO"/.prebuilt/TORCH_VERSION)" = "$($PY -c 'import torch; print(torch.__version__)')" ]; then
    echo "installing the prebuilt $whl"
    if $PY -m pip install --no-deps --force-reinstall "$whl" && (cd /tmp && $PY -c "import fastloss, sys
i = fastloss.build_info(); print(i)
sys.exit(0 if i['extension_loaded'] and any(a.startswith('90') for a in i['cuda_archs'])
         and i['contrastive_fused_sm90'] else 1)"); then
      return 0
    fi
    echo "the prebuilt wheel did not load its sm_90 kernels here"
  else
    echo "no prebuilt wheel for these sources and this torch"
  fi
  echo "building from source"
  $PY -m pip install --no-build-isolation --no-deps -v "$REPO"
}
export -f build_fastloss
export PY REPO
step build "$OUT/build.log" 420 bash -c build_fastloss
cd /tmp  # import the installed package, not the source tree
step info "$OUT/info.log" 60 $PY -c "import fastloss, json; print(json.dumps(fastloss.build_info(), indent=1))"
# The staged row kernels (new, never run before): if they fault, hang or miss, every later step runs without them
# (FASTLOSS_ROW_STAGED=0, recorded in summary.txt) rather than failing with them.
# (A second call after such a failure sets FASTLOSS_ROW_STAGED=0 itself; a skipped step returns 2.)
step staged_smoke "$OUT/pytest_cuda.log" 120 $PY "$REPO/scripts/staged_smoke.py"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 2 ]; then
  export FASTLOSS_ROW_STAGED=0
  echo "staged_smoke failed: every later step runs with FASTLOSS_ROW_STAGED=0" >> "$OUT/summary.txt"
fi
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")  # one GPU, 8 test processes (when .whl has xdist)
# a hung test (a kernel that never returns) is killed alone and its worker replaced, instead of eating the step
PER_TEST=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150 --timeout-method thread")
step pytest_cuda "$OUT/pytest_cuda.log" 420 $PY -m pytest "$REPO/tests" -m cuda -k "not fused_matches_tile_loop" -q \
  -p no:cacheprovider -rfE $XDIST $PER_TEST
# The opt-in fused sm_90 GEMMs (FASTLOSS_CONTRASTIVE_FUSED=1, never run before): their own short steps, so that a
# fault or a hang there costs no other step; the benchmarks and profiles take them only if their tests pass.
FUSED=${FUSED_OK:-0}  # a second call that skips pytest_fused says FUSED_OK=1 when the first call's passed
# CUDA_LAUNCH_BLOCKING: a fault is reported at the GEMM that made it (CUTLASS built with NDEBUG only prints a
# failed TMA descriptor, "Failed to initialize the TMA descriptor", to stderr and launches anyway)
CUDA_LAUNCH_BLOCKING=1 step pytest_fused "$OUT/pytest_cuda.log" 180 $PY -m pytest "$REPO/tests" -m cuda -k fused_matches_tile_loop -q \
  -p no:cacheprovider -rfE && FUSED=1
step bandwidth "$LOGS/bandwidth.log" 300 $PY "$REPO/bench/bench_bandwidth.py" --out "$OUT/bandwidth.csv" \
  ${BANDWIDTH_SWEEP:+--sweep "$BANDWIDTH_SWEEP"}
# bf16 again in the same CSV (columns row_staged, row_prefetch, ce_light; each row checks its forward against
# torch): without the staged forwards (the light loop and Z-loss loop with their L2 prefetch), then without the
# prefetch too, then the CE forward's general loop: what each step gains
FASTLOSS_ROW_STAGED=0 step bandwidth_unstaged "$LOGS/bandwidth.log" 120 $PY "$REPO/bench/bench_bandwidth.py" \
  --dtypes bfloat16 --out "$OUT/bandwidth.csv"
FASTLOSS_ROW_STAGED=0 FASTLOSS_ROW_PREFETCH=0 step bandwidth_noprefetch "$LOGS/bandwidth.log" 120 $PY \
  "$REPO/bench/bench_bandwidth.py" --dtypes bfloat16 --out "$OUT/bandwidth.csv"
FASTLOSS_ROW_STAGED=0 FASTLOSS_CE_LIGHT=0 step bandwidth_general "$LOGS/bandwidth.log" 120 $PY \
  "$REPO/bench/bench_bandwidth.py" --dtypes bfloat16 --out "$OUT/bandwidth.csv"
# Gram form at the issue's GPU shape (N=32768, d=2048, V=131072, bf16) against torch, Liger and CCE; the table
# lands in bench_quick.log (the $OUT file budget is spent), the CSV in $LOGS.
step bench_spherical "$OUT/bench_quick.log" 300 $PY "$REPO/bench/bench_spherical.py" --device cuda \
  --out "$LOGS/spherical_cuda.csv"
# the bf16 Gram's accuracy against the logits' shared mean on the tensor-core GEMMs (raw vs centred Gram)
step gram_accuracy "$OUT/bench_quick.log" 90 $PY "$REPO/bench/gram_accuracy.py" --device cuda \
  --out "$LOGS/gram_accuracy_cuda.csv"
# the spherical row statistics (m2, mean) against float64 on the GPU's own arithmetic (fdividef merges, FMA)
step row_stats_accuracy "$OUT/bench_quick.log" 60 $PY "$REPO/bench/row_stats_accuracy.py" --device cuda
# contrastive family: quick GPU bench (table appended to bench_quick.log; CSV kept on the machine)
CONTRASTIVE_PROVIDERS=fastloss,$([ "$FUSED" = 1 ] && echo fastloss_fused,)fastloss_tile2x,torch,open_clip,inf_cl,siglip_kernel
step bench_contrastive "$OUT/bench_quick.log" 240 $PY "$REPO/bench/bench_contrastive.py" --preset gpu --device cuda \
  --dtype bf16 --ops clip_loss,siglip_loss,infonce_loss --providers "$CONTRASTIVE_PROVIDERS" \
  --out "$LOGS/contrastive_cuda.csv"
# memcheck after the three issue targets above (each short): a run cut at 600 s keeps the measurements
step sanitizer "$OUT/sanitizer.log" 300 compute-sanitizer --tool memcheck --error-exitcode 9 $PY "$REPO/scripts/sanitizer_case.py"
[ "$FUSED" = 1 ] && step sanitizer_fused "$OUT/sanitizer.log" 180 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PY "$REPO/scripts/sanitizer_case.py" --fused
# Where the time of the big targets goes (GEMMs vs fastloss kernels, per kernel name): torch.profiler
step profile "$OUT/bench_quick.log" 240 $PY "$REPO/scripts/profile_case.py" \
  --cases "clip,siglip,infonce,gram$([ "$FUSED" = 1 ] && echo ,clip_fused,siglip_fused,infonce_fused)"
# the row losses against torch (run 3 measured them; lower priority than the issue targets above)
if [ -f "$REPO/bench/bench_row_losses.py" ]; then
  step bench_quick "$OUT/bench_quick.log" 300 $PY "$REPO/bench/bench_row_losses.py" --preset quick --device cuda \
    --out "$OUT/row_losses_cuda.csv" ${BENCH_PROVIDERS:+--providers "$BENCH_PROVIDERS"}
fi
# Nsight Compute on the kernels furthest from their targets (speed of light, warp stalls, instruction mix),
# appended to bench_quick.log; skipped where ncu is missing or the counters are not permitted.
if command -v ncu >/dev/null 2>&1; then
  step ncu "$OUT/bench_quick.log" 240 ncu --kernel-name regex:"ce_fwd|spherical_fwd|row_fwd" --launch-count 3 \
    --section SpeedOfLight --section WarpStateStats --section InstructionStats --section Occupancy \
    --section LaunchStats --section ComputeWorkloadAnalysis $PY "$REPO/scripts/ncu_case.py"
fi
# the chunked LM head + cross-entropy against torch (materialised and chunked), Liger and CCE (bf16, N=16384,
# d=4096, V=128256)
step bench_linear_ce "$OUT/bench_quick.log" 240 $PY "$REPO/bench/bench_linear_ce.py" --device cuda \
  --out "$LOGS/linear_ce_cuda.csv"
step bench_factored "$OUT/bench_quick.log" 300 $PY "$REPO/bench/bench_factored.py" --device cuda \
  --out "$LOGS/factored_cuda.csv"
if [ -f "$REPO/bench/bench_sparsemax.py" ]; then  # sparsemax family: rows appended to the same CSV
  step bench_sparsemax "$LOGS/bench_sparsemax.log" 300 $PY "$REPO/bench/bench_sparsemax.py" --preset quick \
    --device cuda --out "$OUT/row_losses_cuda.csv"
fi
echo "=== summary"
cat "$OUT/summary.txt"
