"""`torchat tokenizer-bin`: a tokenizer as the versioned `tokenizer.bin` that the C++ runners read.

    torchat tokenizer-bin --tokenizer-path tokenizer.model --output tokenizer.bin
    torchat tokenizer-bin --checkpoint-dir artifacts/convert/<key>-m/ --output-path tokenizer.bin   (doit's form)

The format extends llama2.c's tokenizer.bin (scores and pieces) with a header, so that a runner refuses a file it
does not understand. Little-endian throughout:

    b"TORCHTOK"  u32 version (1)  u32 kind  u32 vocab_size  i32 bos  i32 eos  u32 flags  u32 pre_tokenizer
    u32 chat_format  u32 n_stop  i32 stop_ids[n_stop]  u32 len  default-system-prompt bytes (UTF-8)
    vocab_size x (u8 type, f32 score, u32 len, piece bytes)
    u32 n_merges  n_merges x (i32 left, i32 right)        the merge at index r has rank r
    b"KOTHCROT"                                            the header magic reversed: the file is whole

kind 1 "sentencepiece": llama2.c's encoder: UTF-8 characters merged by the best-scoring pair, pieces spelled with
`▁`, byte fallback (sentencepiece BPE models; a unigram model is refused). kind 2 "bpe": byte-level BPE over the
pieces a pre-tokenizer splits off; pieces are the token's bytes; pairs merge by the merges' rank, or with no merges
(tiktoken) by the best score of the merged token (score = -rank).
"""

import re
import struct
from enum import IntEnum, IntFlag
from pathlib import Path

from torchat.errors import TorchatError, unknown_key_error
from torchat.publish import write_file

MAGIC = b"TORCHTOK"
END_MAGIC = MAGIC[::-1]
VERSION = 1


class Kind(IntEnum):
    SENTENCEPIECE = 1
    BPE = 2


class Flag(IntFlag):
    ADD_BOS = 1
    ADD_DUMMY_PREFIX = 2   # sentencepiece: "▁" before the text
    BYTE_FALLBACK = 4      # sentencepiece: an unknown character becomes its <0xXX> byte tokens
    IGNORE_MERGES = 8      # bpe: a piece that is a token as a whole is that token (tiktoken, llama.cpp's llama3)


class TokenType(IntEnum):
    NORMAL = 0
    CONTROL = 1            # matched in text only when a chat template asks (allow_special)
    BYTE = 2               # a fallback byte: the piece is that one byte
    USER_DEFINED = 3       # always matched whole before pre-tokenization
    UNUSED = 4             # never produced by the encoder


# the pre-tokenizers the C++ scanners implement (runner/pretokenize.cpp), by their llama.cpp `pre` names
PRE_TOKENIZERS = {"none": 0, "gpt2": 1, "smollm": 2, "llama3": 3, "qwen2": 4}
GGUF_PRE = {"gpt-2": "gpt2", "gpt2": "gpt2", "smollm": "smollm", "starcoder": "smollm", "llama3": "llama3",
            "llama-v3": "llama3", "llama-bpe": "llama3", "qwen2": "qwen2"}
CHAT_FORMATS = {"none": 0, "chatml": 1, "llama3": 2, "llama2": 3}


def write_atomically(output: Path, data: bytes) -> None:
    if not output.parent.is_dir():
        raise TorchatError(f"{output.parent}: no such directory for --output")
    write_file(output, data)


# --- what each tokenizer kind becomes ----------------------------------------------------------------------

def _sentencepiece_vocab(tokenizer) -> tuple[Kind, int, list, list]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.processor.serialized_model_proto())
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        raise TorchatError(f"{tokenizer.path}: a sentencepiece {model_type} model; the C++ runners reproduce only "
                           "BPE models (llama2.c's encoder), so there is no tokenizer.bin for it")
    if normalizer.precompiled_charsmap or normalizer.normalization_rule_tsv or normalizer.remove_extra_whitespaces \
            or trainer.treat_whitespace_as_suffix or not normalizer.escape_whitespaces:
        raise TorchatError(f"{tokenizer.path}: its normalizer ({normalizer.name or 'custom'}, remove_extra_whitespaces"
                           f"={normalizer.remove_extra_whitespaces}) is not the identity the C++ runners apply; "
                           "only Llama-2/Mistral-style sentencepiece models are supported")
    # sentencepiece's piece types NORMAL, UNKNOWN (never matched in text), CONTROL, USER_DEFINED, UNUSED, BYTE
    types = {1: TokenType.NORMAL, 2: TokenType.UNUSED, 3: TokenType.CONTROL, 4: TokenType.USER_DEFINED,
             5: TokenType.UNUSED, 6: TokenType.BYTE}
    pieces = []
    for i, piece in enumerate(proto.pieces):
        kind = types[piece.type]
        text = tokenizer.token_bytes(i) if kind == TokenType.BYTE else piece.piece.encode("utf-8")
        pieces.append((kind, piece.score, text))
    flags = Flag.ADD_DUMMY_PREFIX * normalizer.add_dummy_prefix | Flag.BYTE_FALLBACK * trainer.byte_fallback
    return Kind.SENTENCEPIECE, flags, pieces, []


def _tiktoken_vocab(tokenizer) -> tuple[Kind, int, list, list]:
    specials = set(tokenizer.special_tokens.values())
    pieces = []
    for i in range(tokenizer.vocab_size):
        kind = TokenType.CONTROL if i in specials else TokenType.NORMAL
        pieces.append((kind, 0.0 if kind == TokenType.CONTROL else -float(i), tokenizer.token_bytes(i)))
    return Kind.BPE, Flag.IGNORE_MERGES, pieces, []


def _hf_bpe_vocab(tokenizer) -> tuple[Kind, int, list, list]:
    import json

    model = json.loads(tokenizer.tokenizer.to_str())["model"]
    if model.get("type") != "BPE" or not tokenizer._byte_level:
        raise TorchatError(f"{tokenizer.path}: a {model.get('type')} tokenizer that is not byte-level BPE; the C++ "
                           "runners read byte-level BPE (GPT-2, Llama-3, SmolLM2) and sentencepiece BPE only")
    added = tokenizer.tokenizer.get_added_tokens_decoder()
    pieces = []
    for i in range(tokenizer.vocab_size):
        if i in added:
            kind = TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        else:
            kind = TokenType.NORMAL
        pieces.append((kind, 0.0, tokenizer.token_bytes(i)))
    ids = {piece: i for i, (kind, _, piece) in enumerate(pieces) if kind == TokenType.NORMAL}
    alphabet = _byte_level_bytes()
    merges = []
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        merges.append((ids[alphabet(left)], ids[alphabet(right)]))
    flags = Flag.IGNORE_MERGES * bool(model.get("ignore_merges"))
    return Kind.BPE, flags, pieces, merges


def _byte_level_bytes():
    from torchat.tokenizers.hf import byte_level_alphabet

    alphabet = byte_level_alphabet()
    return lambda spelling: bytes(alphabet[c] for c in spelling)


def _pre_tokenizer(tokenizer) -> str:
    """The pre-tokenizer of a byte-level BPE tokenizer, as one the C++ scanners implement."""
    if tokenizer.kind == "tiktoken":
        return "llama3"
    if tokenizer.kind == "gguf":
        import gguf

        field = gguf.GGUFReader(tokenizer.path).fields.get("tokenizer.ggml.pre")
        pre = field.contents() if field is not None else "default"
        if pre not in GGUF_PRE:
            raise TorchatError(f"{tokenizer.path}: GGUF pre-tokenizer {pre!r} has no C++ scanner; supported: "
                               f"{', '.join(sorted(GGUF_PRE))}")
        return GGUF_PRE[pre]
    return _hf_json_pre_tokenizer(tokenizer)


def _hf_json_pre_tokenizer(tokenizer) -> str:
    """A tokenizer.json's pre-tokenizer, recognised by its structure (GPT-2's ByteLevel, SmolLM2's digits first,
    Llama-3's split regex)."""
    import json

    from torchat.tokenizers.gguf import PRE_TOKENIZERS as GGUF_REGEXES

    config = json.loads(tokenizer.tokenizer.to_str())
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shapes = [(s.get("type"), s.get("individual_digits"), s.get("use_regex"),
               (s.get("pattern") or {}).get("Regex")) for s in steps]
    if config.get("normalizer") is None:
        if shapes == [("ByteLevel", None, True, None)]:
            return "gpt2"
        if shapes == [("Digits", True, None, None), ("ByteLevel", None, True, None)]:
            return "smollm"
        from torchat.tokenizers.tiktoken import LLAMA3_PATTERN

        for name, pattern in (("llama3", LLAMA3_PATTERN), ("llama3", GGUF_REGEXES["llama3"][0]),
                              ("qwen2", GGUF_REGEXES["qwen2"][0])):
            if shapes == [("Split", None, None, pattern), ("ByteLevel", None, False, None)]:
                return name
    raise TorchatError(f"{tokenizer.path}: its normalizer/pre-tokenizer ({[s[0] for s in shapes]}) has no C++ "
                       "scanner; supported: GPT-2's ByteLevel, SmolLM2's digits + ByteLevel, the Llama-3 split")


VOCABS = {"sentencepiece": _sentencepiece_vocab, "tiktoken": _tiktoken_vocab, "hf": _hf_bpe_vocab}


def _vocab_reader(tokenizer):
    kind = tokenizer.kind
    if kind == "gguf":  # run by the library its vocabulary kind maps to
        from torchat.tokenizers.sentencepiece import SentencePieceTokenizer

        kind = "sentencepiece" if isinstance(tokenizer, SentencePieceTokenizer) else "hf"
    if kind not in VOCABS:
        raise unknown_key_error("tokenizer kind (tokenizer.bin)", kind, VOCABS)
    return VOCABS[kind]


# --- the chat format -----------------------------------------------------------------------------------------

_PROBES = ([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
           [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])


def _chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


def chat_format(tokenizer) -> tuple[str, str]:
    """(format, default system prompt) that the C++ runner renders; ("none", "") when it reproduces none of them."""
    from torchat.templates import pick_template, render

    template = pick_template(tokenizer)
    if template != "jinja":
        return template, ""
    try:
        rendered = [render(tokenizer, "jinja", probe) for probe in _PROBES]
    except TorchatError:
        return "none", ""
    for name in ("llama3", "llama2"):
        try:
            if all(render(tokenizer, name, p) == r for p, r in zip(_PROBES, rendered)):
                return name, ""
        except (TorchatError, KeyError):
            continue
    texts = [b"".join(tokenizer.token_bytes(i) for i in ids).decode("utf-8", "replace") for ids in rendered]
    if texts[0] == _chatml(_PROBES[0]):
        # a template that adds a system message when the conversation has none (SmolLM2's does)
        head = re.fullmatch(r"(<\|im_start\|>system\n(.*?)<\|im_end\|>\n)?" + re.escape(_chatml(_PROBES[1])),
                            texts[1], re.S)
        if head is not None:
            return "chatml", head.group(2) or ""
    return "none", ""


# --- the file --------------------------------------------------------------------------------------------------

def build_tokenizer_bin(tokenizer, chat: str | None = None) -> bytes:
    kind, flags, pieces, merges = _vocab_reader(tokenizer)(tokenizer)
    pre = "none" if kind == Kind.SENTENCEPIECE else _pre_tokenizer(tokenizer)
    if chat is None:
        chat, system = chat_format(tokenizer)
    else:
        system = chat_format(tokenizer)[1] if chat == "chatml" else ""
    flags |= Flag.ADD_BOS * tokenizer.add_bos
    stops = sorted(tokenizer.stop_ids)
    none = -1
    out = [MAGIC, struct.pack("<IIIiiIII", VERSION, kind, len(pieces),
                              none if tokenizer.bos_id is None else tokenizer.bos_id,
                              none if tokenizer.eos_id is None else tokenizer.eos_id, int(flags),
                              PRE_TOKENIZERS[pre], CHAT_FORMATS[chat]),
           struct.pack(f"<I{len(stops)}i", len(stops), *stops), _blob(system.encode("utf-8"))]
    for token_type, score, piece in pieces:
        out.append(struct.pack("<Bf", token_type, score) + _blob(piece))
    out.append(struct.pack("<I", len(merges)) + b"".join(struct.pack("<ii", a, b) for a, b in merges))
    out.append(END_MAGIC)
    return b"".join(out)


def _blob(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data
