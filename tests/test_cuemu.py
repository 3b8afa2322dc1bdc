"""The CUDA kernels on the CPU through the emulator (tests/cuemu/README.md): every op with a CUDA kernel, on cases
chosen for the CUDA code paths (persistent grids with several rows per block, staged and unstaged rows, tails,
partial groups, tile edges), against the CPU kernels; the staged row kernels bit for bit against the unstaged
ones; and every kernel bit for bit with its threads run in reverse and in shuffled order between barriers (a
shared-memory race would change a result). Each variant is its own process (the switches are read once per
process, and the emulator replaces the CPU dispatch of the process it runs in)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import EMULATED_OPS

from samples import as_bytes

HERE = Path(__file__).resolve().parent
RUN = HERE / "cuemu" / "run_cases.py"

TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # fp32 outputs (there are no fp64 cases)

pytestmark = pytest.mark.skipif(bool(EMULATED_OPS), reason="this process's CPU kernels are already emulated")


def _run(tmp: Path, name: str, emulate: bool, **env) -> dict:
    out = tmp / f"{name}.pt"
    cmd = [sys.executable, str(RUN), str(out)] + (["--emulate"] if emulate else [])
    full_env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)}
    full_env.pop("FASTLOSS_CUEMU", None)
    if env.get("FASTLOSS_EMU_ASAN") == "1":
        from cuemu import build

        full_env["LD_PRELOAD"] = build.asan_runtime()
        full_env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1"
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "ERROR: AddressSanitizer" not in r.stderr, r.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuemu")
    return {
        "cpu": _run(tmp, "cpu", False),
        "emulated": _run(tmp, "emulated", True),
        "unstaged": _run(tmp, "unstaged", True, FASTLOSS_ROW_STAGED="0"),
        "reverse": _run(tmp, "reverse", True, FASTLOSS_EMU_ORDER="reverse"),
        "shuffle": _run(tmp, "shuffle", True, FASTLOSS_EMU_ORDER="shuffle:7"),
        "asan": _run(tmp, "asan", True, FASTLOSS_EMU_ASAN="1"),
    }


def test_emulated_cuda_kernels_match_cpu_kernels(runs):
    cpu, emu = runs["cpu"], runs["emulated"]
    assert cpu.keys() <= emu.keys()  # the emulated run adds the NaN rows of bad targets (the CPU raises)
    assert len(cpu) > 300
    for key, want in cpu.items():
        got = emu[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        if want.dtype == torch.bool or not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        assert torch.equal(got.isnan(), want.isnan()), key
        if want.dtype in (torch.float16, torch.bfloat16):
            # 2-byte outputs: the CUDA kernels round some intermediates to the feature dtype where the CPU keeps
            # fp32 (the contrastive backward's t * G, read by the GEMMs), so single lanes of a cancelling sum
            # differ by more than an ulp: compared as a whole, as the CUDA tests compare against float64
            g, w = got.nan_to_num().double(), want.nan_to_num().double()
            err = (g - w).norm() / w.norm().clamp_min(1e-30)
            assert err < 1e-2, (key, err.item())
        else:  # summation orders differ (a block's threads vs the CPU's lanes): a few ulps
            torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, k=key: f"{k}: {m}", **TOLERANCE)


def test_emulated_staged_rows_match_unstaged(runs):
    """As test_cuda_staged_forwards_bitwise_equal_unstaged on a GPU: for 2-byte rows the staged walk (persistent
    grid, shared-memory ring, several rows per block) visits each thread's packs and merges them in the unstaged
    kernels' order, bit for bit. fp32 rows fold in other groups (the staged forward's 4 packs with the accurate
    exp), so their row statistics, and through them the gradients, may differ in the last bit."""
    emu, unstaged = runs["emulated"], runs["unstaged"]
    streamed = [k for k in emu if k.startswith(("streamed/", "nan_row/"))]
    assert len(streamed) > 100
    for key in streamed:
        if emu[key].dtype == torch.float32:
            torch.testing.assert_close(emu[key], unstaged[key], rtol=2e-6, atol=1e-9, equal_nan=True)
        else:
            assert torch.equal(as_bytes(emu[key]), as_bytes(unstaged[key])), key


@pytest.mark.parametrize("order", ["reverse", "shuffle"])
def test_emulated_kernels_do_not_depend_on_thread_order(runs, order):
    emu, other = runs["emulated"], runs[order]
    assert emu.keys() == other.keys()
    for key in emu:
        assert torch.equal(as_bytes(emu[key]), as_bytes(other[key])), key


def test_emulated_kernels_stay_in_bounds(runs):
    """The same cases under AddressSanitizer (the CPU tensors' allocations carry red zones; a read or write past
    one stops the run with a report, which _run turns into a failure); the results are the same bits."""
    emu, asan = runs["emulated"], runs["asan"]
    assert emu.keys() == asan.keys()
    for key in emu:
        assert torch.equal(as_bytes(emu[key]), as_bytes(asan[key])), key


def test_emulator_raises_where_a_gpu_would_fault_or_hang(tmp_path):
    """The emulator's own checks (cuemu/selftest.cpp): a misaligned 16-byte pack load or store, __syncthreads after
    some threads returned, a shuffle reading a lane that returned, a barrier that can never release, a shared
    address past the launch, too much dynamic shared memory, a ring slot read while its cp.async is in flight, a
    thread returning with copies in flight, a block above the kernel's __launch_bounds__ and a grid past the
    GPU's limits each raise with their message; correct kernels (a shuffle among the lanes that have not
    returned, slots read after the wait that covers them, a block within the bounds) run; a __shared__ slot
    the block never wrote reads as NaN (not the previous block's value)."""
    from cuemu import build

    r = subprocess.run([str(build.build_selftest(tmp_path))], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert r.stdout.count("ok: ") == 20 and "FAIL" not in r.stdout, r.stdout

