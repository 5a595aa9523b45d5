"""The tokenizer inside a GGUF against independent references.

SmolLM2 (byte-level BPE, pre-tokenizer "smollm"): the reference is the pipeline SmolLM2's own tokenizer.json
states (`Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]`, BPE without
unk or byte fallback, ByteLevel decoder), built with the `tokenizers` library from the GGUF's tokens and merges.
Ours gets there differently: llama.cpp's regex list for "smollm" (`\\p{N}`, then GPT-2's) as Split steps.

transformers' GGUF loader (5.24) is no full reference here: it has no entry for pre="smollm", so it keeps GPT-2's
ByteLevel split without the digit split. The two agree except where a run of two or more whitespace characters
comes before a digit ("a  1": SmolLM2 gives a, ĠĠ, 1; transformers a, Ġ, Ġ, 1), or one space before a non-ASCII
number (" ١٢٣": `Ġ` merges with the first byte of `١` unless the digit is split off first); the tests below pin
both facts.

"llama" vocabulary: Mistral's sentencepiece model written into a GGUF the way llama.cpp's converter writes it,
loaded through our GGUF kind, against sentencepiece on the original model file.
"""

import gguf
import pytest
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from torchat.tokenizers import StreamDecoder, detect_tokenizer_kind, load_tokenizer
from torchat.tokenizers.gguf import CONTROL, build_sentencepiece_proto



def digit_split_matters(line: str) -> bool:
    """Whether SmolLM2's digit-first split can change this line's tokens against GPT-2's split alone: a number
    character after a whitespace run, or after one space when it is not an ASCII digit (then `Ġ` can merge with
    its first byte, as in "ĠÙ" for Arabic-Indic digits; `Ġ` never merges with an ASCII digit in this vocabulary)."""
    return any(c.isnumeric() and i > 0 and line[i - 1].isspace() and (c not in "0123456789" or (
        i > 1 and line[i - 2].isspace())) for i, c in enumerate(line))


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_reader) -> tokenizers.Tokenizer:
    """SmolLM2's tokenizer.json pipeline, as Hugging Face publishes it, over the GGUF's vocabulary."""
    fields = smollm2_reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    reference = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    reference.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    reference.decoder = decoders.ByteLevel()
    reference.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    return reference


def test_smollm2_matches_its_tokenizer_json_pipeline(smollm2_tokenizer, smollm2_reference, mixed_lines):
    ours, reference = smollm2_tokenizer, smollm2_reference
    reference.encode_special_tokens = True  # typed special spellings are text, as in our plain encode
    assert ours.kind == "gguf" and ours.vocab_size == 49152
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ids == reference.encode(line, add_special_tokens=False).ids, line
        assert ours.decode(ids) == line, line
        assert b"".join(ours.token_bytes(i) for i in ids) == line.encode("utf-8"), line
    reference.encode_special_tokens = False
    chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n12  apples?<|im_end|>\n<|im_start|>assistant\n"
    assert ours.encode(chat, allow_special=True) == reference.encode(chat, add_special_tokens=False).ids


def test_smollm2_known_tokenizations(smollm2_tokenizer):
    ours = smollm2_tokenizer

    def pieces(text, **kw):
        return [ours.id_to_piece(i) for i in ours.encode(text, **kw)]

    # The vocabulary has single digits only, and digits are split off before GPT-2's regex: the whitespace run
    # in front of a number stays one piece.
    assert pieces("2024") == ["2", "0", "2", "4"]
    assert pieces("a  1") == ["a", "ĠĠ", "1"]
    assert pieces("x\n 1") == ["x", "ĊĠ", "1"]
    assert pieces("Hello world") == ["Hello", "Ġworld"]
    assert ours.encode("<|im_start|>user\nHi<|im_end|>", allow_special=True)[::4] == [1, 2]
    assert 1 not in ours.encode("<|im_start|>")


def test_smollm2_metadata(smollm2_tokenizer):
    ours = smollm2_tokenizer
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)
    assert ours.special_tokens["<|im_start|>"] == 1 and ours.special_tokens["<|im_end|>"] == 2
    assert len(ours.special_tokens) == 17
    assert ours.stop_ids == {0, 2}  # <|endoftext|> and <|im_end|>
    assert ours.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in ours.chat_template


def test_transformers_gguf_loader_agrees_except_digit_split(smollm2_tokenizer, smollm2_gguf, mixed_lines):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    agree = [line for line in mixed_lines if not digit_split_matters(line)]
    assert len(agree) > 2500
    for line in agree:  # transformers matches special spellings in text, as our allow_special=True does
        assert smollm2_tokenizer.encode(line, allow_special=True) == hf.encode(line, add_special_tokens=False), line
    # The documented divergence: transformers splits as GPT-2 would, without SmolLM2's digit split.
    assert hf.convert_ids_to_tokens(hf.encode("a  1", add_special_tokens=False)) == ["a", "Ġ", "Ġ", "1"]
    differ = [line for line in mixed_lines if digit_split_matters(line)
              and smollm2_tokenizer.encode(line) != hf.encode(line, add_special_tokens=False)]
    assert len(differ) > 1000


def write_llama_vocab_gguf(path, model_file):
    """A GGUF holding a sentencepiece vocabulary as llama.cpp's convert_hf_to_gguf.py writes one."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                     else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                     else gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def mistral_gguf(tmp_path_factory, mistral_sentencepiece):
    return write_llama_vocab_gguf(tmp_path_factory.mktemp("gguf") / "mistral-vocab.gguf", mistral_sentencepiece)


def test_llama_vocab_matches_sentencepiece(mistral_gguf, mistral_sentencepiece, mixed_lines):
    assert detect_tokenizer_kind(mistral_gguf) == "gguf"
    ours = load_tokenizer(mistral_gguf)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sentencepiece))
    assert ours.kind == "gguf" and ours.vocab_size == 32000
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, True)
    assert ours.special_tokens == {"<s>": 1, "</s>": 2}
    assert ours.chat_template.startswith("{{ bos_token }}")
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ids == reference.encode(line), line
        assert ours.decode(ids) == line, line
    stream = StreamDecoder(ours)
    ids = ours.encode("日本語 😀 ok")
    assert "".join(stream.add(i) for i in ids) + stream.flush() == "日本語 😀 ok"


def test_llama_vocab_without_space_prefix(mistral_sentencepiece):
    # add_space_prefix=false in the GGUF: no `▁` before the first word (llama.cpp's rule for such files).
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sentencepiece))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    proto = build_sentencepiece_proto([sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)],
                                      types, add_space_prefix=False, unk_id=0, bos_id=1, eos_id=2, pad_id=None)
    bridged = sentencepiece.SentencePieceProcessor()
    bridged.load_from_serialized_proto(proto)
    assert bridged.encode("Hello world", out_type=str) == ["Hello", "\u2581world"]
    assert sp.encode("Hello world", out_type=str) == ["\u2581Hello", "\u2581world"]
