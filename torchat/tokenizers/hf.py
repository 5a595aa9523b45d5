"""Hugging Face `tokenizer.json` tokenizers via the `tokenizers` library; also what a GGUF's byte-level BPE
vocabulary is built as (see torchat/tokenizers/gguf.py).

BOS/EOS and the chat template come from the tokenizer_config.json beside tokenizer.json when there is one.
"""

from functools import cache
from pathlib import Path

import tokenizers

from torchat.errors import TorchatError
from torchat.tokenizers.base import (Tokenizer, config_chat_template, config_token, read_tokenizer_config)

# Without a tokenizer_config.json, BOS/EOS are the first of these spellings that the vocabulary has.
BOS_SPELLINGS = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
EOS_SPELLINGS = ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>")


@cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level spelling, character -> byte: printable bytes spell themselves, the other 68 bytes are
    shifted to U+0100 onwards in byte order (so the space is `Ġ`, the newline `Ċ`)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in set(printable))
    alphabet |= {chr(256 + i): b for i, b in enumerate(shifted)}
    return alphabet


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: Path, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, extra_stop_ids: frozenset[int] = frozenset()):
        super().__init__(path, extra_stop_ids)
        self.tokenizer = tokenizer
        # Two copies, so that neither call flips a flag on a shared object: `plain` spells special tokens out
        # as text, `special` matches them.
        self._plain = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True
        self._special_tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._special_tok.encode_special_tokens = False
        self._special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(self._special.values())
        self._bos_id, self._eos_id, self._add_bos = bos_id, eos_id, add_bos
        self._chat_template = chat_template
        self._byte_level = _is_byte_level(tokenizer)

    @classmethod
    def load(cls, path: Path) -> "HFTokenizer":
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception on a malformed file
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TorchatError(f"{path}: not a Hugging Face tokenizer.json ({reason}); pass the model's "
                               "tokenizer with --tokenizer-path") from None
        config = read_tokenizer_config(path)
        bos_id = _token_id(tokenizer, config_token(config, "bos_token"), BOS_SPELLINGS, "bos_token" in config)
        eos_id = _token_id(tokenizer, config_token(config, "eos_token"), EOS_SPELLINGS, "eos_token" in config)
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # The post-processor is where tokenizer.json itself says whether BOS goes first.
            add_bos = bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(path, tokenizer, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos),
                   chat_template=config_chat_template(config))

    def encode_text(self, text: str) -> list[int]:
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_with_special(self, text: str) -> list[int]:
        return self._special_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise TorchatError(f"{self.path}: token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return piece

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.id_to_piece(token_id)
        if token_id in self._special_ids:
            return piece.encode("utf-8")
        if self._byte_level:
            alphabet = byte_level_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode("utf-8")  # an added token kept as plain text, like `<think>`
        # A sentencepiece-style vocabulary: `▁` is a space, `<0x0A>` a fallback byte.
        if piece.startswith("<0x") and piece.endswith(">") and len(piece) == len("<0x00>"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

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



def _token_id(tokenizer: tokenizers.Tokenizer, name: str | None, fallbacks: tuple[str, ...],
              configured: bool) -> int | None:
    """The id of the configured token name; a configured null means none; no config means the usual names."""
    if name is not None:
        return tokenizer.token_to_id(name)
    if configured:
        return None
    return next((i for s in fallbacks if (i := tokenizer.token_to_id(s)) is not None), None)


def _is_byte_level(tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether the decoder maps GPT-2's byte alphabet back to bytes (also inside a decoder Sequence)."""
    return tokenizer.decoder is not None and "ByteLevel" in repr(tokenizer.decoder)
