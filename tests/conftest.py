import pytest
import torch

import fastloss
from fastloss import _ops

HAS_CUDA = torch.cuda.is_available() and _ops.has_kernel("cross_entropy_fwd", "cuda")

# The cuda device joins a test only when a GPU and the CUDA kernels exist; `pytest -m cuda` selects them.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU / CUDA kernels")]),
]


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
            f"GPU tests {'on' if HAS_CUDA else 'off'}"]
