"""Our Llama-3 tiktoken kind against a tiktoken.Encoding built the way Meta's llama_models builds it, with the
pattern and special tokens read out of llama_models/llama3/tokenizer.py itself (not from our constants)."""

import ast
from types import SimpleNamespace

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from torchat.tokenizers import load_tokenizer


def read_reference_definitions(source: str) -> tuple[str, list[str]]:
    """(pat_str, special tokens in id order) as the reference file's Tokenizer class defines them."""
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Tokenizer")
    attrs = {t.id: ast.literal_eval(n.value) for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
             and n.value is not None for t in (n.targets if isinstance(n, ast.Assign) else [n.target])}
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assigns = {n.targets[0].id: n.value for n in init.body
               if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}
    named = ast.literal_eval(next(n.value for n in init.body if isinstance(n, ast.Assign)
                                  and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "special_tokens"
                                  and isinstance(n.value, ast.List)))
    scope = {"self": SimpleNamespace(**attrs), "special_tokens": named, "range": range, "len": len}
    reserved = eval(compile(ast.Expression(assigns["reserved_tokens"]), "tokenizer.py", "eval"), scope)
    return attrs["pat_str"], named + reserved


@pytest.fixture(scope="module")
def reference(llama3_tiktoken, llama3_reference_py) -> tiktoken.Encoding:
    pat_str, names = read_reference_definitions(llama3_reference_py.read_text())
    ranks = load_tiktoken_bpe(str(llama3_tiktoken))
    return tiktoken.Encoding(name="llama3", pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens={name: len(ranks) + i for i, name in enumerate(names)})


@pytest.fixture(scope="module")
def ours(llama3_tiktoken):
    return load_tokenizer(llama3_tiktoken)


def test_ids_match_reference(ours, reference, mixed_lines):
    assert ours.kind == "tiktoken"
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ids == reference.encode(line, disallowed_special=()), line
        assert ours.decode(ids) == line
        assert b"".join(ours.token_bytes(i) for i in ids) == line.encode("utf-8")
    template = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi 123<|eot_id|>"
    assert ours.encode(template, allow_special=True) == reference.encode(template, allowed_special="all")


def test_special_tokens(ours, reference):
    assert ours.special_tokens == reference._special_tokens
    assert len(ours.special_tokens) == 256 and ours.vocab_size == reference.n_vocab == 128256
    assert (ours.bos_id, ours.eos_id) == (128000, 128001)
    specials = ours.special_tokens
    assert specials["<|start_header_id|>"] == 128006 and specials["<|end_header_id|>"] == 128007
    assert specials["<|eom_id|>"] == 128008 and specials["<|eot_id|>"] == 128009
    assert specials["<|reserved_special_token_245|>"] == 128255
    assert ours.stop_ids == {128001, 128008, 128009}
    assert ours.encode("Hi", bos=True) == [128000, *reference.encode("Hi")]
    # Typed special spellings are text; decode drops special ids.
    typed = ours.encode("<|eot_id|>")
    assert 128009 not in typed and ours.decode(typed) == "<|eot_id|>"
    assert ours.decode([128000, *reference.encode("Hi"), 128009]) == "Hi"
    assert ours.token_bytes(128009) == b"<|eot_id|>"
