"""Build facts and the fallback when the extension cannot load."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import torch

import fastloss


def test_build_info():
    info = fastloss.build_info()
    assert info["fastloss_version"] == fastloss.__version__
    assert info["extension_loaded"], info["load_error"]
    assert info["torch_version_built"].split("+")[0].rsplit(".", 1)[0] == torch.__version__.split("+")[0].rsplit(
        ".", 1
    )[0]
    for op in ("cross_entropy_fwd", "cross_entropy_bwd", "spherical_fwd", "spherical_bwd"):
        assert "cpu" in info["ops"][op]
        assert ("cuda" in info["ops"][op]) == bool(info["cuda_archs"])
    # the sm_90 fused contrastive GEMM is built whenever its CUTLASS headers are installed and sm_90 is compiled
    # (scripts/setup_env.sh installs them), and never without CUDA
    sm90 = any(a.startswith("90") for a in info["cuda_archs"])
    if sm90 and importlib.util.find_spec("cutlass_library") is not None and "CUTLASS_DIR" not in os.environ:
        assert info["contrastive_fused_sm90"]
    if not info["cuda_archs"]:
        assert not info["contrastive_fused_sm90"]


def test_extension_uses_the_stable_python_abi():
    """_C is built against the limited API (one build for every CPython >= 3.10 with the same torch): its file is
    _C.abi3.so and it needs no libpython symbol outside the stable ABI's PyModule_* set."""
    from fastloss import _ops

    path = os.path.realpath(_ops._C.__file__)
    if sysconfig.get_config_var("Py_GIL_DISABLED"):  # free-threaded: no stable ABI (CMakeLists.txt)
        return
    assert path.endswith(".abi3.so"), path
    if shutil.which("nm") is None:  # no binutils: the file name is the check
        return
    nm = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True, check=True)
    py = {line.split()[-1] for line in nm.stdout.splitlines() if line.split()[-1].startswith("Py")}
    assert py and py <= {"PyModule_Create2", "PyModule_AddStringConstant", "PyModule_AddIntConstant"}, py


def test_fallback_without_extension():
    """With fastloss._C unloadable, import still works, warns once, and every function runs the reference."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fastloss._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import fastloss
        msgs = [str(x.message) for x in w if "fastloss" in str(x.message)]
        assert len(msgs) == 1 and "fastloss.reference" in msgs[0], msgs
        import torch
        x = torch.randn(4, 7, requires_grad=True); t = torch.tensor([0, 6, -100, 3])
        a = fastloss.cross_entropy(x, t, label_smoothing=0.1)
        b = torch.nn.functional.cross_entropy(x, t, label_smoothing=0.1)
        torch.testing.assert_close(a, b)
        a.backward()
        fastloss.zloss(x, t).backward()
        info = fastloss.build_info()
        assert not info["extension_loaded"] and info["ops"]["spherical_fwd"] == []
        print("OK")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


def test_scripts_call_registered_ops():
    """bench/, scripts/ and examples/ run on a GPU machine only rarely: every fastloss op they call directly must
    exist (an op renamed in the library once made the bandwidth benchmark die on its first case there)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    called = set()
    for path in [*root.glob("bench/*.py"), *root.glob("scripts/*.py"), *root.glob("examples/*.py")]:
        text = path.read_text()
        if "torch.ops.fastloss" not in text:
            continue
        called |= {(path.name, name) for name in re.findall(r"\bops\.([a-z_0-9]+)\s*\(", text)}
        called |= {(path.name, name) for name in re.findall(r"torch\.ops\.fastloss\.([a-z_0-9]+)", text)}
    assert called, "no direct op calls found: the pattern is stale"
    missing = [(f, name) for f, name in sorted(called) if not hasattr(torch.ops.fastloss, name)]
    assert not missing, missing


def test_bandwidth_summary_without_gpu(tmp_path):
    """bench_bandwidth.py --summary (read on the CPU machine after a GPU run): one column per variant, and each
    variant's worst C judged against the 90 % target."""
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("bench_bandwidth", Path(__file__).parents[1] / "bench" / "bench_bandwidth.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = "device,op,mode,dtype,N,C,median_ms,gbps,copy_gbps,fraction_of_copy,packs_per_thread,ce_light,row_prefetch"
    rows = [f"H,cross_entropy,fwd,bfloat16,1,{C},1,1,1,{f},default,{light},default"
            for C, f, light in ((32768, 0.95, "default"), (65536, 0.85, "default"), (32768, 0.5, "0"),
                                (65536, 0.6, "0"))]
    path = tmp_path / "bw.csv"
    path.write_text("\n".join([head, *rows]) + "\n")
    out = mod.summary(str(path))
    assert out[0] == "variants: [0] default; [1] ce_light=0"
    assert "cross_entropy  fwd  bfloat16    65536  0.850  0.600" in out
    assert out[-1].split() == ["cross_entropy", "fwd", "bfloat16", "[0]", "0.850", "(below),", "[1]", "0.500",
                               "(below)"]
