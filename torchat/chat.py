"""`torchat chat`: a multi-turn conversation that keeps its KV cache between turns.

Each turn renders the whole conversation with the model's chat format, finds how much of it the cache already
holds (the longest common prefix with the tokens fed so far) and prefills only the rest. When the context
would overflow, the oldest turns are dropped (with a notice) and the conversation is prefilled again.
"""

import argparse
import sys
from collections.abc import Iterator

import torch

from torchat.errors import TorchatError
from torchat.generate import GenerationStats, Sampling, TextModel, generate
from torchat.templates import Message, pick_template, render


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


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from torchat.loader import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--chat-template", help="jinja (the tokenizer's own), llama3 or llama2; chosen from the "
                                                "tokenizer when omitted")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer, in tokens")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="the context (KV cache) length (default: 2048 eager, an artifact's own)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile-prefill", action="store_true")
    parser.add_argument("--stats", action="store_true", help="a stats line on stderr after each answer")


def run(args: argparse.Namespace) -> int:
    from torchat.loader import load_text_model
    from torchat.tokenizers import StreamDecoder

    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    text_model, tokenizer = load_text_model(args, args.max_seq_length or 2048)
    template = pick_template(tokenizer, args.chat_template)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    session = ChatSession(text_model, tokenizer, template, sampling, args.max_new_tokens, args.system, generator)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"torchat chat ({template} format, {text_model.max_seq_len}-token context). Ctrl-C stops an answer, "
              "Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if not line.strip():
            continue
        decoder = StreamDecoder(tokenizer)
        try:
            for token in session.reply(line):
                sys.stdout.write(decoder.add(token))
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        if args.stats:
            print(session.stats.summary(text_model.device), file=sys.stderr)
