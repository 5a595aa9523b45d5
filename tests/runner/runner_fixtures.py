"""Helpers for the C++ runner tests: exported artifacts cached by content, the runner binaries, Python references.

An AOTI compile or ExecuTorch lowering costs 15-60 s here, so exported artifacts are cached under
$TORCHAT_CACHE/test-artifacts/<key>/ where the key hashes what made them: the model (its arguments and the seed, or
the checkpoint's sha256), the export flags, the torchat code that exports, and the toolchain versions. CI reruns
then export nothing; a change to the lowering code exports again.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from torchat.cli import main
from torchat.sources import cache_dir
from torchat.store import code_digests, toolchain_versions

EXPORT_CODE = ("torchat/lowering", "torchat/quant", "torchat/model.py", "torchat/exported.py",
               "torchat/export_cli.py", "torchat/loader.py", "torchat/checkpoint", "torchat/tokenizers",
               "torchat/convert.py")
# a model with SmolLM2's vocabulary (and its BPE tokenizer and ChatML), small enough to export in seconds
TINY_ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=160, max_seq_len=256)
TINY_MAX_SEQ_LEN = 96


def artifact_key(what: dict) -> str:
    preimage = {"what": what, "code": code_digests(EXPORT_CODE),
                "toolchain": toolchain_versions(("torch", "torchao", "executorch"))}
    return hashlib.sha256(json.dumps(preimage, sort_keys=True).encode()).hexdigest()[:16]


def cached_export(name: str, what: dict, source_args: list[str], suffix: str, extra: list[str]) -> Path:
    """`torchat export SOURCE_ARGS --output-path <cache>/model.SUFFIX EXTRA`, once per key; its tokenizer beside."""
    key = artifact_key({"name": name, **what, "suffix": suffix, "extra": extra})
    final = cache_dir() / "test-artifacts" / f"{key}-{name}"
    if not (final / ".complete").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        try:
            rc = main(["export", *source_args, "--output-path", str(tmp / f"model{suffix}"), *extra])
            assert rc == 0, f"export of {name} failed"
            (tmp / ".complete").write_text("")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / f"model{suffix}"


def tiny_checkpoint(directory: Path, smollm2_gguf: Path) -> Path:
    """A random model with SmolLM2's vocabulary as a canonical checkpoint, with SmolLM2's tokenizer.gguf."""
    from torchat.checkpoint.base import Checkpoint
    from torchat.checkpoint.canonical import write_canonical
    from torchat.convert import write_tokenizer_gguf
    from torchat.model import ModelArgs, Transformer

    if (directory / "tokenizer.gguf").is_file():
        return directory
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    with torch.no_grad():
        for parameter in model.parameters():  # larger than the default init, so that logits spread
            parameter.normal_(0, 0.3)
    write_canonical(Checkpoint(dict(model.state_dict()), model.args, {}), directory)
    write_tokenizer_gguf(smollm2_gguf, directory / "tokenizer.gguf")
    return directory


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
    """What `torchat generate --*-path ARTIFACT` generates greedily: the Python loader's ids."""
    from torchat.exported import load_exported
    from torchat.generate import Sampling, generate

    model = load_exported(artifact)
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    return list(generate(model, ids, steps, Sampling(), tokenizer.stop_ids))
