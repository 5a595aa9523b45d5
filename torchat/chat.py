"""A multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat format, finds how much of it the cache already
holds (the longest common prefix with the tokens fed so far) and prefills only the rest. When the context
would overflow, the oldest turns are dropped (with a notice) and the conversation is prefilled again.
"""

import sys
from collections.abc import Iterator

import torch

from torchat.errors import TorchatError
from torchat.generate import GenerationStats, Sampling, TextModel, generate
from torchat.templates import Message, render


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """One conversation on one model. `fed` mirrors the cache: the ids at positions 0 .. len(fed)-1."""

    def __init__(self, model: TextModel, tokenizer, template: str, sampling: Sampling, max_new_tokens: int,
                 system: str | None = None, generator: torch.Generator | None = None, notice=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampling, self.max_new_tokens, self.generator = sampling, max_new_tokens, generator
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.fed: list[int] = []
        self.last_prefill: list[int] = []  # what the last turn prefilled (new tokens only, when the cache held)
        self.stats = GenerationStats()
        self.notice = notice or (lambda text: print(text, file=sys.stderr))

    def _fit(self, messages: list[Message]) -> tuple[list[Message], list[int]]:
        """The conversation (oldest turns dropped as needed) whose prompt leaves room for an answer."""
        reserve = min(self.max_new_tokens, self.model.max_seq_len // 4)
        ids = render(self.tokenizer, self.template, messages)
        dropped = 0
        while len(ids) + reserve > self.model.max_seq_len:
            first_turn = 1 if messages and messages[0]["role"] == "system" else 0
            if len(messages) - first_turn <= 1:
                raise TorchatError(f"this message alone needs {len(ids)} tokens of the {self.model.max_seq_len}-"
                                   "token context; shorten it or raise --max-seq-length")
            # drop the oldest user turn and the answer that followed it
            messages = messages[:first_turn] + messages[first_turn + 2:]
            ids = render(self.tokenizer, self.template, messages)
            dropped += 1
        if dropped:
            self.notice(f"[context full: dropped the {dropped} oldest turn(s) to fit {self.model.max_seq_len} tokens]")
        return messages, ids

    def reply(self, text: str) -> Iterator[int]:
        """Yield the answer's token ids (without the stop token) as they are produced."""
        messages, ids = self._fit([*self.messages, {"role": "user", "content": text}])
        start = min(common_prefix(self.fed, ids), len(ids) - 1)  # prefill at least one token for its logits
        self.last_prefill = ids[start:]
        self.stats = GenerationStats()
        produced: list[int] = []
        try:
            for token in generate(self.model, ids[start:], self.max_new_tokens, self.sampling,
                                  self.tokenizer.stop_ids, start_pos=start, stats=self.stats,
                                  generator=self.generator):
                produced.append(token)
                if token not in self.tokenizer.stop_ids:
                    yield token
        finally:
            # every yielded token but the last went through the model; an interrupted prefill fed nothing new
            self.fed = ids + produced[:-1] if produced else ids[:start]
            answer = self.tokenizer.decode([t for t in produced if t not in self.tokenizer.stop_ids])
            self.messages = [*messages, {"role": "assistant", "content": answer}]
