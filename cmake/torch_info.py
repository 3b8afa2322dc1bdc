"""Prints the facts CMake needs about the installed torch, as `key=value` lines."""
import importlib.util
import os

import torch

lib = os.path.join(os.path.dirname(torch.__file__), "lib")
print(f"TORCH_DIR={os.path.dirname(torch.__file__)}")
print(f"TORCH_LIB_DIR={lib}")
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda or ''}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# free-threaded CPython (3.13t, ...) has no stable ABI: the module is then built for that interpreter only
print(f"PY_FREE_THREADED={int(bool(__import__('sysconfig').get_config_var('Py_GIL_DISABLED')))}")
# nvidia wheels ship headers (cusparse.h, ...) some torch headers include.
nv = [os.path.join(p, "nvidia") for p in __import__("site").getsitepackages()]
inc = [os.path.join(d, sub, "include") for d in nv if os.path.isdir(d) for sub in sorted(os.listdir(d))]
print("NVIDIA_WHEEL_INCLUDES=" + ";".join(p for p in inc if os.path.isdir(p)))
# CUTLASS headers for the sm_90 fused contrastive GEMM: the pip package nvidia-cutlass ships them under
# cutlass_library/source (found without importing it); CUTLASS_DIR in the environment overrides.
cutlass = os.environ.get("CUTLASS_DIR", "")
if not cutlass:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        cutlass = os.path.join(list(spec.submodule_search_locations)[0], "source")
ok = os.path.isfile(os.path.join(cutlass, "include", "cutlass", "cutlass.h"))
print(f"CUTLASS_DIR={cutlass if ok else ''}")
