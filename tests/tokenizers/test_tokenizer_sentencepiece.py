"""Our sentencepiece kind against the sentencepiece library itself, on Mistral's 32000-piece model (byte
fallback, identity normalizer) and the botchan BPE and unigram models (NFKC normalization)."""

import pytest
import sentencepiece

from torchat.tokenizers import load_tokenizer


@pytest.fixture(scope="module", params=["mistral", "botchan-bpe", "botchan-unigram"])
def model_path(request, mistral_sentencepiece, botchan_sp_models):
    return {"mistral": mistral_sentencepiece, "botchan-bpe": botchan_sp_models["bpe"],
            "botchan-unigram": botchan_sp_models["unigram"]}[request.param]


def test_ids_and_text_match_sentencepiece(model_path, mixed_lines):
    ours = load_tokenizer(model_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    assert ours.kind == "sentencepiece"
    assert ours.vocab_size == reference.get_piece_size()
    assert (ours.bos_id, ours.eos_id) == (reference.bos_id(), reference.eos_id())
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ids == reference.encode(line), line
        assert ours.decode(ids) == reference.decode(ids), line
        assert ours.encode(line, bos=True, eos=True) == [reference.bos_id(), *ids, reference.eos_id()]


def test_mistral_round_trips_and_token_bytes_spell_the_text(mistral_sentencepiece, mixed_lines):
    # Mistral's normalizer is the identity and it falls back to bytes, so every line comes back exactly, and
    # the tokens' bytes spell the line behind the `▁` that sentencepiece puts first.
    ours = load_tokenizer(mistral_sentencepiece)
    for line in mixed_lines:
        ids = ours.encode(line)
        assert ours.decode(ids) == line
        if line:
            assert b"".join(ours.token_bytes(i) for i in ids) == b" " + line.encode("utf-8"), line


def test_mistral_specials(mistral_sentencepiece):
    ours = load_tokenizer(mistral_sentencepiece)
    assert ours.special_tokens == {"<s>": 1, "</s>": 2}
    assert ours.stop_ids == {2} and ours.add_bos
    assert ours.id_to_piece(13) == "<0x0A>" and ours.token_bytes(13) == b"\n"
    # Typed `</s>` stays characters; a template's `</s>` is the EOS id, and each stretch between special tokens
    # gets its own `▁` prefix (as llama.cpp encodes it).
    typed = ours.encode("hi</s>")
    assert 2 not in typed and ours.decode(typed) == "hi</s>"
    assert ours.encode("<s>hi</s>", allow_special=True) == [1, *ours.encode("hi"), 2]
