"""How a Transformer is split over N ranks, decided from its ModelArgs alone, and the rank's own model.

Megatron's split, which `torch.distributed.tensor.parallel`'s ColwiseParallel/RowwiseParallel name: in each block
wq/wk/wv and w1/w3 are split by output rows (column-parallel: a rank computes its heads, its part of the hidden
dim, from the whole input), wo and w2 by input columns (row-parallel: a rank's partial product; one all-reduce sums
them). Each rank's KV cache holds its own KV heads. The embedding and the output head are split by vocabulary rows
(an all-reduce of the embedding's masked lookups, an all-gather of the logits). Norms and rotary tables are
replicated.

Where the shapes do not divide by N:
- n_kv_heads % N (GQA with fewer or odd KV heads, n_heads % N == 0): each KV head is repeated `kv_repeat` times, to
  lcm(n_kv_heads, N) heads, so that every rank holds the KV heads its query heads read. Exact: the repeats are copies;
  it costs KV cache and wk/wv memory (at most N / n_kv_heads times theirs).
- n_heads % N (SmolLM2-135M's 9 heads on 2 ranks): the attention is replicated, every rank holds and computes all of
  it (no collective); the MLP and the vocabulary are still split.
- hidden_dim % N: refused (no even split of the MLP).
- vocab_size % N: the embedding and head are replicated.

With `whole_rows` (int8 per channel, whose CPU kernel rounds each dot product to bf16: partial sums would be rounded
twice and greedy tokens drift from one process's), wo and w2 are split by output rows instead, over their input
all-gathered: every output is one whole dot product, as in one process. Two all-gathers replace the all-reduce.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from torchat.checkpoint.sliced import WHOLE, Slice
from torchat.errors import TorchatError
from torchat.model import ModelArgs, Transformer, rope_frequencies


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds of a model of `args` (see the module docstring for the choices)."""

    args: ModelArgs
    world: int
    rank: int
    attention: bool   # heads split over the ranks (False: the attention is replicated)
    kv_repeat: int    # each KV head repeated this many times before the split (1: none)
    vocab: bool       # embedding and head split by vocabulary rows (False: replicated)
    whole_rows: bool = False  # wo and w2 split by output rows over an all-gathered input (see the module docstring)

    @classmethod
    def for_model(cls, args: ModelArgs, world: int, rank: int, whole_rows: bool = False) -> "ShardPlan":
        assert 0 <= rank < world, (rank, world)
        if args.hidden_dim % world:
            raise TorchatError(f"--tp {world}: the MLP's hidden dim {args.hidden_dim} does not split into {world} "
                               f"equal parts; use a --tp that divides {args.hidden_dim}")
        if whole_rows and args.dim % world:
            raise TorchatError(f"--tp {world}: the model dim {args.dim} does not split into {world} equal parts "
                               "(int8 per channel splits wo and w2 by output rows); use a --tp that divides it")
        attention = args.n_heads % world == 0
        kv_repeat = math.lcm(args.n_kv_heads, world) // args.n_kv_heads if attention else 1
        return cls(args, world, rank, attention, kv_repeat, args.vocab_size % world == 0, whole_rows)

    @property
    def local_heads(self) -> int:
        return self.args.n_heads // self.world if self.attention else self.args.n_heads

    @property
    def local_kv_heads(self) -> int:
        kv = self.args.n_kv_heads * self.kv_repeat
        return kv // self.world if self.attention else kv

    @property
    def local_hidden(self) -> int:
        return self.args.hidden_dim // self.world

    @property
    def vocab_range(self) -> tuple[int, int]:
        if not self.vocab:
            return 0, self.args.vocab_size
        size = self.args.vocab_size // self.world
        return self.rank * size, (self.rank + 1) * size

    def describe(self) -> str:
        a = self.args
        if self.attention:
            attention = f"{self.local_heads} of {a.n_heads} heads, {self.local_kv_heads} KV heads"
            if self.kv_repeat > 1:
                attention += f" ({a.n_kv_heads} KV heads repeated {self.kv_repeat}x: they do not divide {self.world})"
        else:
            attention = f"replicated ({a.n_heads} heads do not divide {self.world})"
        vocab = f"rows {self.vocab_range[0]}..{self.vocab_range[1]}" if self.vocab else \
            f"replicated ({a.vocab_size} does not divide {self.world})"
        split = "; wo/w2 by output rows" if self.whole_rows else ""
        return (f"rank {self.rank}/{self.world}: attention {attention}; MLP {self.local_hidden} of {a.hidden_dim}; "
                f"vocabulary {vocab}{split}")

    def slices(self) -> dict[str, Slice]:
        """Canonical tensor name -> what this rank reads (no `output.weight` when the embeddings are tied)."""
        a, hd = self.args, self.args.head_dim
        start, stop = self.vocab_range
        vocab = Slice.span(0, start, stop) if self.vocab else WHOLE
        out = {"tok_embeddings.weight": vocab, "norm.weight": WHOLE}
        if not a.tie_embeddings:
            out["output.weight"] = vocab
        q_rows, kv_rows, wo_cols = WHOLE, WHOLE, WHOLE
        if self.attention:
            q0 = self.rank * self.local_heads
            q_rows = Slice.span(0, q0 * hd, (q0 + self.local_heads) * hd)
            wo_cols = self._output_rows() if self.whole_rows else Slice.span(1, q0 * hd, (q0 + self.local_heads) * hd)
            # local KV head j of the repeated set is the file's head j // kv_repeat
            first = self.rank * self.local_kv_heads
            heads = [j // self.kv_repeat for j in range(first, first + self.local_kv_heads)]
            kv_rows = Slice(0, tuple((h * hd, (h + 1) * hd) for h in heads))
        h0 = self.rank * self.local_hidden
        hidden_rows = Slice.span(0, h0, h0 + self.local_hidden)
        hidden_cols = self._output_rows() if self.whole_rows else Slice.span(1, h0, h0 + self.local_hidden)
        for i in range(a.n_layers):
            p = f"layers.{i}."
            out |= {p + "attention_norm.weight": WHOLE, p + "ffn_norm.weight": WHOLE,
                    p + "attention.wq.weight": q_rows, p + "attention.wk.weight": kv_rows,
                    p + "attention.wv.weight": kv_rows, p + "attention.wo.weight": wo_cols,
                    p + "feed_forward.w1.weight": hidden_rows, p + "feed_forward.w3.weight": hidden_rows,
                    p + "feed_forward.w2.weight": hidden_cols}
        return out

    def _output_rows(self) -> Slice:
        rows = self.args.dim // self.world
        return Slice.span(0, self.rank * rows, (self.rank + 1) * rows)

    def row_parallel(self) -> list[str]:
        """The modules that take a split input: partial sums over the ranks (all-reduced), or with `whole_rows`
        whole rows of the output over the all-gathered input."""
        names = [f"layers.{i}.feed_forward.w2" for i in range(self.args.n_layers)]
        if self.attention:
            names += [f"layers.{i}.attention.wo" for i in range(self.args.n_layers)]
        return names


class VocabShardEmbedding(nn.Module):
    """The rows [start, start + rows) of an embedding table: a token outside them looks up zeros, so the sum over
    the ranks (an all-reduce, as DTensor's RowwiseParallel embedding does) is the whole table's lookup. The table
    is a child (`embedding`) so that the embedding quantizer finds it."""

    def __init__(self, start: int, rows: int, dim: int):
        super().__init__()
        self.start, self.rows = start, rows
        self.embedding = nn.Embedding(rows, dim)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.rows)
        h = self.embedding(local.masked_fill(outside, 0))  # (batch, seq, dim)
        return h.masked_fill(outside[..., None], 0)


def build_local_transformer(plan: ShardPlan) -> Transformer:
    """This rank's Transformer on the meta device: its modules have the local shapes, its attention the local head
    counts; `load_local_state_dict` gives it weights."""
    a, hd = plan.args, plan.args.head_dim
    with torch.device("meta"):
        model = Transformer(a)
        for layer in model.layers:
            attention, ffn = layer.attention, layer.feed_forward
            attention.n_heads, attention.n_kv_heads = plan.local_heads, plan.local_kv_heads
            attention.wq = nn.Linear(a.dim, plan.local_heads * hd, bias=False)
            attention.wk = nn.Linear(a.dim, plan.local_kv_heads * hd, bias=False)
            attention.wv = nn.Linear(a.dim, plan.local_kv_heads * hd, bias=False)
            if plan.attention and plan.whole_rows:
                attention.wo = nn.Linear(a.n_heads * hd, a.dim // plan.world, bias=False)
            else:
                attention.wo = nn.Linear(plan.local_heads * hd, a.dim, bias=False)
            ffn.w1 = nn.Linear(a.dim, plan.local_hidden, bias=False)
            ffn.w3 = nn.Linear(a.dim, plan.local_hidden, bias=False)
            ffn.w2 = nn.Linear(a.hidden_dim, a.dim // plan.world, bias=False) if plan.whole_rows else \
                nn.Linear(plan.local_hidden, a.dim, bias=False)
        start, stop = plan.vocab_range
        if plan.vocab:
            model.tok_embeddings = VocabShardEmbedding(start, stop - start, a.dim)
        model.output = nn.Linear(a.dim, stop - start, bias=False)
    return model


def load_local_state_dict(model: Transformer, plan: ShardPlan, tensors: dict[str, torch.Tensor],
                          device: str) -> Transformer:
    """Assign this rank's tensors (canonical names, local shapes) to the meta model built by
    `build_local_transformer`; ties the head to the embedding rows as the model does."""
    state_dict = dict(tensors)
    if plan.vocab:
        state_dict["tok_embeddings.embedding.weight"] = state_dict.pop("tok_embeddings.weight")
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (plan.args.tie_embeddings and k == "output.weight")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
    if plan.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.rope_cos, model.rope_sin = rope_frequencies(plan.args, plan.args.max_seq_len)
    return model.to(device=device).eval()
