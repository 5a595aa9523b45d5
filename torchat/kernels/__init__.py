"""torchat's own ExecuTorch kernels (C++ sources here), for the Python runtime and for runner-et.

The executorch wheel ships its runtime as shared libraries (libexecutorch.so, which the pybindings load) and
its headers, but nothing to build a kernel against them from Python; so the first load compiles the sources
here with the machine's C++ compiler into one shared library, keyed by the sources, the flags, the compiler,
executorch's version and the CPU (it is built -march=native unless TORCHAT_KERNEL_MARCH names another target),
and cached under the torchat cache. Loading it registers its kernels in the runtime's registry, where the
pybindings find them. runner-et compiles the same sources into its binary (runner-et/CMakeLists.txt).

`load_pte_runtime` is what running a .pte from Python needs, and nothing more: the pybindings' C extension and the
kernel libraries, loaded directly. The wheel's Python wrappers around them pull in its compiler: `portable_lib`
imports `executorch.exir` (for a warning class; ~6 s on 2 cores), the llm `custom_ops` module imports torch's
Inductor lowering to register the ops' export-time forms. The exporter (torchat.lowering) still imports those.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from types import ModuleType

from torchat.errors import TorchatError
from torchat.quiet import native_log_lines
from torchat.sources import cache_dir

SOURCES = [Path(__file__).with_name(name) for name in ("et_sdpa.cpp", "et_linear.cpp")]
# The wheel's kernel libraries that torchat's .pte programs call, as globs under the executorch package (the wheel's
# own loaders glob the same way): the quantized_decomposed kernels (embedding_byte/4bit...; without them a
# quantized program fails to load with error 0x14) and the LLM extension's llama::update_cache (and custom_sdpa,
# which older artifacts attend with). Each also registers its ops' ATen forms with torch, which is why they are
# loaded with torch.ops.load_library.
PTE_KERNEL_LIBRARIES = ("kernels/quantized/*quantized_ops_aot_lib.*", "extension/llm/custom_ops/*custom_ops_aot_lib.*")
# -ffast-math: glibc's vectorized expf (libmvec) for the softmax; the sources avoid infinities.
# TORCHAT_KERNEL_MARCH replaces -march=native (benchmarks/avx2_emulation.py sets x86-64-v3: AVX2, FMA, F16C, so that
# the kernel, too, runs without AVX-512 there); it is one of the flags, so part of the build key.
def compile_flags() -> list[str]:
    return ["-std=c++17", "-O3", "-ffast-math", "-fopenmp-simd",
            f"-march={os.environ.get('TORCHAT_KERNEL_MARCH') or 'native'}", "-shared", "-fPIC",
            "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL"]


def _executorch_root() -> Path:
    import executorch

    return Path(next(iter(executorch.__path__)))


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise TorchatError(f"{SOURCES[0]}: no C++ compiler to build torchat's ExecuTorch kernels; install g++ "
                           f"(or set CXX)")
    return compiler


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _build_key(compiler: str) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    version_line = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for part in (*compile_flags(), version_line, version("executorch"), platform.machine(), _cpu_flags()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def et_kernels_library() -> Path:
    """The compiled library, built here (into a temporary file, then renamed into place) when missing."""
    compiler = _compiler()
    output = cache_dir() / "kernels" / f"torchat_et_kernels-{_build_key(compiler)}.so"
    if output.is_file():
        return output
    root = _executorch_root()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        built = Path(scratch) / output.name
        command = [compiler, *compile_flags(), f"-I{root / 'include'}",
                   f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}", *map(str, SOURCES),
                   "-o", str(built), f"-L{root / 'lib'}", "-lexecutorch", "-lexecutorch_threadpool",
                   f"-Wl,-rpath,{root / 'lib'}"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line),
                               result.stderr.strip()[:200])
            raise TorchatError(f"{SOURCES[0]}: compiling torchat's ExecuTorch kernels failed ({first_error}); "
                               f"check the C++ compiler ({compiler}) and the executorch install")
        os.replace(built, output)
    return output


def et_pybindings() -> ModuleType:
    """The ExecuTorch pybindings' C extension (`_load_for_executorch`, the thread pool's controls), imported without
    the `portable_lib` wrapper and the compiler it imports."""
    import torch  # noqa: F401  (libtorch first: the extension links against it, as portable_lib says)
    from executorch.extension.pybindings import _C

    return _C


@cache
def load_et_kernels() -> Path:
    """Register torchat's kernels (torchat::sdpa.out) in the ExecuTorch runtime the pybindings use; once."""
    et_pybindings()  # first, so that the library binds to the runtime (and kernel registry) already loaded
    path = et_kernels_library()
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return path


@cache
def load_pte_runtime() -> ModuleType:
    """The pybindings' C extension with every kernel a torchat .pte calls registered (see the module docstring)."""
    import torch

    pybindings = et_pybindings()
    root = _executorch_root()
    for pattern in PTE_KERNEL_LIBRARIES:
        found = sorted(root.glob(pattern))
        if len(found) != 1:
            raise TorchatError(f"{root}: expected one {pattern} in the executorch install, found {len(found)}; "
                               "reinstall executorch (pip install -e . pins its version)")
        # a library the wheel's own loader (executorch.kernels.quantized, custom_ops) already loaded is a no-op
        torch.ops.load_library(found[0])
    load_et_kernels()
    # ExecuTorch's thread pool, started here rather than inside the first forward: it logs what it probes of the
    # CPU when it starts, which native_log_lines keeps off the terminal of a CLI user who did not ask (-v)
    with native_log_lines():
        pybindings._threadpool_get_thread_count()
    return pybindings
