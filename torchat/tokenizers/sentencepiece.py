"""Sentencepiece tokenizers (`tokenizer.model`: Llama-2, Mistral, llama2.c's stories models), via the sentencepiece
library; also what a GGUF's "llama" vocabulary is loaded as (see torchat/tokenizers/gguf.py)."""

from pathlib import Path

import sentencepiece

from torchat.errors import TorchatError
from torchat.tokenizers.base import Tokenizer, config_chat_template, read_tokenizer_config

BYTE_PIECE_LENGTH = len("<0x00>")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, processor: sentencepiece.SentencePieceProcessor, *,
                 bos_id: int | None = None, eos_id: int | None = None, add_bos: bool = True,
                 chat_template: str | None = None, extra_stop_ids: frozenset[int] = frozenset()):
        """A loaded processor; bos/eos default to the model's own (sentencepiece says -1 for "none")."""
        super().__init__(path, extra_stop_ids)
        self.processor = processor
        own_bos, own_eos = processor.bos_id(), processor.eos_id()
        self._bos_id = bos_id if bos_id is not None else (own_bos if own_bos >= 0 else None)
        self._eos_id = eos_id if eos_id is not None else (own_eos if own_eos >= 0 else None)
        self._add_bos = add_bos
        self._chat_template = chat_template
        size = processor.get_piece_size()
        self._control = {processor.id_to_piece(i): i for i in range(size) if processor.is_control(i)}

    @classmethod
    def load(cls, path: Path) -> "SentencePieceTokenizer":
        processor = load_processor(path.read_bytes(), path)
        return cls(path, processor, chat_template=config_chat_template(read_tokenizer_config(path)))

    def encode_text(self, text: str) -> list[int]:
        # sentencepiece never produces a control id from text, so `<s>` typed by a user stays characters.
        return self.processor.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.processor.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.processor.id_to_piece(token_id)
        if self.processor.is_byte(token_id):  # byte fallback: `<0x0A>` stands for the byte 0x0A
            assert len(piece) == BYTE_PIECE_LENGTH, piece
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._control)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def add_bos(self) -> bool:
        return self._add_bos and self._bos_id is not None

    @property
    def chat_template(self) -> str | None:
        return self._chat_template


def load_processor(model_proto: bytes, path: Path) -> sentencepiece.SentencePieceProcessor:
    """A sentencepiece processor from a serialized ModelProto; a TorchatError naming `path` if it is not one."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load_from_serialized_proto(model_proto)
    except (RuntimeError, OSError, TypeError) as error:
        # sentencepiece's message names its own source line; what the user needs is "this is no model".
        reason = "not a sentencepiece ModelProto" if "ParseFromArray" in str(error) else str(error).strip()
        reason = reason.splitlines()[-1] if reason else type(error).__name__
        raise TorchatError(f"{path}: not a sentencepiece model ({reason}); pass the model's tokenizer file with "
                           "--tokenizer-path") from None
    return processor
