"""Keeping the libraries' own chatter out of a user's terminal, unless they ask for it with --verbose.

The CLI calls this once, after parsing its flags and before the verb imports torch or a loader:

    from torchat.quiet import quiet_libraries
    quiet_libraries(verbose=args.verbose)

What a user otherwise sees before the answer, and where each comes from:
- `Failed to load .../torchao/_C_mxfp8...so` (twice): torchao's `__init__` tries its CUDA-only extensions and
  reports each failure on the `torchao` logger, which (no handler configured) Python's last-resort handler prints.
- `W1202 ... torch/utils/_pytree.py:630] <enum 'KernelPreference'> ... register_constant() ... deprecated`: torch's
  own logging (the `torch` logger, which torch sets up at import from $TORCH_LOGS), reacting to torchao's import.
- FutureWarning/DeprecationWarning/UserWarning from Python's `warnings` (torch's `_check_is_size`, pytree's
  `LeafSpec`, ExecuTorch's "experimental API"): meant for the libraries' developers, not for a CLI user.
- ExecuTorch's log lines (`[cpuinfo_utils.cpp:71] Reading file ...`; the C++ runner's `I 00:00:00.000
  executorch:...`): its runtime logs what it probes when its thread pool starts. The pybindings write them to
  `sys.stderr`, a plain C++ build to file descriptor 2; the loaders wrap the calls that start the pool in
  `native_log_lines()`, which drops them unless verbose.
Errors are never hidden: loggers keep ERROR, and `native_log_lines` passes on every line that is not ExecuTorch's.
Without a call to `quiet_libraries` (torchat used as a library) nothing changes.
"""

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

# Python loggers of libraries torchat imports; at ERROR their warnings are not shown.
LIBRARY_LOGGERS = ("torchao", "executorch")
LIBRARY_MODULES = r"(torch|torchao|executorch)(\.|$)"
# ExecuTorch's log line, as the pybindings write it (`[file.cpp:71] text`) and as its default C++ platform layer
# does (`I 00:00:00.091045 executorch:file.cpp:71] text`); errors (E/F) of the latter stay.
ET_LOG_LINE = re.compile(r"^(\[[\w.]+\.(cpp|cc|h):\d+\] |[DI] \d\d:\d\d:\d\d\.\d+ executorch:)")

_quiet = False


def quiet_libraries(verbose: bool) -> None:
    """Hide the libraries' warnings and informational logs for the rest of this process, unless `verbose`."""
    global _quiet
    _quiet = not verbose
    if verbose:
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # torch configures its `torch` logger at import from $TORCH_LOGS ("-torch": ERROR), overriding any level set
    # earlier; when it is imported already, the level is set directly. A user's own TORCH_LOGS wins.
    if "torch" in sys.modules:
        if "TORCH_LOGS" not in os.environ:
            logging.getLogger("torch").setLevel(logging.ERROR)
    else:
        os.environ.setdefault("TORCH_LOGS", "-torch")
    # FutureWarning and DeprecationWarning are for the developers who call an API; torchat raises neither.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)


@contextlib.contextmanager
def native_log_lines() -> Iterator[None]:
    """Around a call into ExecuTorch's runtime that logs: its log lines are dropped unless verbose.

    Both `sys.stderr` (where the pybindings write) and file descriptor 2 (where C++ code without them writes) are
    captured for the block; whatever else arrived there is written to stderr afterwards, in order per stream.
    """
    if not _quiet:
        yield
        return
    sys.stderr.flush()
    saved_fd = os.dup(2)
    python_side = io.StringIO()
    try:
        with tempfile.TemporaryFile() as native_side:
            os.dup2(native_side.fileno(), 2)
            try:
                with contextlib.redirect_stderr(python_side):
                    yield
            finally:
                os.dup2(saved_fd, 2)
                native_side.seek(0)
                captured = native_side.read().decode("utf-8", errors="replace") + python_side.getvalue()
                kept = [line for line in captured.splitlines(keepends=True) if not ET_LOG_LINE.match(line)]
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
    finally:
        os.close(saved_fd)
