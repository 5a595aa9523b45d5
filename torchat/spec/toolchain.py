"""The native toolchain a C++ runner is built with, which enters the runner step's key. Standard library only."""

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
