"""A missing, unreadable or unsupported tokenizer is a one-line TorchatError that names the file and the fix."""

import gguf
import pytest

from torchat.errors import TorchatError
from torchat.tokenizers import TOKENIZERS, detect_tokenizer_kind, load_tokenizer


def raises_one_line(match: str, *args, **kwargs) -> str:
    with pytest.raises(TorchatError, match=match) as info:
        load_tokenizer(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def write_gguf(path, model: str | None, pre: str = "gpt2"):
    writer = gguf.GGUFWriter(path, arch="llama")
    if model is not None:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(["a", "b", "ab", "<|end|>"])
        writer.add_token_types([1, 1, 1, 3])
        writer.add_token_merges(["a b"])
        writer.add_eos_token_id(3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_file(tmp_path):
    message = raises_one_line("no such tokenizer file", tmp_path / "nope.model")
    assert str(tmp_path / "nope.model") in message and "--tokenizer-path" in message


def test_garbage_file_is_not_detected(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x00\x01garbage\xff" * 10)
    message = raises_one_line("not a tokenizer torchat knows", path)
    assert str(path) in message and "--tokenizer-path" in message
    assert ", ".join(sorted(TOKENIZERS)) in message


@pytest.mark.parametrize("kind, match", [("sentencepiece", "not a sentencepiece model"),
                                         ("tiktoken", "not a tiktoken ranks line"),
                                         ("hf", "not a Hugging Face tokenizer.json"),
                                         ("gguf", "not a readable GGUF file")])
def test_garbage_file_with_kind(tmp_path, kind, match):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(b"\x0a\x05hello world\n{\x00\xff")
    assert str(path) in raises_one_line(match, path, kind=kind)


def test_unknown_kind(tmp_path):
    message = raises_one_line("unknown tokenizer kind 'bpe'", tmp_path, kind="bpe")
    assert ", ".join(sorted(TOKENIZERS)) in message


def test_directory_without_tokenizer(tmp_path):
    assert str(tmp_path) in raises_one_line("no tokenizer.model, tokenizer.json or .gguf", tmp_path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00\x10")
    assert detect_tokenizer_kind(path) == "gguf"
    assert str(path) in raises_one_line("not a readable GGUF file", path)


def test_gguf_unknown_pre_tokenizer_lists_supported(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "gpt2", pre="no-such-pre")
    message = raises_one_line("unsupported GGUF pre-tokenizer", path)
    assert str(path) in message and "'no-such-pre'" in message and "smollm" in message and "llama-bpe" in message


def test_gguf_unknown_vocabulary_kind(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "rwkv")
    assert "choose one of: gpt2, llama" in raises_one_line("unknown GGUF tokenizer.ggml.model 'rwkv'", path)


def test_gguf_without_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "weights.gguf", None)
    assert str(path) in raises_one_line("carries no tokenizer", path)


def test_tiny_gguf_bpe_loads(tmp_path):
    # The same writer with a supported pre gives a working tokenizer, so the failures above are the pre's.
    tok = load_tokenizer(write_gguf(tmp_path / "model.gguf", "gpt2", pre="gpt2"))
    assert tok.encode("ab<|end|>", allow_special=True) == [2, 3] and tok.stop_ids == {3}
