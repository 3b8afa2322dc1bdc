"""Build fastloss's CUDA sources as host C++ against the emulator in tests/cuemu/shim (README.md there).

The sources are used as they are, with five mechanical rewrites: a launch ``k<<<grid, block, smem, stream>>>(args)``
becomes ``::emu::launch(grid, block, smem, stream)(k)(args)``, a kernel with ``__launch_bounds__(max_threads, ...)``
checks its block size first, ``extern __shared__ T name[];`` a pointer to the
emulator's dynamic shared memory, ``__shared__ T name[n];`` a function static (blocks run one at a time) that the
emulator fills with 0xff bytes before each block (on a GPU its contents are undefined), and the ops register
for the CPU dispatch key under the op namespace ``fastloss_emu`` (``-Dfastloss=fastloss_emu``, registration.cpp
included), so that ``torch.ops.fastloss_emu.<op>`` runs the CUDA kernels on CPU tensors beside the real CPU
kernels in ``torch.ops.fastloss``.

    python tests/cuemu/build.py [--out DIR] [--jobs N]    # prints the library's path
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
SOURCES = ["row_losses.cu", "spherical.cu", "stable_softmax.cu", "sparsemax.cu", "contrastive.cu"]

_LAUNCH = re.compile(r"^([ \t]*)(\S[^\n]*?)<<<(.*?)>>>\(", re.M | re.S)
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_STATIC_SMEM = re.compile(r"__shared__\s+(?P<type>[\w:<>, ]+?)\s+(?P<name>\w+)(?P<dims>(?:\s*\[[^\]]+\])*)\s*;")


def _check_launch_bounds(text: str) -> str:
    """Each ``__global__ ... __launch_bounds__(max_threads, ...) name(params) {`` kernel begins with
    ``::emu::check_launch_bounds(max_threads);``: a GPU refuses a launch of more threads per block than that."""
    out, pos = [], 0
    for m in re.finditer(r"__launch_bounds__\(", text):
        if m.start() < pos:
            continue
        depth, i = 1, m.end()
        while depth:  # the bounds' closing parenthesis
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        args = text[m.end():i - 1]
        angle, cut = 0, len(args)
        for j, c in enumerate(args):  # the first argument (template arguments may hold commas)
            angle += {"<": 1, ">": -1, "(": 1, ")": -1}.get(c, 0)
            if c == "," and angle == 0:
                cut = j
                break
        k = text.index("(", i)  # the kernel's parameter list, then its body
        depth = 1
        k += 1
        while depth:
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            k += 1
        body = text.index("{", k) + 1
        out += [text[pos:body], f" ::emu::check_launch_bounds({args[:cut].strip()});"]
        pos = body
    return "".join(out) + text[pos:]


def rewrite(text: str) -> str:
    """The emulator's form of one .cu file."""
    text = _check_launch_bounds(text)
    text, n = _LAUNCH.subn(lambda m: f"{m[1]}::emu::launch({m[3]})({m[2]})(", text)
    if "<<<" in text:
        raise RuntimeError("cuemu: a kernel launch the rewrite does not understand")
    text = _DYNAMIC_SMEM.sub(lambda m: f"{m[1]}* {m[2]} = ::emu::dynamic_smem<{m[1]}>();", text)
    text = _STATIC_SMEM.sub(lambda m: f"static {m['type']} {m['name']}{m['dims']}; static const bool "
                            f"{m['name']}_cuemu = ::emu::static_smem(&{m['name']}, sizeof({m['name']}));", text)
    if re.search(r"\b__shared__\b", re.sub(r'//[^\n]*|"(?:\\.|[^"\\])*"', "", text)):  # (comments, strings)
        raise RuntimeError("cuemu: a __shared__ declaration the rewrite does not understand")
    return text.replace("TORCH_LIBRARY_IMPL(fastloss, CUDA, m)", "TORCH_LIBRARY_IMPL(fastloss, CPU, m)")


def _inputs_hash() -> str:
    h = hashlib.sha256()
    files = sorted(CSRC.rglob("*")) + sorted(HERE.rglob("*.h")) + [Path(__file__).resolve()]
    for f in files:
        if f.is_file() and "sm90" not in f.name:
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    import torch

    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def _flags() -> tuple[list[str], list[str]]:
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = ["-std=c++20", "-O1", "-fPIC", "-w", "-U_FORTIFY_SOURCE", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
              "-Dfastloss=fastloss_emu", "-DFL_HAVE_SM90_FUSED=0", "-DFL_EMULATE_DEVICE_MATH",
              f"-I{HERE / 'shim'}", f"-I{CSRC / 'include'}", f"-I{CSRC / 'cuda'}", f"-I{CSRC}",
              f"-I{sysconfig.get_paths()['include']}"]
    cflags += [f"-I{p}" for p in cpp_extension.include_paths()]
    if _host_has_fma():  # nvcc fuses a * b + c into one FFMA (--fmad=true): round the same way here (within
        # an expression: `fast` leaves it to the optimiser, and the ASan build would fuse differently)
        cflags += ["-mfma", "-ffp-contract=on"]
    lib = Path(torch.__file__).parent / "lib"
    ldflags = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"]
    if _sanitize():
        # AddressSanitizer: the kernels' global reads and writes against the CPU tensors' bounds. With it the
        # undefined-behaviour checks that are faults or wrong results on a GPU too: shifts, integer division by
        # zero, signed overflow (an index that wraps), out-of-bounds local arrays, null pointers, misaligned
        # scalar and member accesses (a whole 16-byte pack's copy is checked by FL_CHECKED_COPY instead: UBSan
        # does not see aggregate copies). Any report stops the run.
        ub = "alignment,bounds,shift,integer-divide-by-zero,signed-integer-overflow,null,return,unreachable"
        cflags += ["-fsanitize=address," + ub, "-fno-sanitize-recover=" + ub, "-fno-omit-frame-pointer",
                   "-shared-libasan"]
        ldflags += ["-fsanitize=address," + ub, "-shared-libasan"]
    return cflags, ldflags


def _host_has_fma() -> bool:
    try:
        return " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        return False


def _sanitize() -> bool:
    """FASTLOSS_EMU_ASAN=1: build with AddressSanitizer (run with asan_runtime() in LD_PRELOAD)."""
    return os.environ.get("FASTLOSS_EMU_ASAN") == "1"


def asan_runtime() -> str:
    """The AddressSanitizer runtime of the emulator's compiler, for LD_PRELOAD."""
    return subprocess.run([compiler(), "-print-file-name=libclang_rt.asan-x86_64.so"], capture_output=True,
                          text=True, check=True).stdout.strip()


def compiler() -> str:
    """FASTLOSS_EMU_CXX, else clang++ (GCC 12 crashes with an internal error on the row kernels' lambdas)."""
    if os.environ.get("FASTLOSS_EMU_CXX"):
        return os.environ["FASTLOSS_EMU_CXX"]
    for c in ("clang++", "clang++-14", "clang++-15", "clang++-16"):
        if shutil.which(c):
            return c
    raise RuntimeError("cuemu: no clang++ (apt-get install clang; GCC 12 cannot compile the CUDA sources as C++)")


def build(out: Path | None = None, jobs: int | None = None) -> Path:
    """Builds (or finds, by the sources' hash) the emulated library and returns its path."""
    out = Path(out) if out else ROOT / "build" / "cuemu"
    so = out / f"fastloss_emu_{_inputs_hash()}{'_asan' if _sanitize() else ''}.so"
    if so.exists():
        return so
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # one builder at a time (pytest-xdist workers); the others wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not so.exists():
            _build(so, out, jobs)
    return so


def _build(so: Path, out: Path, jobs: int | None) -> None:
    src = out / "src" / "cuda"
    src.mkdir(parents=True, exist_ok=True)
    units = []
    for name in SOURCES:
        dst = src / (name + (".asan.cpp" if _sanitize() else ".cpp"))
        dst.write_text(rewrite((CSRC / "cuda" / name).read_text()))
        units.append(dst)
    units.append(CSRC / "registration.cpp")
    cflags, ldflags = _flags()
    cxx = compiler()

    def compile_one(u: Path) -> Path:
        obj = out / (u.name + (".asan.o" if _sanitize() else ".o"))
        r = subprocess.run([cxx, *cflags, "-c", str(u), "-o", str(obj)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cuemu: compiling {u.name} failed:\n{r.stderr[-6000:]}")
        return obj

    with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        objs = list(pool.map(compile_one, units))
    tmp = so.with_suffix(f".tmp{os.getpid()}")
    r = subprocess.run([cxx, "-shared", *map(str, objs), "-o", str(tmp), *ldflags], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuemu: linking failed:\n{r.stderr[-6000:]}")
    tmp.replace(so)  # atomic: a process that finds it never loads a half-written library


def build_selftest(out: Path) -> Path:
    """Compiles selftest.cpp (the emulator's own checks; tests/test_cuemu.py runs it) and returns the program."""
    out.mkdir(parents=True, exist_ok=True)
    src = out / "selftest.cpp"
    src.write_text(rewrite((HERE / "selftest.cpp").read_text()))
    cflags, ldflags = _flags()
    exe = out / "selftest"
    r = subprocess.run([compiler(), *cflags, str(src), "-o", str(exe), *ldflags], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuemu: compiling selftest.cpp failed:\n{r.stderr[-6000:]}")
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args()
    print(build(a.out, a.jobs))


if __name__ == "__main__":
    sys.exit(main())
