"""Fixtures for the tokenizer tests: the references' own definitions, the SmolLM2 GGUF opened once, test text."""

from pathlib import Path

import gguf
import pytest
from tokenizer_lines import TRICKY_LINES

from torchat.sources import fetch_source
from torchat.tokenizers.gguf import load_gguf_tokenizer

# Meta's llama_models/llama3/tokenizer.py, from the same wheel as the tokenizer.model asset: the reference test
# takes the pattern and the special tokens from it rather than from our own constants.
LLAMA3_REFERENCE_SOURCE = "pypi:llama-models==0.3.0#llama_models/llama3/tokenizer.py"
LLAMA3_REFERENCE_SHA256 = "03651bf842642adf7ae2fcb5afe4cd211c7fdb23180babc42a9c635d4bc8fc11"
LLAMA_MODELS_WHEEL_SHA256 = "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"


@pytest.fixture(scope="session")
def llama3_reference_py() -> Path:
    return fetch_source(LLAMA3_REFERENCE_SOURCE, LLAMA3_REFERENCE_SHA256, archive_sha256=LLAMA_MODELS_WHEEL_SHA256)


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    """The SmolLM2 GGUF, opened once: reading its metadata takes seconds."""
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path, smollm2_reader: gguf.GGUFReader):
    return load_gguf_tokenizer(smollm2_gguf, reader=smollm2_reader)


@pytest.fixture(scope="session")
def tricky_lines() -> list[str]:
    return list(TRICKY_LINES)


@pytest.fixture(scope="session")
def mixed_lines(english_lines: list[str]) -> list[str]:
    """The English lines, a third of them with numbers after runs of spaces, then the tricky lines."""
    numbered = [f"{line}  {i}  {i * 37 % 1000}\n" if i % 3 == 0 else line for i, line in enumerate(english_lines)]
    return numbered + TRICKY_LINES
