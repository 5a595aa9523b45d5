"""The hf kind (tokenizer.json + tokenizer_config.json) on SmolLM2's tokenizer as Hugging Face ships it: the
tokenizer.json pipeline (Digits then ByteLevel over the GGUF's vocabulary and merges) saved to a directory, with
the tokenizer_config.json fields SmolLM2-Instruct has; compared with the GGUF kind and the library's own encode."""

import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from torchat.errors import TorchatError
from torchat.tokenizers import StreamDecoder, detect_tokenizer_kind, load_tokenizer
from torchat.tokenizers.gguf import CONTROL

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory, smollm2_reader):
    fields = smollm2_reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    directory = tmp_path_factory.mktemp("smollm2-hf")
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
              "chat_template": TEMPLATE, "add_prefix_space": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_matches_gguf_kind_and_library(smollm2_dir, smollm2_tokenizer, mixed_lines):
    assert detect_tokenizer_kind(smollm2_dir / "tokenizer.json") == "hf"
    ours = load_tokenizer(smollm2_dir)
    library = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert ours.kind == "hf" and ours.vocab_size == smollm2_tokenizer.vocab_size == 49152
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ids == smollm2_tokenizer.encode(line), line
        assert ours.encode(line, allow_special=True) == library.encode(line, add_special_tokens=False).ids, line
        assert ours.decode(ids) == line


def test_reads_tokenizer_config(smollm2_dir):
    ours = load_tokenizer(smollm2_dir / "tokenizer.json")
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert not ours.add_bos  # tokenizer.json's post-processor adds nothing
    assert ours.chat_template == TEMPLATE
    assert ours.stop_ids == {0, 2}
    assert ours.encode("hi", bos=True, eos=True) == [1, *ours.encode("hi"), 2]
    assert ours.special_tokens["<|im_end|>"] == 2 and ours.token_bytes(2) == b"<|im_end|>"
    assert ours.decode([1, *ours.encode("hi"), 2]) == "hi"


def test_without_config_has_no_template_and_guesses_eos(tmp_path, smollm2_dir):
    (tmp_path / "tokenizer.json").write_bytes((smollm2_dir / "tokenizer.json").read_bytes())
    ours = load_tokenizer(tmp_path)
    assert ours.chat_template is None
    assert ours.bos_id is None and ours.eos_id == 0  # `<|endoftext|>`, the usual spelling
    with pytest.raises(TorchatError, match="no BOS token"):
        ours.encode("hi", bos=True)


def test_stream_decoder_on_byte_level_text(smollm2_dir, tricky_lines):
    ours = load_tokenizer(smollm2_dir)
    text = "\n".join(tricky_lines)
    ids = ours.encode(text)
    stream = StreamDecoder(ours)
    chunks = [stream.add(i) for i in ids]
    assert "".join(chunks) + stream.flush() == text
    assert "" in chunks and not any("\ufffd" in c for c in chunks)  # split characters were held back
