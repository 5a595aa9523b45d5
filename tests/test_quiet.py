"""torchat.quiet: with quiet_libraries(verbose=False) a process that imports torchao and loads the .pte runtime
writes nothing to stderr; with verbose=True the same process shows torchao's "Failed to load" lines (where its
CUDA-only extensions cannot load), torch's logging, ExecuTorch's log lines and Python warnings."""

import json
import os
import subprocess
import sys

import pytest

from torchat import quiet

# What `torchat generate --pte-path` did before the answer, in the order the CLI does it: quiet first, then the
# heavy imports (torchao is what the quantizers import), the ExecuTorch runtime with its kernels and thread pool.
SCRIPT = """
import json, sys, warnings
from pathlib import Path
from torchat.quiet import quiet_libraries
quiet_libraries(verbose=sys.argv[1] == "verbose")
import torch, torchao
from torchat.kernels import load_pte_runtime
from torchat.threads import set_pte_pool_size
load_pte_runtime()
set_pte_pool_size(1)
warnings.warn("a library's FutureWarning", FutureWarning)
extensions = sorted(str(p) for p in Path(torchao.__file__).parent.glob("_C*.so"))
print(json.dumps({"unloaded": [p for p in extensions if p not in torch.ops.loaded_libraries]}))
"""


def run_script(mode: str) -> tuple[dict, str]:
    env = {key: value for key, value in os.environ.items() if key != "TORCH_LOGS"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1]), result.stderr


@pytest.fixture(scope="module")
def verbose_run() -> tuple[dict, str]:
    return run_script("verbose")


def test_quiet_process_writes_nothing_to_stderr(verbose_run):
    _, stderr = run_script("quiet")
    assert stderr == ""
    assert verbose_run[1].strip()  # the same process shows what it hid when verbose (the test below says what)


def test_verbose_process_shows_the_libraries(verbose_run):
    info, stderr = verbose_run
    assert "[cpuinfo_utils.cpp:" in stderr  # ExecuTorch's thread pool, when it starts
    assert "Resetting threadpool to 1 threads." in stderr
    assert "FutureWarning: a library's FutureWarning" in stderr
    for extension in info["unloaded"]:  # torchao's CUDA-only extensions, on a machine where they cannot load
        assert f"Failed to load {extension}" in stderr


def test_native_log_lines_keeps_what_is_not_executorchs(monkeypatch, capfd):
    monkeypatch.setattr(quiet, "_quiet", True)
    with quiet.native_log_lines():
        print("[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version", file=sys.stderr)
        print("a warning from elsewhere", file=sys.stderr)
        os.write(2, b"I 00:00:00.091045 executorch:cpuinfo_utils.cpp:71] Reading file x\n")
        os.write(2, b"E 00:00:00.091045 executorch:program.cpp:9] Invalid magic\n")
    assert capfd.readouterr().err.splitlines() == [
        "E 00:00:00.091045 executorch:program.cpp:9] Invalid magic", "a warning from elsewhere"]


def test_native_log_lines_change_nothing_without_quiet_libraries(monkeypatch, capfd):
    monkeypatch.setattr(quiet, "_quiet", False)  # a library user's process, which never calls quiet_libraries
    with quiet.native_log_lines():
        print("[cpuinfo_utils.cpp:71] Reading file", file=sys.stderr)
    assert capfd.readouterr().err == "[cpuinfo_utils.cpp:71] Reading file\n"


def test_a_users_torch_logs_stands():
    code = ("import os; from torchat.quiet import quiet_libraries; quiet_libraries(False); "
            "print(os.environ['TORCH_LOGS'])")
    for preset, want in (({"TORCH_LOGS": "+dynamo"}, "+dynamo"), ({}, "-torch")):
        env = {**{k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}, **preset}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert result.stdout.strip() == want
