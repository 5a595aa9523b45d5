"""Our GGUF pre-tokenizers (llama.cpp's regexes as `tokenizers` Split steps) against the splits their models'
own tooling makes, compared as character spans: Meta's Llama-3 pattern and OpenAI's GPT-2 pattern run by the
`regex` package (another engine than the `tokenizers` library's Oniguruma), and SmolLM2's tokenizer.json
pre-tokenizer (Digits then ByteLevel) run by `tokenizers`."""

from pathlib import Path

import pytest
from tokenizers import pre_tokenizers

from torchat.errors import TorchatError
from torchat.tokenizers.gguf import PRE_TOKENIZERS, build_pre_tokenizer

regex = pytest.importorskip("regex")

# The pattern of OpenAI's GPT-2 encoder.py (also the one `tokenizers`' ByteLevel uses with use_regex=True).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def spans(pre_tokenizer, text: str) -> list[tuple[int, int]]:
    return [offsets for _, offsets in pre_tokenizer.pre_tokenize_str(text)]


def regex_spans(pattern: str, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in regex.finditer(pattern, text)]


@pytest.fixture(scope="module")
def llama3_pattern(llama3_reference_py) -> str:
    import ast
    tree = ast.parse(llama3_reference_py.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Tokenizer")
    return next(ast.literal_eval(n.value) for n in cls.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "pat_str")


@pytest.mark.parametrize("pre", ["llama3", "llama-bpe", "llama-v3"])
def test_llama3_split_matches_meta_pattern(pre, llama3_pattern, mixed_lines):
    ours = build_pre_tokenizer(pre, Path("model.gguf"))
    for line in mixed_lines:
        assert spans(ours, line) == regex_spans(llama3_pattern, line), line


@pytest.mark.parametrize("pre", ["gpt-2", "gpt2"])
def test_gpt2_split_matches_openai_pattern(pre, mixed_lines):
    ours = build_pre_tokenizer(pre, Path("model.gguf"))
    for line in mixed_lines:
        assert spans(ours, line) == regex_spans(GPT2_PATTERN, line), line


@pytest.mark.parametrize("pre", ["smollm", "starcoder"])
def test_smollm_split_matches_its_tokenizer_json(pre, mixed_lines):
    ours = build_pre_tokenizer(pre, Path("model.gguf"))
    reference = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for line in mixed_lines:
        assert ours.pre_tokenize_str(line) == reference.pre_tokenize_str(line), line


def test_every_supported_pre_builds_and_unknown_lists_them():
    for pre in PRE_TOKENIZERS:
        assert build_pre_tokenizer(pre, Path("m.gguf")).pre_tokenize_str("a  12 b")
    with pytest.raises(TorchatError, match="m.gguf.*'no-such'.*supported: default, gpt-2"):
        build_pre_tokenizer("no-such", Path("m.gguf"))
