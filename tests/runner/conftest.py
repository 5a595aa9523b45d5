"""Fixtures for the C++ runner tests: the binaries (built once per source digest under $TORCHAT_CACHE by the same
function `doit runner:BACKEND` runs) and tokenizer.bin files. The tiny model with SmolLM2's vocabulary and its
.pt2, .so and .pte are the shared ones (tests/conftest.py)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from runner_fixtures import runner_for, write_tokenizer_bin  # noqa: F401 (runner_for: test_runner_output's import)

from torchat import spec, store
from torchat.runner_build import build_runner
from torchat.sources import cache_dir


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


@pytest.fixture(scope="session")
def tokenizer_bins(tmp_path_factory, smollm2_gguf, llama3_tiktoken, mistral_sentencepiece) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tokenizer-bin")
    sources = {"smollm2": smollm2_gguf, "llama3": llama3_tiktoken, "mistral": mistral_sentencepiece}
    return {name: write_tokenizer_bin(path, directory / f"{name}.bin") for name, path in sources.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer_bin(tmp_path_factory, tiny_checkpoint) -> Path:
    return write_tokenizer_bin(tiny_checkpoint / "tokenizer.gguf",
                               tmp_path_factory.mktemp("tiny-tok") / "tokenizer.bin")
