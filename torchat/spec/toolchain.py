"""The native toolchain a C++ runner or an AOTI build is compiled with, which enters the step's key. Standard
library only."""

import functools
import os
import subprocess
import sys


@functools.cache
def native_toolchain() -> dict[str, str]:
    """The C++ compiler's and cmake's versions and the Python environment whose torch/executorch libraries a runner
    links (its RUNPATH points there), which enter the runner step's key (a few ms: runner nodes only)."""
    found = {"python_prefix": sys.prefix}
    for name, argv in (("cxx", [os.environ.get("CXX", "c++"), "--version"]), ("cmake", ["cmake", "--version"])):
        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            found[name] = result.stdout.splitlines()[0].strip() if result.stdout else "absent"
        except OSError:
            found[name] = "absent"
    return found


# the x86 and Arm instruction-set extensions a compiler may use under -march=native (flags as /proc/cpuinfo names them)
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "bmi", "sse", "ssse", "vnni", "asimd", "sve", "sme2", "fp16", "bf16",
                 "i8mm", "dotprod")


@functools.cache
def compiled_code_target() -> dict[str, str]:
    """What an AOTI build's compiled code depends on besides its inputs: Inductor compiles the model's kernels with
    the machine's C++ compiler and -march=native, so a .so built here may use instructions another CPU lacks. The
    compiler's version and the CPU's instruction-set extensions enter an AOTI build's key: a machine with other ones
    builds (or pulls from a remote cache) its own artifact instead of one that could crash it."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    flags.update(f for f in value.split() if f.startswith(_ISA_PREFIXES) or f == "sme")
    except OSError:
        pass
    import platform

    target = {"cxx": native_toolchain()["cxx"], "machine": platform.machine(), "isa": " ".join(sorted(flags))}
    # what narrows the code to fewer instructions than the CPU's (benchmarks/avx2_emulation.py sets both): Inductor's
    # -march and the vector ISA it and ATen pick. Only when set, so that every other build keeps its key.
    for variable in ("TORCHINDUCTOR_CPP_MARCH", "ATEN_CPU_CAPABILITY"):
        if os.environ.get(variable):
            target[variable] = os.environ[variable]
    return target
