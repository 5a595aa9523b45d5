"""Phi-3's sentencepiece-style GGUF vocabulary against llama.cpp's own tokenizations of it.

The reference is independent of torchat: llama.cpp's test files `ggml-vocab-phi-3.gguf.inp` (inputs separated by
`\\n__ggml_vocab_test__\\n`) and `.out` (one line of ids per input), which its tests/test-tokenizer-0.cpp checks
with `common_tokenize(ctx, text, add_special=false, parse_special=false)`: no BOS, special spellings as text.

The file types `<unk>` CONTROL and 53 `[PAD32011]`... tokens UNKNOWN; sentencepiece wants exactly one UNKNOWN
piece and refused it ("unk is already defined") until the loader retyped them as llama.cpp treats them.

The tokenizer loader reads the key-value section itself (read_gguf_metadata) rather than through gguf.GGUFReader,
which takes seconds on a vocabulary; the last tests check it against the `gguf` package on this file and SmolLM2's.
"""

from pathlib import Path

import pytest

from torchat.assets import fetch_asset
from torchat.errors import TorchatError
from torchat.tokenizers import load_tokenizer
from torchat.tokenizers.gguf import (CONTROL, UNKNOWN, load_gguf_tokenizer, read_gguf, read_gguf_metadata,
                                     sentencepiece_types)

SEPARATOR = "\n__ggml_vocab_test__\n"


def read_reference(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """(input, ids) pairs, split as test-tokenizer-0.cpp splits them."""
    texts = inp.read_text(encoding="utf-8").split(SEPARATOR)
    assert texts[-1] == "", texts[-1]  # the file ends with a separator, after which the C++ reader stops
    ids = [[int(token) for token in line.split()] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(texts) - 1 == len(ids), (len(texts), len(ids))
    return list(zip(texts[:-1], ids))


@pytest.fixture(scope="module")
def phi3_gguf() -> Path:
    return fetch_asset("phi3-vocab-gguf")


@pytest.fixture(scope="module")
def phi3_tokenizer(phi3_gguf):
    return load_gguf_tokenizer(phi3_gguf)


@pytest.fixture(scope="module")
def phi3_reference() -> list[tuple[str, list[int]]]:
    return read_reference(fetch_asset("phi3-vocab-inp"), fetch_asset("phi3-vocab-out"))


def test_the_file_has_many_unknown_tokens_and_a_control_unk(phi3_gguf):
    """What made sentencepiece refuse it; if a new file version fixes this, the test below proves less."""
    fields = read_gguf(phi3_gguf).fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert fields["tokenizer.ggml.unknown_token_id"].contents() == 0 and types[0] == CONTROL
    assert [i for i, kind in enumerate(types) if kind == UNKNOWN] == list(range(32011, 32064))


def test_loads_with_the_file_metadata(phi3_gguf, phi3_tokenizer):
    tokenizer = phi3_tokenizer
    assert load_tokenizer(phi3_gguf).kind == tokenizer.kind == "gguf"
    assert tokenizer.vocab_size == 32064
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos) == (1, 32000, True)
    assert tokenizer.stop_ids == {32000, 32007}  # EOS and `<|end|>`
    assert tokenizer.special_tokens["<|user|>"] == 32010 and tokenizer.special_tokens["[PAD32011]"] == 32011


def test_encode_matches_llama_cpp(phi3_tokenizer, phi3_reference):
    assert len(phi3_reference) == 46
    for text, ids in phi3_reference:
        assert phi3_tokenizer.encode(text) == ids, text


def test_decode_gives_back_every_input(phi3_tokenizer, phi3_reference):
    """Decoding llama.cpp's ids gives the input again, in all 46 cases: the leading `▁` that the space prefix
    added is dropped, byte-fallback tokens (emoji, Khmer) join into their characters."""
    for text, ids in phi3_reference:
        assert phi3_tokenizer.decode(ids) == text, ids


def test_retyped_tokens_behave_as_in_llama_cpp(phi3_tokenizer):
    """llama.cpp neither decodes UNKNOWN- nor CONTROL-typed tokens nor matches them in plain text; with special
    tokens allowed it matches both kinds' spellings."""
    tokenizer = phi3_tokenizer
    assert tokenizer.decode([15043, 32011, 32063, 32007, 3186]) == "Hello world"
    assert 32011 not in tokenizer.encode("[PAD32011]")
    assert tokenizer.encode("<|user|>\nHi[PAD32011]", allow_special=True) == [32010, 29871, 13, 18567, 32011]


def test_sentencepiece_types_keep_one_unknown():
    assert sentencepiece_types([CONTROL, 1, UNKNOWN, UNKNOWN], unk_id=0) == [UNKNOWN, 1, CONTROL, CONTROL]
    assert sentencepiece_types([UNKNOWN, 1, 6], unk_id=0) == [UNKNOWN, 1, 6]  # the usual file: unchanged
    assert sentencepiece_types([1, UNKNOWN, UNKNOWN], unk_id=None) == [1, UNKNOWN, CONTROL]


@pytest.mark.parametrize("asset", ["phi3-vocab-gguf", "smollm2-135m-gguf"])
def test_metadata_reader_agrees_with_the_gguf_package(asset):
    path = fetch_asset(asset)
    reference = {key: field.contents() for key, field in read_gguf(path).fields.items()
                 if not key.startswith("GGUF.")}  # the reader's own header fields
    ours = read_gguf_metadata(path)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert ours[key] == value and type(ours[key]) is type(value), key


def test_a_truncated_vocabulary_is_not_readable(phi3_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(phi3_gguf.read_bytes()[:300_000])  # inside the tokens array
    with pytest.raises(TorchatError, match="not a readable GGUF file") as error:
        load_gguf_tokenizer(cut)
    assert str(cut) in str(error.value)
