"""Threads in a process that runs an ExecuTorch program: set up before torch is imported (this module imports
nothing heavy).

ExecuTorch's attention kernel in the pybindings (`llama::custom_sdpa`, from executorch's AOT library) runs on
ExecuTorch's thread pool and calls MKL's sgemm from each pool thread, the calling thread included; MKL then starts
an OpenMP team on each with libgomp's default size (one thread per core), so on 2 cores the pool's two threads and
their two teams spin against each other. After that, libgomp counts more threads than cores and throttles its
spinning for every later OpenMP region in the process, so an AOTI artifact run in the same process decodes at a
fifth of its speed. Only the environment sets libgomp's default for threads it did not start, so a process that
runs a `.pte` sets OMP_NUM_THREADS=1 before torch loads libgomp: MKL then stays on the calling thread, ExecuTorch's
pool keeps its own size (the XNNPACK GEMMs and the attention are split over it), and torch itself only does glue
there (sampling, copies). SmolLM2 8da4w `.pte`, Zen 4, 2 cores: prefill 760-800 -> 1150-1500 tok/s, decode
unchanged within the machine's noise (210-260 tok/s either way). Artifacts exported now attend with torchat's own
kernel (torchat/kernels), which calls no MKL; the setting stays for older artifacts and because torch's OpenMP
threads, spinning after the generation loop's own torch work, would still share the cores with ExecuTorch's pool.
"""

import os
import sys

PTE_ENVIRONMENT = {"OMP_NUM_THREADS": "1"}


PTE_FLAGS = ("--pte-path", "--pte")  # the flag that names a .pte and the seed's spelling of it (torchat.cli.flags)


def runs_pte(argv: list[str]) -> bool:
    """Does this command line run a .pte: `--pte-path X` (`--pte X`, `--pte-path=X`), a MODEL that is a .pte file,
    or an ExecuTorch build target (MODEL-QUANT[-DTYPE]-et)? An output path is not run."""
    for previous, arg in zip(["", *argv], argv):
        if arg in PTE_FLAGS or arg.startswith(tuple(f"{flag}=" for flag in PTE_FLAGS)):
            return True
        if arg.endswith((".pte", "-et")) and not previous.startswith("--output"):
            return True
    return False


def prepare_for_pte() -> bool:
    """This process will run a .pte: OpenMP single-threaded unless the user chose otherwise (see above).

    False, changing nothing, once torch is imported (an in-process caller, a test): libgomp has read its
    environment by then.
    """
    if "torch" in sys.modules:
        return False
    for name, value in PTE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    return True


def pte_child_environment() -> dict:
    """The environment for a child process that runs a .pte."""
    return {**os.environ, **{k: os.environ.get(k, v) for k, v in PTE_ENVIRONMENT.items()}}


def pte_pool_size() -> int:
    """The threads of ExecuTorch's own pool, which run a .pte's work (XNNPACK and the attention)."""
    from torchat.kernels import et_pybindings  # the C extension alone, not the compiler portable_lib imports
    from torchat.quiet import native_log_lines

    with native_log_lines():  # the first call starts the pool, which logs what it probes of the CPU
        return et_pybindings()._threadpool_get_thread_count()


def set_pte_pool_size(threads: int) -> None:
    from torchat.kernels import et_pybindings
    from torchat.quiet import native_log_lines

    with native_log_lines():  # the runtime logs the reset ("Resetting threadpool to N threads.")
        et_pybindings()._unsafe_reset_threadpool(threads)
