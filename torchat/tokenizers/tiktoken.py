"""The Llama-3 tokenizer: a tiktoken ranks file (`tokenizer.model`, lines of "base64-token rank") plus the split
pattern and the 256 special tokens Meta's llama_models defines, run by the tiktoken library."""

import base64
import binascii
from pathlib import Path

import tiktoken

from torchat.errors import TorchatError
from torchat.tokenizers.base import Tokenizer, config_chat_template, read_tokenizer_config

# Meta's pre-tokenizer: contractions, letters with one leading non-letter, numbers in groups of up to three.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

LLAMA3_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)
LLAMA3_SPECIAL_TOKEN_COUNT = 256


def llama3_special_tokens(num_ranks: int) -> dict[str, int]:
    """The 256 special tokens after the ranks: the named ones, then `<|reserved_special_token_2|>` onwards."""
    reserved = LLAMA3_SPECIAL_TOKEN_COUNT - len(LLAMA3_NAMED_SPECIAL_TOKENS)
    names = [*LLAMA3_NAMED_SPECIAL_TOKENS, *(f"<|reserved_special_token_{2 + i}|>" for i in range(reserved))]
    return {name: num_ranks + i for i, name in enumerate(names)}


def read_ranks(path: Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken file; a TorchatError naming the line when one is malformed."""
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as error:
        raise TorchatError(f"{path}: cannot read the tokenizer ({error.strerror}); check --tokenizer-path") from None
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise TorchatError(f"{path}:{number}: not a tiktoken ranks line (expected 'BASE64 RANK'); pass a "
                               "Llama-3 tokenizer.model with --tokenizer-path") from None
    if not ranks:
        raise TorchatError(f"{path}: empty tiktoken file; pass a Llama-3 tokenizer.model with --tokenizer-path")
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: Path, encoding: tiktoken.Encoding, special_tokens: dict[str, int],
                 chat_template: str | None = None):
        super().__init__(path)
        self.encoding = encoding
        self._special = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        self._chat_template = chat_template

    @classmethod
    def load(cls, path: Path) -> "TiktokenTokenizer":
        ranks = read_ranks(path)
        special = llama3_special_tokens(len(ranks))
        encoding = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                     special_tokens=special)
        return cls(path, encoding, special, config_chat_template(read_tokenizer_config(path)))

    def encode_text(self, text: str) -> list[int]:
        # disallowed_special=() makes a typed "<|eot_id|>" plain characters instead of an error.
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def encode_with_special(self, text: str) -> list[int]:
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode([i for i in ids if i not in self._special_ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def bos_id(self) -> int:
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|end_of_text|>"]

    @property
    def add_bos(self) -> bool:
        return True

    @property
    def chat_template(self) -> str | None:
        return self._chat_template
