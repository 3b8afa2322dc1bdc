"""Run fastloss's CUDA kernels on the CPU through the emulator (README.md here).

``load()`` builds (cached by the sources' hash) and loads the emulated library: ``torch.ops.fastloss_emu.<op>``
is then the CUDA kernel of ``torch.ops.fastloss.<op>`` taking CPU tensors. ``use_for_cpu()`` also routes
``torch.ops.fastloss.<op>``'s CPU dispatch to it, so that any CPU test exercises the CUDA kernels
(``FASTLOSS_CUEMU=1 pytest tests/...``, see conftest.py).
"""

from __future__ import annotations

import warnings

import torch

from . import build as _build

_lib = None
_override = _override_aten = None


def load() -> str:
    global _lib
    if _lib is None:
        _lib = str(_build.build())
        torch.ops.load_library(_lib)
    return _lib


def emulated_ops() -> list[str]:
    """Names of the ops that have an emulated CUDA kernel."""
    load()
    names = [n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastloss_emu::")]
    return sorted(n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastloss_emu::{n}", "CPU"))


def use_for_cpu() -> list[str]:
    """Routes the CPU dispatch of every op with an emulated CUDA kernel to that kernel; returns their names."""
    global _override, _override_aten
    import fastloss  # noqa: F401  (its CPU kernels register first: a later registration would replace ours)

    ops = emulated_ops()
    if _override is None:
        _override = torch.library.Library("fastloss", "IMPL")
        _override_aten = torch.library.Library("aten", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in ops:
                packet = getattr(torch.ops.fastloss_emu, name)
                _override.impl(name, lambda *a, _op=packet.default: _op(*a), "CPU")
            # cuBLAS's mixed-precision GEMMs (fp16/bf16 operands, fp32 output), which ATen has for CUDA only: exact
            # products in fp32 (a product of two 2-byte floats is exact there), fp32 accumulation
            _override_aten.impl("mm.dtype_out", _mm_dtype_out, "CPU")
            _override_aten.impl("addmm.dtype_out", _addmm_dtype_out, "CPU")
    return ops


def _mm_dtype_out(self, mat2, out_dtype, *, out):
    return torch.mm(self.to(out_dtype), mat2.to(out_dtype), out=out)


def _addmm_dtype_out(self, mat1, mat2, out_dtype, *, beta=1, alpha=1, out):
    r = torch.addmm(self.to(out_dtype), mat1.to(out_dtype), mat2.to(out_dtype), beta=beta, alpha=alpha)
    return out.copy_(r)  # out may be self
