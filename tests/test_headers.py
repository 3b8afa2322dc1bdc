"""The torch-free maths headers (csrc/include/fastloss) compiled on their own with the host C++ compiler, for the
parts that only the CUDA kernels call (so the CPU extension tests do not reach them)."""

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
