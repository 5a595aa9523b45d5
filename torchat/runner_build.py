"""Building the C++ runners with CMake (`torchat runner`), their binaries published atomically.

    torchat runner --backend aoti --output-dir DIR       DIR/run and DIR/tokenize (what `doit runner:aoti` runs)
    build_runner("et", output_dir)                       the same, from Python (the tests cache it by the step's key)

The projects are runner-aoti/ and runner-et/ (the shared sources in runner/) and runner/ alone (the `tokenize`
tool, no libtorch or ExecuTorch). CMake builds in a persistent directory per project under $TORCHAT_CACHE, so an
edit recompiles only what changed; the binaries are then copied out (the build graph publishes that directory
under the runner step's key: the sources, torch/executorch versions, the C++ compiler and cmake).
Standard library only: building a runner needs no torch import.
"""

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from torchat.errors import TorchatError, unknown_key_error

REPO_ROOT = Path(__file__).resolve().parent.parent

# backend -> (CMake project directory, the directories whose files it compiles, the python distributions it links)
PROJECTS = {
    "aoti": ("runner-aoti", ("runner", "runner-aoti"), ("torch",)),
    "et": ("runner-et", ("runner", "runner-et"), ("executorch",)),
    "tokenize": ("runner", ("runner",), ()),
}
BINARIES = {"aoti": ("run", "tokenize"), "et": ("run", "tokenize"), "tokenize": ("tokenize",)}
JOBS = int(os.environ.get("TORCHAT_BUILD_JOBS", "2"))


def _cache_dir() -> Path:
    """$TORCHAT_CACHE, else ~/.cache/torchat (as torchat.sources.cache_dir)."""
    return Path(os.environ.get("TORCHAT_CACHE", "~/.cache/torchat")).expanduser()


def _package_dir(distribution: str) -> Path:
    spec = importlib.util.find_spec(distribution)
    if spec is None or not spec.submodule_search_locations:
        raise TorchatError(f"the {distribution} package is not installed; the {distribution} runner links its C++ "
                           "libraries (pip install -e .)")
    return Path(list(spec.submodule_search_locations)[0])


def cmake_prefix_path(backend: str) -> str:
    """Where CMake finds the pip wheels' packages: torch's share/cmake (torch.utils.cmake_prefix_path), or the
    executorch package directory (its share/cmake/executorch-config.cmake)."""
    if backend == "aoti":
        return str(_package_dir("torch") / "share" / "cmake")
    if backend == "et":
        return str(_package_dir("executorch"))
    return ""


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(argv: list[str], what: str, log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise TorchatError(f"{what} failed (exit {result.returncode}); the end of {log}:\n" + "\n".join(tail))


def build_runner(backend: str, output_dir: Path) -> list[Path]:
    """Configure and build the backend's project (incrementally, in the cache's build directory), then copy its
    binaries into `output_dir`. Raises TorchatError with the compiler's last lines when the build fails."""
    if backend not in PROJECTS:
        raise unknown_key_error("runner backend", backend, PROJECTS)
    if shutil.which("cmake") is None:
        raise TorchatError("cmake is not on PATH; install it (apt-get install cmake, or pip install cmake)")
    project, _, _ = PROJECTS[backend]
    # one build directory per checkout and project: CMake's own dependency tracking makes rebuilds incremental
    checkout = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]
    build = _cache_dir() / "runner-build" / f"{backend}-{checkout}"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _locked(build.parent / f".lock-{build.name}"):
        build.mkdir(parents=True, exist_ok=True)
        log = build / "build.log"
        log.write_text("")
        _run(["cmake", "-S", str(REPO_ROOT / project), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_PREFIX_PATH={cmake_prefix_path(backend)}"], f"configuring {project}", log)
        _run(["cmake", "--build", str(build), f"-j{JOBS}"], f"building {project}", log)
        built = []
        for name in BINARIES[backend]:
            shutil.copy2(build / name, output_dir / name)
            built.append(output_dir / name)
    return built
