"""The C++ tokenizers against the Python ones: the same ids on ~4,000 lines of English (a third with numbers after
runs of spaces) plus strings that stress pre-tokenizers, for SmolLM2's byte-level BPE (GGUF), the Llama-3 tiktoken
file and Mistral's 32000-token sentencepiece model; with special tokens matched (chat templates) and without.
Also the file format's guards: a runner rejects a file it does not understand, and the writer refuses models the
C++ encoder cannot reproduce."""

import struct
import subprocess
from pathlib import Path

import pytest
from tokenizer_lines import TRICKY_LINES

from torchat.cli import main
from torchat.tokenizer_bin import CHAT_FORMATS, MAGIC, VERSION, chat_format
from torchat.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def texts(english_lines) -> list[str]:
    numbered = [f"{line}  {i}  {i * 37 % 1000}\n" if i % 3 == 0 else line for i, line in enumerate(english_lines)]
    return numbered + TRICKY_LINES


def cpp_encode(tool: Path, tokenizer_bin: Path, texts: list[str], special: bool) -> list[list[int]]:
    result = subprocess.run([str(tool), str(tokenizer_bin), *(["--special"] if special else [])],
                            input=b"".join(t.encode() + b"\0" for t in texts), capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().split("\n")[:len(texts)]
    return [[int(x) for x in line.split()] for line in lines]


SOURCES = {"smollm2": "smollm2_gguf", "llama3": "llama3_tiktoken", "mistral": "mistral_sentencepiece"}


@pytest.mark.parametrize("special", [False, True], ids=["plain", "special"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_cpp_ids_equal_python_ids(request, tokenize_tool, tokenizer_bins, texts, name, special):
    tokenizer = load_tokenizer(request.getfixturevalue(SOURCES[name]))
    got = cpp_encode(tokenize_tool, tokenizer_bins[name], texts, special)
    want = [tokenizer.encode(t, allow_special=special) for t in texts]
    mismatched = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    print(f"{name} ({'special' if special else 'plain'}): {len(texts) - len(mismatched)}/{len(texts)} texts equal, "
          f"{sum(map(len, want))} ids")
    assert len(got) == len(texts)
    assert not mismatched, f"{len(mismatched)} texts differ, first: {mismatched[0]!r}"


@pytest.mark.parametrize(("name", "expected"), [("smollm2", "chatml"), ("llama3", "llama3"), ("mistral", "llama2")])
def test_the_chat_format_is_read_from_the_tokenizer(request, name, expected):
    chat, system = chat_format(load_tokenizer(request.getfixturevalue(SOURCES[name])))
    assert chat == expected
    assert system.startswith("You are a helpful AI assistant named SmolLM") if name == "smollm2" else system == ""


def test_a_unigram_sentencepiece_model_is_refused(botchan_sp_models, tmp_path, capsys):
    output = tmp_path / "tokenizer.bin"
    assert main(["tokenizer-bin", "--tokenizer-path", str(botchan_sp_models["unigram"]), "--output",
                 str(output)]) == 1
    assert "UNIGRAM model" in capsys.readouterr().err
    assert not output.exists() and not list(tmp_path.iterdir())


def test_a_normalizing_sentencepiece_model_is_refused(botchan_sp_models, tmp_path, capsys):
    assert main(["tokenizer-bin", "--tokenizer-path", str(botchan_sp_models["bpe"]), "--output",
                 str(tmp_path / "t.bin")]) == 1
    assert "normalizer" in capsys.readouterr().err


def corrupt(data: bytes, how: str) -> bytes:
    if how == "magic":
        return b"NOTTORCH" + data[8:]
    if how == "version":
        return data[:8] + struct.pack("<I", VERSION + 1) + data[12:]
    if how == "truncated":
        return data[:len(data) // 2]
    if how == "trailer":
        return data[:-1] + b"X"
    if how == "kind":
        return data[:12] + struct.pack("<I", 7) + data[16:]
    raise AssertionError(how)


@pytest.mark.parametrize(("how", "message"), [("magic", "bad magic"), ("version", f"version {VERSION + 1}, this "
                                              f"runner reads version {VERSION}"), ("truncated", "truncated"),
                                              ("trailer", "bad end marker"), ("kind", "unknown tokenizer kind 7")])
def test_a_file_it_does_not_understand_is_one_line_and_exit_1(tokenize_tool, tokenizer_bins, tmp_path, how, message):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(corrupt(tokenizer_bins["smollm2"].read_bytes(), how))
    result = subprocess.run([str(tokenize_tool), str(bad)], input=b"x\0", capture_output=True, timeout=60)
    assert result.returncode == 1
    err = result.stderr.decode()
    assert message in err and str(bad) in err and err.count("\n") == 1, err


def test_the_header_says_what_it_holds(tokenizer_bins):
    data = tokenizer_bins["llama3"].read_bytes()
    assert data[:8] == MAGIC
    version, kind, vocab, bos, eos, flags, pre, chat = struct.unpack("<IIIiiIII", data[8:40])
    assert (version, kind, vocab, bos, eos, chat) == (VERSION, 2, 128256, 128000, 128001, CHAT_FORMATS["llama3"])


def test_the_writer_replaces_the_output_atomically(llama3_tiktoken, tmp_path):
    output = tmp_path / "tokenizer.bin"
    output.write_bytes(b"old")
    assert main(["tokenizer-bin", "--tokenizer-path", str(llama3_tiktoken), "--output", str(output)]) == 0
    assert output.read_bytes()[:8] == MAGIC and [p.name for p in tmp_path.iterdir()] == ["tokenizer.bin"]


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_cpp_decode_equals_python_decode(request, tokenize_tool, tokenizer_bins, name):
    """Random ids (bytes that are not UTF-8 included): the text a chat history is re-rendered from."""
    import random

    tokenizer = load_tokenizer(request.getfixturevalue(SOURCES[name]))
    unknown = {0} if name == "mistral" else set()  # sentencepiece spells <unk> " ⁇ "; generation never makes it
    rng = random.Random(0)
    sequences = [[i for i in (rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 12)))
                  if i not in unknown] for _ in range(500)]
    sequences += [[tokenizer.encode("é")[-1]], list(range(3, 40))]  # half a character; the specials and bytes
    result = subprocess.run([str(tokenize_tool), str(tokenizer_bins[name]), "--decode"],
                            input="".join(" ".join(map(str, s)) + "\n" for s in sequences).encode(),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()
    got, out = [], result.stdout
    while out:
        length, _, out = out.partition(b"\n")
        got.append(out[:int(length)])
        out = out[int(length):]
    want = [tokenizer.decode(s).encode() for s in sequences]
    assert [s for s, g, w in zip(sequences, got, want) if g != w] == []
