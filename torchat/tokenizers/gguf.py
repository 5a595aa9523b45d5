"""The tokenizer stored inside a GGUF file's metadata, under llama.cpp's key names.

Two vocabulary kinds (`tokenizer.ggml.model`), each handed to the library that runs it:
- "gpt2": byte-level BPE (SmolLM2, Llama-3, Qwen2). Built with the `tokenizers` library from the stored tokens and
  merges; the text is first split with the regexes llama.cpp uses for the file's `tokenizer.ggml.pre`.
- "llama": a sentencepiece vocabulary (Llama-2, Mistral): tokens, scores and token types. Rebuilt as a
  sentencepiece ModelProto and loaded in the sentencepiece library.
"""

import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from torchat.errors import TorchatError, unknown_key_error
from torchat.tokenizers.hf import HFTokenizer
from torchat.tokenizers.sentencepiece import SentencePieceTokenizer, load_processor

if TYPE_CHECKING:
    import gguf

# llama.cpp's token types (llama_token_type), which are also sentencepiece's piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp spells Llama-3's case-insensitive contractions out, so that no Unicode case folding applies.
_LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# `tokenizer.ggml.pre` -> the regexes llama.cpp (src/llama-vocab.cpp) splits text with, applied one after
# another: each splits the pieces the previous one left, keeping matches and the text between them as pieces.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt-2": (_GPT2_REGEX,),
    "gpt2": (_GPT2_REGEX,),
    "llama3": (_LLAMA3_REGEX,),
    "llama-v3": (_LLAMA3_REGEX,),
    "llama-bpe": (_LLAMA3_REGEX,),
    "smollm": (r"\p{N}", _GPT2_REGEX),  # each digit alone, then GPT-2's split (as SmolLM2's tokenizer.json)
    "starcoder": (r"\p{N}", _GPT2_REGEX),
    "qwen2": (_QWEN2_REGEX,),
}
# Pre-tokenizers whose merges llama.cpp skips when a whole piece is already a token (as tiktoken does).
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe"}


class GGUFVocab:
    """The tokenizer metadata of one GGUF file: key -> value (str, int, float, bool or a list of them)."""

    def __init__(self, path: Path, metadata: dict):
        self.path = path
        self.metadata = metadata

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise TorchatError(f"{self.path}: GGUF has no {key}; this file carries no tokenizer, pass one with "
                               "--tokenizer-path")
        return value

    def token_id(self, name: str) -> int | None:
        value = self.get(f"tokenizer.ggml.{name}_token_id")
        return None if value is None or value < 0 else int(value)


def read_gguf(path: Path) -> "gguf.GGUFReader":
    """The whole file through the `gguf` package (tensors included); a tokenizer needs only read_gguf_metadata."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, struct.error, IndexError) as error:
        raise TorchatError(f"{path}: not a readable GGUF file ({error}); fetch it again or pass another "
                           "--tokenizer-path") from None


def _not_readable(path: Path, why: str) -> TorchatError:
    return TorchatError(f"{path}: not a readable GGUF file ({why}); fetch it again or pass another --tokenizer-path")


def _reader_metadata(path: Path, reader: "gguf.GGUFReader") -> dict:
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except UnicodeDecodeError as error:
            raise TorchatError(f"{path}: GGUF metadata {key} is not valid UTF-8 ({error.reason}); the file is "
                               "damaged, fetch it again") from None
    return metadata


# --- the key-value section, read with struct --------------------------------------------------------------------
# gguf.GGUFReader makes a numpy view of every element of every array, some 250k for SmolLM2's 49152 tokens and
# 48900 merges: 2-7 s per load here, after `import torch` the largest part of a .pte's cold start. A tokenizer needs
# only the key-value section, read here directly (~0.1 s). Layout (GGUF v2 and v3, little-endian): b"GGUF", u32
# version, u64 tensor count, u64 key count, then per key a string (u64 length, UTF-8 bytes), a u32 value type and
# the value; an array is a u32 item type, a u64 count and the items.

_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def _read_string(buffer, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buffer, offset)
    end = offset + 8 + length
    if end > len(buffer):
        raise struct.error("a string runs past the end of the file")
    return str(buffer[offset + 8:end], "utf-8"), end


def _read_value(buffer, offset: int, kind: int):
    if kind in _SCALAR_FORMATS:
        layout = struct.Struct("<" + _SCALAR_FORMATS[kind])
        return layout.unpack_from(buffer, offset)[0], offset + layout.size
    if kind == _STRING:
        return _read_string(buffer, offset)
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buffer, offset)
        offset += 12
        if item in _SCALAR_FORMATS:
            layout = struct.Struct(f"<{count}{_SCALAR_FORMATS[item]}")
            return list(layout.unpack_from(buffer, offset)), offset + layout.size
        values = []
        for _ in range(count):
            value, offset = _read_value(buffer, offset, item)
            values.append(value)
        return values, offset
    raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_metadata(path: Path) -> dict:
    """Every key of a GGUF file's key-value section -> its value (lists for arrays); the tensors are not read."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            if buffer[:4] != b"GGUF":
                raise _not_readable(path, "no GGUF magic")
            (version,) = struct.unpack_from("<I", buffer, 4)
            if version not in (2, 3):
                raise _not_readable(path, f"GGUF version {version}; torchat reads versions 2 and 3")
            (count,) = struct.unpack_from("<Q", buffer, 16)
            metadata, offset = {}, 24
            for _ in range(count):
                key, offset = _read_string(buffer, offset)
                (kind,) = struct.unpack_from("<I", buffer, offset)
                try:
                    metadata[key], offset = _read_value(buffer, offset + 4, kind)
                except UnicodeDecodeError as error:
                    raise TorchatError(f"{path}: GGUF metadata {key} is not valid UTF-8 ({error.reason}); the file "
                                       "is damaged, fetch it again") from None
            return metadata
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as error:  # mmap of an empty file: ValueError
        raise _not_readable(path, str(error) or type(error).__name__) from None


def load_gguf_tokenizer(path: Path, reader: "gguf.GGUFReader | None" = None) -> HFTokenizer | SentencePieceTokenizer:
    """The tokenizer of a GGUF; pass `reader` to reuse one the checkpoint loader already opened."""
    metadata = _reader_metadata(path, reader) if reader is not None else read_gguf_metadata(path)
    vocab = GGUFVocab(path, metadata)
    model = vocab.require("tokenizer.ggml.model")
    if model not in GGUF_VOCABS:
        raise TorchatError(f"{path}: {unknown_key_error('GGUF tokenizer.ggml.model', model, GGUF_VOCABS)}")
    tokenizer = GGUF_VOCABS[model](vocab)
    tokenizer.kind = "gguf"  # what it is loaded as, whichever library runs it
    return tokenizer


def load_bpe_vocab(vocab: GGUFVocab) -> HFTokenizer:
    """Byte-level BPE from `tokenizer.ggml.tokens`/`merges`, split the way llama.cpp splits for this `pre`."""
    pre = vocab.get("tokenizer.ggml.pre", "default")
    pre_tokenizer = build_pre_tokenizer(pre, vocab.path)
    tokens = vocab.require("tokenizer.ggml.tokens")
    types = vocab.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    ids = {token: i for i, token in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise TorchatError(f"{vocab.path}: GGUF vocabulary repeats a token; the file is malformed")
    merges = [tuple(merge.split(" ")) for merge in vocab.require("tokenizer.ggml.merges")]
    if any(len(merge) != 2 for merge in merges):
        raise TorchatError(f"{vocab.path}: a GGUF merge is not two tokens separated by one space; the file is "
                           "malformed")

    # No unk token and no byte fallback: a byte the vocabulary lacks is dropped, as in the tokenizer.json the
    # vocabulary came from.
    tokenizer = tokenizers.Tokenizer(models.BPE(ids, merges, ignore_merges=pre in IGNORE_MERGES))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens are matched only when a template asks for them; user-defined ones (like `<think>`) are
    # always matched whole, as llama.cpp does.
    tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    default_bos = pre in IGNORE_MERGES  # llama.cpp's default for BPE vocabularies: BOS only for Llama-3
    return HFTokenizer(vocab.path, tokenizer, bos_id=vocab.token_id("bos"), eos_id=vocab.token_id("eos"),
                       add_bos=bool(vocab.get("tokenizer.ggml.add_bos_token", default_bos)),
                       chat_template=vocab.get("tokenizer.chat_template"),
                       extra_stop_ids=_end_of_turn_ids(vocab))


def build_pre_tokenizer(pre: str, path: Path) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's split for a `tokenizer.ggml.pre` value, then the byte-level spelling of each piece."""
    if pre not in PRE_TOKENIZERS:
        raise TorchatError(f"{path}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
                           f"{', '.join(sorted(PRE_TOKENIZERS))}")
    splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    # use_regex=False: the splits above are the whole pre-tokenization; ByteLevel only maps bytes to letters.
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def load_spm_vocab(vocab: GGUFVocab) -> SentencePieceTokenizer:
    """A sentencepiece vocabulary, loaded in sentencepiece through a ModelProto rebuilt from the metadata."""
    tokens = vocab.require("tokenizer.ggml.tokens")
    scores = vocab.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = vocab.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise TorchatError(f"{vocab.path}: GGUF tokens, scores and token types differ in length "
                           f"({len(tokens)}, {len(scores)}, {len(types)}); the file is malformed")
    proto = build_sentencepiece_proto(
        tokens, scores, types, add_space_prefix=bool(vocab.get("tokenizer.ggml.add_space_prefix", True)),
        unk_id=vocab.token_id("unknown"), bos_id=vocab.token_id("bos"), eos_id=vocab.token_id("eos"),
        pad_id=vocab.token_id("padding"))
    processor = load_processor(proto, vocab.path)
    return SentencePieceTokenizer(
        vocab.path, processor, bos_id=vocab.token_id("bos"), eos_id=vocab.token_id("eos"),
        add_bos=bool(vocab.get("tokenizer.ggml.add_bos_token", True)),
        chat_template=vocab.get("tokenizer.chat_template"), extra_stop_ids=_end_of_turn_ids(vocab))


def _end_of_turn_ids(vocab: GGUFVocab) -> frozenset[int]:
    return frozenset({i for name in ("eot", "eom") if (i := vocab.token_id(name)) is not None})


# --- a sentencepiece ModelProto, written by hand -------------------------------------------------------------
# The sentencepiece wheel ships no public writer for its model format (its sentencepiece_model_pb2 needs the
# protobuf package, which torchat does not depend on), so the few fields we need are encoded here in protobuf's
# wire format. Field numbers are those of sentencepiece's src/sentencepiece_model.proto.

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are sent as their 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def build_sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int], *, add_space_prefix: bool,
                              unk_id: int | None, bos_id: int | None, eos_id: int | None,
                              pad_id: int | None) -> bytes:
    """A serialized sentencepiece ModelProto for a llama.cpp "llama" vocabulary.

    The model type is BPE whatever the vocabulary was trained as: llama.cpp's "llama" tokenizer merges the
    adjacent pair with the best score, which is sentencepiece's BPE encoder. The normalizer is the identity
    (llama.cpp normalizes nothing), with the `▁` prefix as the file says. Token types are first made what
    sentencepiece accepts (see `sentencepiece_types`).
    """
    types = sentencepiece_types(types, unk_id)
    pieces = b"".join(
        _bytes_field(1, _bytes_field(1, token.encode("utf-8")) + _float_field(2, float(score)) +
                     _int_field(3, int(kind)))
        for token, score, kind in zip(tokens, scores, types))

    def piece_fields(id_field: int, piece_field: int, token_id: int | None) -> bytes:
        if token_id is None or not 0 <= token_id < len(tokens):
            return _int_field(id_field, -1)
        return _int_field(id_field, token_id) + _bytes_field(piece_field, tokens[token_id].encode("utf-8"))

    trainer = (_int_field(3, 2)  # model_type: BPE
               + _int_field(4, len(tokens))  # vocab_size
               + _int_field(35, int(BYTE in types))  # byte_fallback
               + piece_fields(40, 45, unk_id) + piece_fields(41, 46, bos_id) + piece_fields(42, 47, eos_id)
               + piece_fields(43, 48, pad_id))
    normalizer = (_bytes_field(1, b"identity") + _int_field(3, int(add_space_prefix))  # add_dummy_prefix
                  + _int_field(4, 0)  # remove_extra_whitespaces
                  + _int_field(5, 1))  # escape_whitespaces
    return pieces + _bytes_field(2, trainer) + _bytes_field(3, normalizer)


def sentencepiece_types(types: list[int], unk_id: int | None) -> list[int]:
    """The GGUF's token types with exactly one UNKNOWN piece, as sentencepiece requires.

    Some files type several tokens UNKNOWN and the unk token itself CONTROL (llama.cpp's Phi-3 vocabulary:
    `<unk>` is CONTROL, its 53 `[PAD32011]`... tokens UNKNOWN), which sentencepiece refuses ("unk is already
    defined"). llama.cpp treats the two types alike: neither is matched in plain text nor decoded (llama-vocab's
    token_to_piece and tokenizer_st_partition), so the unk id becomes the one UNKNOWN piece and every other
    UNKNOWN piece CONTROL. Without an unk id in the file, the first UNKNOWN piece stays the unk.
    """
    if unk_id is None or not 0 <= unk_id < len(types):
        unk_id = next((i for i, kind in enumerate(types) if kind == UNKNOWN), None)
    return [UNKNOWN if i == unk_id else CONTROL if kind == UNKNOWN else kind for i, kind in enumerate(types)]


# `tokenizer.ggml.model` -> the loader for that vocabulary kind.
GGUF_VOCABS = {"gpt2": load_bpe_vocab, "llama": load_spm_vocab}
