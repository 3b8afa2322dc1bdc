import os

import pytest
import torch

import fastloss
from fastloss import _ops

# FASTLOSS_CUEMU=1: the CPU dispatch of every op with a CUDA kernel runs that kernel in the emulator
# (tests/cuemu/README.md), so the CPU tests below exercise the CUDA sources.
EMULATED_OPS = []
if os.environ.get("FASTLOSS_CUEMU") == "1":
    from cuemu import emulate

    EMULATED_OPS = emulate.use_for_cpu()

HAS_CUDA = torch.cuda.is_available() and _ops.has_kernel("cross_entropy_fwd", "cuda")

# The cuda device joins a test only when a GPU and the CUDA kernels exist; `pytest -m cuda` selects them.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU / CUDA kernels")]),
]


def pytest_collection_modifyitems(config, items):
    # under the emulator the CPU dispatch runs the CUDA kernels, which poison a bad index's row with NaN (no
    # host sync) instead of raising, and have no CPU twin of the fused GEMMs: those CPU-only assertions go
    if EMULATED_OPS:
        kept = [it for it in items if it.get_closest_marker("host_kernels") is None]
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("host_kernels")])
        items[:] = kept


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _no_validation_leak():
    yield
    fastloss.set_validation(False)


def pytest_report_header(config):
    info = fastloss.build_info()
    return [f"fastloss {info['fastloss_version']}: extension_loaded={info['extension_loaded']}, "
            f"cuda={info['cuda_version']} archs={info['cuda_archs']}, "
            f"cpu_isas={info['cpu_isas']} (in use: {info['cpu_isa']}), "
            f"GPU tests {'on' if HAS_CUDA else 'off'}",
            f"CUDA kernels emulated on the CPU for {len(EMULATED_OPS)} ops" if EMULATED_OPS else "no CUDA emulation"]
