"""The baseline (non-AVX2) CPU kernels. An AVX2 machine picks the AVX2 kernel tables, so the baseline build of
every family would go untested; FASTLOSS_CPU_ISA=base forces it, and this test reruns a cross-family selection
of the reference comparisons (fp32 vector paths included) in a subprocess with it set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastloss

TESTS = Path(__file__).parent
SELECTION = ("cpu and (matches_torch or softmax_collapse or extras_match or matches_reference or float32_close "
             "or larger_rows or one_pass_gradient or sigmoid_return_stats)")
FILES = ["test_cross_entropy.py", "test_zloss.py", "test_spherical.py", "test_stable_softmax.py",
         "test_sparsemax.py", "test_contrastive.py"]

needs_both = pytest.mark.skipif(
    not fastloss.build_info()["extension_loaded"] or "base" not in fastloss.build_info()["cpu_isas"],
    reason="needs the compiled extension with its baseline kernels",
)


def _env():
    return dict(os.environ, FASTLOSS_CPU_ISA="base")


@needs_both
def test_env_selects_the_baseline_kernels():
    code = "import fastloss; print(fastloss.build_info()['cpu_isa'])"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "base"


@needs_both
def test_baseline_kernels_match_the_references():
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-k", SELECTION,
           *[str(TESTS / f) for f in FILES]]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1200)
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
