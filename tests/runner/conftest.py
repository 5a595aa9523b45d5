"""Fixtures for the C++ runner tests: the binaries (built once per source digest under $TORCHAT_CACHE by the same
function `doit runner:BACKEND` runs), tokenizer.bin files, and a tiny model with SmolLM2's vocabulary exported to
.pt2, .so and .pte (cached by content, see runner_fixtures)."""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from runner_fixtures import TINY_ARGS, TINY_MAX_SEQ_LEN, cached_export, tiny_checkpoint, write_tokenizer_bin  # noqa: E402

from torchat import spec, store  # noqa: E402
from torchat.runner_build import build_runner  # noqa: E402
from torchat.sources import cache_dir  # noqa: E402


def runner_cache_key(backend: str) -> str:
    """The runner step's store key (sources, torch/executorch, compiler, cmake); for the bare tokenizer tool,
    the same inputs less the wheels."""
    if backend == "tokenize":
        preimage = {"code": store.code_digests(("runner",)), "native": spec.native_toolchain()}
        return store.sha256_json(preimage)
    return store.node_key(spec.load_catalog().runner_node(spec.Backend(backend)))


def cached_runner(backend: str) -> Path:
    """The directory holding the backend's binaries (run, tokenize), built when its key is not cached yet."""
    key = runner_cache_key(backend)
    final = cache_dir() / "runners" / f"{key[:16]}-{backend}"
    if not (final / ".complete").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        try:
            build_runner(backend, tmp)
            (tmp / ".complete").write_text(key + "\n")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def tokenize_tool() -> Path:
    return cached_runner("tokenize") / "tokenize"


@pytest.fixture(scope="session")
def runner_aoti() -> Path:
    return cached_runner("aoti") / "run"


@pytest.fixture(scope="session")
def runner_et() -> Path:
    return cached_runner("et") / "run"


def runner_for(request, suffix: str) -> Path:
    """The runner binary for an artifact suffix, built on first use (a test of .pte never builds runner-aoti)."""
    return request.getfixturevalue("runner_et" if suffix == ".pte" else "runner_aoti")


@pytest.fixture(scope="session")
def tokenizer_bins(tmp_path_factory, smollm2_gguf, llama3_tiktoken, mistral_sentencepiece) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tokenizer-bin")
    sources = {"smollm2": smollm2_gguf, "llama3": llama3_tiktoken, "mistral": mistral_sentencepiece}
    return {name: write_tokenizer_bin(path, directory / f"{name}.bin") for name, path in sources.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory, smollm2_gguf) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny-smollm-vocab"), smollm2_gguf)


def tiny_export(checkpoint: Path, suffix: str, quant: dict | None = None) -> Path:
    extra = ["--max-seq-length", str(TINY_MAX_SEQ_LEN)] + (["--quant", json.dumps(quant)] if quant else [])
    what = {"args": TINY_ARGS, "seed": 0, "quant": quant}
    name = "tiny" + ("-" + hashlib.sha256(json.dumps(quant).encode()).hexdigest()[:8] if quant else "")
    return cached_export(name, what, ["--checkpoint-dir", str(checkpoint)], suffix, extra)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint_dir) -> dict:
    """suffix -> a function that exports (once, cached) the tiny model to that suffix."""
    return {suffix: (lambda s=suffix: tiny_export(tiny_checkpoint_dir, s)) for suffix in (".pt2", ".so", ".pte")}


@pytest.fixture(scope="session")
def tiny_tokenizer_bin(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    return write_tokenizer_bin(tiny_checkpoint_dir / "tokenizer.gguf",
                               tmp_path_factory.mktemp("tiny-tok") / "tokenizer.bin")
