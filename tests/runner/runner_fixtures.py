"""Helpers for the C++ runner tests: tokenizer.bin files, running a runner binary, and the Python reference for it.
The tiny model and its exports are the shared ones (tests/conftest.py)."""

import subprocess
from pathlib import Path

from torchat.cli import main


def runner_for(request, suffix: str) -> Path:
    """The runner binary for an artifact suffix, built on first use (a test of .pte never builds runner-aoti)."""
    return request.getfixturevalue("runner_et" if suffix == ".pte" else "runner_aoti")


def write_tokenizer_bin(tokenizer_path: Path, output: Path) -> Path:
    assert main(["tokenizer-bin", "--tokenizer-path", str(tokenizer_path), "--output", str(output)]) == 0
    return output


def run_runner(binary: Path, model: Path, tokenizer_bin: Path, *args: str, stdin: str | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(model), "-z", str(tokenizer_bin), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def runner_ids(binary: Path, model: Path, tokenizer_bin: Path, *args: str, stdin: str | None = None) -> list:
    """Each answer's generated ids (`-o ids`): one list per line of output."""
    result = run_runner(binary, model, tokenizer_bin, "-o", "ids", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return [[int(x) for x in line.split()] for line in result.stdout.splitlines()]


def python_greedy(artifact: Path, tokenizer, prompt: str, steps: int) -> list[int]:
    """What `torchat generate ARTIFACT` generates greedily: the Python loader's ids."""
    from torchat.exported import load_exported
    from torchat.generate import Sampling, generate

    model = load_exported(artifact)
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    return list(generate(model, ids, steps, Sampling(), tokenizer.stop_ids))
