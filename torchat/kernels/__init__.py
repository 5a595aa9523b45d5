"""torchat's own kernels (C++ sources here): ExecuTorch's, for the Python runtime and for runner-et, and torch's,
for eager models and AOTI artifacts in Python and for runner-aoti.

The executorch wheel ships its runtime as shared libraries (libexecutorch.so, which the pybindings load) and
its headers, but nothing to build a kernel against them from Python; so the first load compiles the sources
here with the machine's C++ compiler into one shared library, keyed by the sources, the flags, the compiler,
executorch's version and the CPU (it is built -march=native unless TORCHAT_KERNEL_MARCH names another target),
and cached under the torchat cache. Loading it registers its kernels in the runtime's registry, where the
pybindings find them. runner-et compiles the same sources into its binary (runner-et/CMakeLists.txt). The linears'
kernels for torch (torch_linear.cpp, the same arithmetic: linear_core.h) are a second library built the same way
against torch's headers (`load_torch_kernels`), compiled into runner-aoti.

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

HERE = Path(__file__).parent
# The two libraries: the ExecuTorch kernels (a .pte's attention and linears) and the linears' CPU kernels for torch
# (eager and .pt2; torch_linear.cpp), each the sources it compiles plus the headers they include (in the build key)
ET_SOURCES = [HERE / "et_sdpa.cpp", HERE / "et_linear.cpp"]
TORCH_SOURCES = [HERE / "torch_linear.cpp"]
HEADERS = [HERE / "linear_core.h"]
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
    return ["-O3", "-ffast-math", f"-march={os.environ.get('TORCHAT_KERNEL_MARCH') or 'native'}", "-shared",
            "-fPIC"]


def _et_command() -> tuple[list[str], list[str]]:
    """The ExecuTorch library's flags beside compile_flags(), and its includes and libraries (paths)."""
    root = _executorch_root()
    flags = ["-std=c++17", "-fopenmp-simd", "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
             "-DET_USE_THREADPOOL"]
    paths = [f"-I{root / 'include'}", f"-I{root / 'include/executorch/runtime/core/portable_type/c10'}",
             f"-L{root / 'lib'}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{root / 'lib'}"]
    return flags, paths


def _torch_command() -> tuple[list[str], list[str]]:
    """The torch library's: torch's headers want C++20; -fopenmp for at::parallel_for, whose OpenMP region is
    inline in its header (the libgomp torch loads serves it at run time)."""
    import torch
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    flags = ["-std=c++20", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    paths = [*(f"-I{p}" for p in include_paths()), f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    return flags, paths


def _executorch_root() -> Path:
    import executorch

    return Path(next(iter(executorch.__path__)))


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise TorchatError(f"{HERE}: no C++ compiler to build torchat's kernels; install g++ (or set CXX)")
    return compiler


def _cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _build_key(compiler: str, sources: list[Path], flags: list[str], versions: list[str]) -> str:
    digest = hashlib.sha256()
    for source in [*sources, *HEADERS]:
        digest.update(source.read_bytes())
    version_line = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for part in (*flags, version_line, *versions, platform.machine(), _cpu_flags()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _library(name: str, sources: list[Path], command: tuple[list[str], list[str]], package: str) -> Path:
    """The shared library `name` compiled from `sources`, built here (into a temporary file, then renamed into
    place) when missing: keyed by the sources, the flags, the compiler, `package`'s version and the CPU."""
    from importlib.metadata import version

    compiler = _compiler()
    flags, paths = command
    flags = [*compile_flags(), *flags]
    output = cache_dir() / "kernels" / f"{name}-{_build_key(compiler, sources, flags, [version(package)])}.so"
    if output.is_file():
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as scratch:
        built = Path(scratch) / output.name
        result = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(built), *paths],
                                capture_output=True, text=True)
        if result.returncode != 0:
            first_error = next((line for line in result.stderr.splitlines() if "error" in line),
                               result.stderr.strip()[:200])
            raise TorchatError(f"{sources[0]}: compiling torchat's kernels failed ({first_error}); check the C++ "
                               f"compiler ({compiler}) and the {package} install")
        os.replace(built, output)
    return output


def et_kernels_library() -> Path:
    """The ExecuTorch kernels' library (torchat::sdpa.out, linear_q4.out, linear_q8.out)."""
    return _library("torchat_et_kernels", ET_SOURCES, _et_command(), "executorch")


def torch_kernels_library() -> Path:
    """The linears' CPU kernels for torch (torchat::linear_q4, linear_q8, linear_w4)."""
    return _library("torchat_torch_kernels", TORCH_SOURCES, _torch_command(), "torch")


# op name under torch.ops.torchat -> the declaration of the C function torch_linear.cpp defines for it, which the
# code AOT Inductor generates calls (torch._inductor.config.aot_inductor.custom_ops_to_c_shims; torchat.lowering.aoti)
TORCH_C_SHIMS = {
    "linear_q4": "AOTITorchError aoti_torch_cpu_linear_q4(AtenTensorHandle x, AtenTensorHandle codes, "
                 "AtenTensorHandle scales, AtenTensorHandle offsets, AtenTensorHandle* norm, double eps, "
                 "AtenTensorHandle* residual, int32_t gated, AtenTensorHandle* ret0)",
    "linear_w4": "AOTITorchError aoti_torch_cpu_linear_w4(AtenTensorHandle x, AtenTensorHandle codes, "
                 "AtenTensorHandle scales, AtenTensorHandle offsets, AtenTensorHandle* norm, double eps, "
                 "AtenTensorHandle* residual, int32_t gated, AtenTensorHandle* ret0)",
    "linear_q8": "AOTITorchError aoti_torch_cpu_linear_q8(AtenTensorHandle x, AtenTensorHandle weight, "
                 "AtenTensorHandle scales, AtenTensorHandle* norm, double eps, AtenTensorHandle* residual, "
                 "int32_t gated, AtenTensorHandle* ret0)",
}


@cache
def load_torch_kernels() -> Path:
    """Register the CPU kernels of torchat::linear_q4, linear_q8 and linear_w4 with torch (their schemas first) and
    make their C shims visible to the AOTI models loaded after (RTLD_GLOBAL: a compiled model leaves them
    undefined); once. Eager 8da4w, 8da8w and int4 layers on CPU and the .pt2 / .so files compiled from them call
    these."""
    import torchat.quant.asym4  # noqa: F401  (the schemas, which the library's registrations need)
    import torchat.quant.intx  # noqa: F401

    path = torch_kernels_library()
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return path


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
