"""The torch-free maths headers (csrc/include/fastloss) compiled on their own with the host C++ compiler, for the
parts that only the CUDA kernels call (so the CPU extension tests do not reach them)."""

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["online_lse_check", "contrastive_fold_check"])
def test_header_check(tmp_path, name):
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    exe = tmp_path / name
    build = subprocess.run([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                            f"-I{ROOT / 'csrc' / 'include'}",
                            str(ROOT / "tests" / "cpp" / f"{name}.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:]


def _nvcc():
    for path in (os.environ.get("CUDACXX"), os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
                 "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if path and os.path.isfile(path):
            return path
    return None


def test_sm90_tile_cover(tmp_path):
    """The fused sm_90 GEMMs' epilogues place each accumulator register at CuTe's partition_C coordinates: those
    must cover the 128 x 128 tile exactly once for the 128 threads of a warp group (host check, no GPU)."""
    nvcc = _nvcc()
    spec = importlib.util.find_spec("cutlass_library")
    if nvcc is None or spec is None:
        pytest.skip("needs nvcc and the CUTLASS headers (pip install nvidia-cutlass)")
    cutlass = Path(list(spec.submodule_search_locations)[0]) / "source"
    exe = tmp_path / "sm90_tile_cover_check"
    build = subprocess.run([nvcc, "-std=c++20", "-O0", "-DNDEBUG", "--expt-relaxed-constexpr",
                            "-gencode=arch=compute_90a,code=sm_90a", "-Xcudafe=--diag_suppress=177",
                            f"-I{ROOT / 'csrc' / 'include'}", "-isystem", str(cutlass / "include"),
                            "-isystem", str(cutlass / "tools" / "util" / "include"),
                            str(ROOT / "tests" / "cpp" / "sm90_tile_cover_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:]
