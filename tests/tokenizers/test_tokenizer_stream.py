"""StreamDecoder: ids fed one at a time give exactly the full decode, and never a half character."""

import pytest

from torchat.tokenizers import StreamDecoder, load_tokenizer

MULTI_BYTE = "Naïve café — 日本語のテキスト, 한국어, Ελληνικά, emoji 😀👍🏽🇺🇸 👨‍👩‍👧‍👦 🦩𝄞 and ❤️; math ∑∫√ ½.\n\n  end "


@pytest.fixture(scope="module", params=["mistral", "botchan-unigram", "llama3"])
def tokenizer(request, mistral_sentencepiece, botchan_sp_models, llama3_tiktoken):
    path = {"mistral": mistral_sentencepiece, "botchan-unigram": botchan_sp_models["unigram"],
            "llama3": llama3_tiktoken}[request.param]
    return load_tokenizer(path)


def stream(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = StreamDecoder(tokenizer)
    chunks = [decoder.add(i) for i in ids]
    return chunks, decoder.flush()


def test_stream_equals_full_decode(tokenizer, english_lines):
    for text in [MULTI_BYTE, *english_lines[:300:7], "\n".join(english_lines[300:340])]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        chunks, rest = stream(tokenizer, ids)
        assert "".join(chunks) + rest == tokenizer.decode(ids), text
        assert not any("\ufffd" in c for c in chunks if c) or "\ufffd" in tokenizer.decode(ids)


def test_incomplete_utf8_is_held_back(mistral_sentencepiece):
    # Mistral has no token for 🦩: four byte-fallback tokens spell it, and nothing comes out until the fourth.
    tokenizer = load_tokenizer(mistral_sentencepiece)
    ids = tokenizer.encode("a🦩")
    assert [tokenizer.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]
    chunks, rest = stream(tokenizer, ids)
    assert chunks == ["a", "", "", "", "🦩"] and rest == ""


def test_flush_gives_what_never_completed(mistral_sentencepiece):
    tokenizer = load_tokenizer(mistral_sentencepiece)
    ids = tokenizer.encode("ok🦩")[:-2]  # generation stopped inside the character
    chunks, rest = stream(tokenizer, ids)
    assert "".join(chunks) == "ok" and rest == tokenizer.decode(ids)[len("ok"):] and rest.endswith("\ufffd")
