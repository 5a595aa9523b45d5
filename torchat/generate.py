"""Generation as a handful of small functions: sample, prefill, decode one token, generate.

Works on any `TextModel` (an eager Transformer with its cache, or an exported artifact loaded behind the same
interface), so generate, chat and eval behave the same whatever runs the forward pass.
"""

import resource
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from torchat.errors import TorchatError


class TextModel(Protocol):
    """What generation needs: logits for tokens at positions, with the KV cache held inside."""

    max_seq_len: int  # positions 0 .. max_seq_len-1 fit in the cache
    device: torch.device

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """tokens (1, seq) int64, input_pos (seq,) int64 -> logits (1, seq, vocab) float32; with last_only the last
        position's (1, 1, vocab), which generation asks for (a prompt's other positions need no output layer)."""


class EagerModel:
    """A Transformer with its static cache, optionally with torch.compile'd decode and prefill.

    gpt-fast's split: decode (seq 1) compiles as one static graph; prefill compiles with dynamic=True so
    that every prompt length shares one graph.
    """

    def __init__(self, model, max_seq_len: int, compile: bool = False, compile_prefill: bool = False):
        self.model = model
        self.max_seq_len = max_seq_len
        self.device = next(model.parameters()).device
        model.setup_caches(1, max_seq_len)
        self.compiled = compile
        self._decode = torch.compile(model, fullgraph=True, dynamic=False) if compile else model
        self._prefill = torch.compile(model, fullgraph=True, dynamic=True) if compile_prefill else model

    def fit(self, positions: int) -> None:
        """Shrink the cache to `positions` before the first call: a compiled decode attends over the whole
        static cache, so a short generation should not carry a long one."""
        if positions < self.max_seq_len:
            self.max_seq_len = positions
            self.model.setup_caches(1, positions)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        run = self._decode if tokens.shape[1] == 1 else self._prefill
        return run(tokens, input_pos, last_only=last_only)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1) or (
                self.top_k is not None and self.top_k < 1):
            raise TorchatError(f"bad sampling settings {self}: need temperature >= 0, top-k >= 1, 0 < top-p <= 1")


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """One token id from logits (vocab,)."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.numel():
        kth = torch.topk(logits, sampling.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already hold top_p of the mass; the first always stays
        drop = (cumulative - sorted_logits.softmax(-1)) >= sampling.top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when the prefill's token was ready
    end: float | None = None

    @property
    def time_to_first_token(self) -> float:
        return (self.first_token or time.perf_counter()) - self.start

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.time_to_first_token, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from prefill; decode produced the rest
        decoded = self.new_tokens - 1
        return decoded / max((self.end or time.perf_counter()) - (self.first_token or self.start), 1e-9)

    def summary(self, device: torch.device) -> str:
        return (f"prompt {self.prompt_tokens} tok, generated {self.new_tokens} tok | time to first token "
                f"{self.time_to_first_token:.3f} s | prefill {self.prefill_tok_s:.1f} tok/s | decode "
                f"{self.decode_tok_s:.2f} tok/s | peak memory {peak_memory_mib(device):.0f} MiB")


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory on cuda, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prefill(model: TextModel, prompt: list[int], start_pos: int) -> torch.Tensor:
    """Run the whole prompt in one call; logits (vocab,) of its last position."""
    tokens = torch.tensor([prompt], dtype=torch.long, device=model.device)
    input_pos = torch.arange(start_pos, start_pos + len(prompt), device=model.device)
    return model.forward(tokens, input_pos, last_only=True)[0, -1]


def decode_one_token(model: TextModel, token: int, pos: int) -> torch.Tensor:
    tokens = torch.tensor([[token]], dtype=torch.long, device=model.device)
    return model.forward(tokens, torch.tensor([pos], device=model.device), last_only=True)[0, -1]


def generate(model: TextModel, prompt: list[int], max_new_tokens: int, sampling: Sampling,
             stop_ids: set[int] = frozenset(), start_pos: int = 0, stats: GenerationStats | None = None,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids; the prompt sits at positions start_pos.. (chat reuses the cache before it).

    Stops after max_new_tokens, at a stop id (which is yielded), or when the cache is full.
    """
    if not prompt:
        raise TorchatError("the prompt is empty; pass --prompt TEXT")
    end_of_prompt = start_pos + len(prompt)
    if end_of_prompt > model.max_seq_len:
        raise TorchatError(f"the prompt ends at position {end_of_prompt}, beyond the context of "
                           f"{model.max_seq_len} tokens; shorten it or raise --max-seq-length")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    budget = min(max_new_tokens, model.max_seq_len - end_of_prompt + 1)
    if budget <= 0:
        return
    token = sample(prefill(model, prompt, start_pos), sampling, generator)
    stats.first_token = time.perf_counter()
    pos = end_of_prompt
    for produced in range(1, budget + 1):
        stats.new_tokens, stats.end = produced, time.perf_counter()
        yield token
        if token in stop_ids or produced == budget:
            return
        token = sample(decode_one_token(model, token, pos), sampling, generator)
        pos += 1


def generate_text(opened, prompt_text: str, max_new_tokens: int, sampling: Sampling,
                  generator: torch.Generator | None = None, *, bos: bool | None = None,
                  write=lambda text: None, fit_cache: bool = False) -> GenerationStats:
    """Complete `prompt_text` with an opened model (torchat.model_source.OpenedModel), passing the prompt and
    then each new piece of text to `write` as it is decoded; the stop token is not written. With `fit_cache`, a
    compiled eager model's cache is cut to what this generation needs."""
    from torchat.tokenizers import StreamDecoder

    model, tokenizer = opened.text_model, opened.tokenizer
    prompt = tokenizer.encode(prompt_text, bos=tokenizer.add_bos if bos is None else bos)
    if fit_cache and getattr(model, "compiled", False):
        model.fit(min(len(prompt) + max_new_tokens, model.max_seq_len))
    stats = GenerationStats()
    decoder = StreamDecoder(tokenizer)
    write(prompt_text)
    for token in generate(model, prompt, max_new_tokens, sampling, tokenizer.stop_ids, stats=stats,
                          generator=generator):
        if token in tokenizer.stop_ids:
            break
        write(decoder.add(token))
    write(decoder.flush() + "\n")
    return stats
