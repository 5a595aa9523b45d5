"""Fixtures for the tokenizer tests: the references' own definitions, the SmolLM2 GGUF opened once, test text."""

from pathlib import Path

import gguf
import pytest

from torchat.sources import fetch_source
from torchat.tokenizers.gguf import load_gguf_tokenizer

# Meta's llama_models/llama3/tokenizer.py, from the same wheel as the tokenizer.model asset: the reference test
# takes the pattern and the special tokens from it rather than from our own constants.
LLAMA3_REFERENCE_SOURCE = "pypi:llama-models==0.3.0#llama_models/llama3/tokenizer.py"
LLAMA3_REFERENCE_SHA256 = "03651bf842642adf7ae2fcb5afe4cd211c7fdb23180babc42a9c635d4bc8fc11"
LLAMA_MODELS_WHEEL_SHA256 = "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"

# Lines that stress pre-tokenizers: digits (alone, in runs, after runs of spaces), punctuation, contractions,
# whitespace runs, tabs and newlines, accents, CJK, emoji (4-byte and ZWJ sequences), special-token spellings.
TRICKY_LINES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a  1", "x\n 1", "x \n1", "3.14159 and 1,000,000", "2024-11-28",
    "Call 555-0123 or +1 (800) 123 4567.", "  12   345    6789  ", "version 0.2.3rc1, id=0x1F", "100%   sure",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'D SAY IT'S OK", "Hello,  World!!!  ???",
    "multiple   internal    spaces\tand\ttabs", "tabs\tand\nnewlines\r\nmixed\r\r\n", "trailing spaces   ",
    "   leading spaces", "def foo(x):\n    return x ** 2  # square\n", "if (a<=b && c!=d) { x += 1; }",
    "Café naïve résumé façade Ångström", "e\u0301 combining accent", "你好，世界！这是一个测试。", "日本語のテキスト",
    "한국어 텍스트입니다", "Россия и Україна 2022", "مرحبا بالعالم ١٢٣", "हिन्दी १२३", "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "👨‍👩‍👧‍👦 family", "math: x² + y³ = z½ ⅓ Ⅻ", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "<s> </s> <unk>",
    "<|begin_of_text|><|eot_id|>", "\u00a0non-breaking\u2009thin\u3000ideographic", "zero\u200bwidth",
    "'s 's 'S 'Ll", "...---...", "$$$ €€€ £12.50", "a" * 200, "1" * 50, " " * 30 + "x",
]


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
