#!/usr/bin/env bash
# Wheels the GPU machine cannot download (it has no network), fetched here into .whl/ (git-ignored) and carried
# to it by the device tool (`carry: [".whl"]`); scripts/gpu_check.sh installs them with --no-deps.
#   expecttest     torch.library.opcheck in the CUDA tests
#   pytest-xdist, execnet   the ~770 CUDA tests in 8 processes (they must fit the device tool's 600 s per call)
#   inf-cl         Inf-CL's tiled Triton CLIP loss (bench_contrastive peer)
#   siglip-kernel  fused Triton SigLIP loss (bench_contrastive peer)
#   liger-kernel, cut-cross-entropy   fused linear cross-entropy (bench_spherical / bench_row_losses peers)
#   nvidia-cutlass  CUTLASS headers for the sm_90 fused contrastive GEMM (the build finds them on PYTHONPATH)
set -eu
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
$PIP download -q --no-deps --only-binary=:all: -d .whl expecttest==0.3.0 inf-cl==1.2.1 siglip-kernel==0.1.2 \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 pytest-xdist==3.8.0 execnet==2.1.2 nvidia-cutlass==4.2.0.0
ls -l .whl
