"""The one tokenizer interface every kind implements, and the streaming decoder that generation uses.

A tokenizer turns text into ids and back. `encode` never turns text into a special id: a user who types
`<|im_start|>` gets the ids of those characters. Only a caller that builds a prompt from a chat template passes
`allow_special=True`, which encodes each special token's text as its single id.
"""

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

from torchat.errors import TorchatError

# Tokens that end a turn in the chat formats we know; any of them that a vocabulary marks special joins
# `stop_ids` next to EOS (llama.cpp's end-of-generation set works the same way).
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>", "<end_of_turn>", "<|end_of_text|>",
    "</s>",
)


class Tokenizer(ABC):
    """What generation, chat and the exporters need from a tokenizer, whatever file it came from.

    path: the file it was loaded from (named in errors).
    kind: the key of its class in `torchat.tokenizers.TOKENIZERS`.
    """

    kind: str = ""

    def __init__(self, path: Path, extra_stop_ids: frozenset[int] = frozenset()):
        self.path = Path(path)
        self.extra_stop_ids = frozenset(extra_stop_ids)  # end-of-turn ids the file names (a GGUF's eot/eom)

    # --- what each kind implements -------------------------------------------------------------------------

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """The ids of `text` taken as plain text: special tokens' spellings are never matched."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of `ids`; special tokens (BOS, EOS, `<|im_end|>`...) contribute nothing."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary's own spelling of a token: `▁the`, `<0x0A>`, `Ġthe`, `<|eot_id|>`."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of text one token stands for (`▁the` -> b" the", `<0x0A>` -> b"\\n", `Ġthe` -> b" the").

        A special token gives its spelling (b"<|eot_id|>"), which is what a runner needs to match it in a
        template; `decode` drops it instead.
        """

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """The number of ids, special tokens included (the model's embedding may be larger, never smaller)."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special (control) token spelling -> id: the tokens `allow_special=True` matches in text."""

    @property
    def bos_id(self) -> int | None:
        return None

    @property
    def eos_id(self) -> int | None:
        return None

    @property
    def add_bos(self) -> bool:
        """Whether this model's own tooling puts BOS before a prompt (a GGUF's add_bos flag, for example)."""
        return False

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the tokenizer's files carry, or None."""
        return None

    # --- shared behaviour --------------------------------------------------------------------------------------

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus the end-of-turn tokens the vocabulary has."""
        specials = self.special_tokens
        ids = {specials[name] for name in END_OF_TURN_TOKENS if name in specials} | self.extra_stop_ids
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return frozenset(ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """The ids of `text`, with BOS/EOS around them on request.

        allow_special: encode the spelling of each special token (`<|im_start|>`) as its one id; for prompts
        built from a chat template, never for text a user typed.
        """
        ids = self.encode_with_special(text) if allow_special else self.encode_text(text)
        if bos:
            ids = [self._require_id(self.bos_id, "BOS"), *ids]
        if eos:
            ids = [*ids, self._require_id(self.eos_id, "EOS")]
        return ids

    def encode_with_special(self, text: str) -> list[int]:
        """Special tokens' spellings as their ids, the text between them as plain text.

        Each stretch between special tokens is encoded on its own, as llama.cpp does; kinds whose library
        splits on special tokens itself override this.
        """
        ids: list[int] = []
        for part in split_special(text, self.special_tokens):
            ids.extend([part] if isinstance(part, int) else self.encode_text(part))
        return ids

    def _require_id(self, token_id: int | None, name: str) -> int:
        if token_id is None:
            raise TorchatError(f"{self.path}: this tokenizer has no {name} token; encode without it, or pass a "
                               "tokenizer that defines one (tokenizer_config.json beside tokenizer.json)")
        return token_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, vocab_size={self.vocab_size})"


def split_special(text: str, special_tokens: dict[str, int]) -> list[str | int]:
    """`text` cut at the special tokens' spellings: plain stretches as str, special tokens as their id."""
    if not special_tokens:
        return [text] if text else []
    # Longest first, so that `<|end|>` never wins over `<|endoftext|>` where both match.
    pattern = re.compile("|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True)))
    parts: list[str | int] = []
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            parts.append(text[start:match.start()])
        parts.append(special_tokens[match.group()])
        start = match.end()
    if start < len(text):
        parts.append(text[start:])
    return parts


class StreamDecoder:
    """Turns ids arriving one at a time into text, holding back what is not yet complete.

    It decodes a short window of recent ids with the tokenizer's own `decode`, so every kind's rules (the
    sentencepiece leading space, byte fallback, byte-level BPE) apply exactly; text that ends in U+FFFD is an
    unfinished UTF-8 sequence and waits for the next id. `"".join(add(i) for i in ids) + flush()` equals
    `decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: one token before the last emitted ones
        self.read_offset = 0  # ids before this one have been emitted

    def add(self, token_id: int) -> str:
        """The new complete text that `token_id` adds (often "", for a token inside a multi-byte character)."""
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        # Decoding from a token boundary inside the window, not from its start, keeps the sentencepiece
        # rule "drop the first leading space" the same in both strings.
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]


def read_tokenizer_config(path: Path) -> dict:
    """The tokenizer_config.json beside a tokenizer file (chat template, BOS/EOS names), or {} when absent."""
    config_path = path.parent / "tokenizer_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TorchatError(f"{config_path}: not readable JSON ({error}); fix or remove the file") from None
    if not isinstance(config, dict):
        raise TorchatError(f"{config_path}: expected a JSON object; fix or remove the file")
    return config


def config_chat_template(config: dict) -> str | None:
    """The chat template of a tokenizer_config.json: a string, or a list of named ones of which "default" wins."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def config_token(config: dict, key: str) -> str | None:
    """A token named in a tokenizer_config.json (`"bos_token": "<s>"` or `{"content": "<s>", ...}`)."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
