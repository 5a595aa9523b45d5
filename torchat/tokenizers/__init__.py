"""Tokenizers: one interface (`Tokenizer`), one loader per kind in `TOKENIZERS`, the kind detected from the file.

    tokenizer = load_tokenizer(Path("model.gguf"))          # or tokenizer.model, tokenizer.json, a directory
    ids = tokenizer.encode("Hello", bos=tokenizer.add_bos)
"""

import re
from collections.abc import Callable
from pathlib import Path

from torchat.errors import TorchatError, unknown_key_error
from torchat.tokenizers.base import StreamDecoder, Tokenizer
from torchat.tokenizers.gguf import load_gguf_tokenizer
from torchat.tokenizers.hf import HFTokenizer
from torchat.tokenizers.sentencepiece import SentencePieceTokenizer
from torchat.tokenizers.tiktoken import TiktokenTokenizer

__all__ = ["TOKENIZERS", "StreamDecoder", "Tokenizer", "detect_tokenizer_kind", "load_tokenizer"]

# kind -> loader of a file of that kind
TOKENIZERS: dict[str, Callable[[Path], Tokenizer]] = {
    "sentencepiece": SentencePieceTokenizer.load,
    "tiktoken": TiktokenTokenizer.load,
    "hf": HFTokenizer.load,
    "gguf": load_gguf_tokenizer,
}

# The file a directory holds for each kind, in the order detection tries them: tokenizer.model first, since
# where a repository has both, sentencepiece itself is the reference and tokenizer.json its conversion.
DIRECTORY_FILES = {"tokenizer.model": ("sentencepiece", "tiktoken"), "tokenizer.json": ("hf",)}

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=*\s+\d+\s*")
_FIX = "pass --tokenizer-path with a tokenizer.model, tokenizer.json or .gguf file"


def load_tokenizer(path: Path, kind: str | None = None) -> Tokenizer:
    """The tokenizer in `path` (a file, or a directory holding one); `kind` overrides detection."""
    if kind is not None and kind not in TOKENIZERS:
        raise unknown_key_error("tokenizer kind", kind, TOKENIZERS)
    path = resolve_tokenizer_file(Path(path), kind)
    return TOKENIZERS[kind or detect_tokenizer_kind(path)](path)


def resolve_tokenizer_file(path: Path, kind: str | None = None) -> Path:
    """`path` itself when it is a file; for a directory, the tokenizer file inside it."""
    if path.is_file():
        return path
    if not path.exists():
        raise TorchatError(f"{path}: no such tokenizer file; {_FIX}")
    if not path.is_dir():
        raise TorchatError(f"{path}: not a regular file; {_FIX}")
    for name, kinds in DIRECTORY_FILES.items():
        if (path / name).is_file() and (kind is None or kind in kinds):
            return path / name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1 and kind in (None, "gguf"):
        return ggufs[0]
    found = f"{len(ggufs)} .gguf files" if ggufs else "no tokenizer.model, tokenizer.json or .gguf file"
    raise TorchatError(f"{path}: directory holds {found}; {_FIX}")


def detect_tokenizer_kind(path: Path) -> str:
    """The kind of tokenizer file `path` is, from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as error:
        raise TorchatError(f"{path}: cannot read the tokenizer ({error.strerror}); {_FIX}") from None
    if head.startswith(b"GGUF"):
        return "gguf"
    if head.lstrip().startswith(b"{"):
        return "hf"
    if _TIKTOKEN_LINE.fullmatch(head.split(b"\n", 1)[0]):
        return "tiktoken"
    # A sentencepiece ModelProto starts with its first piece: field 1, length-delimited, so the byte 0x0A.
    if head.startswith(b"\x0a"):
        return "sentencepiece"
    raise TorchatError(f"{path}: not a tokenizer torchat knows (GGUF, tokenizer.json, sentencepiece or tiktoken "
                       f"tokenizer.model); {_FIX}, or name its kind with --tokenizer-kind "
                       f"({', '.join(sorted(TOKENIZERS))})")
