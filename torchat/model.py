"""The llama-family transformer: RMSNorm, RoPE, grouped-query attention, SwiGLU, a static KV cache.

Imports torch only. Weight names follow Meta/gpt-fast (`layers.0.attention.wq.weight`); the q/k rows use the
rotate-half rotary layout of Hugging Face checkpoints, and each checkpoint reader permutes into it.
The dtype and device of everything, the KV cache included, come from the parameters: there is no global.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    hidden_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 frequency scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads} and n_kv_heads {self.n_kv_heads} "
                             "must divide evenly")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model args {unknown}; allowed: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: Path) -> "ModelArgs":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 whatever the model dtype, as the reference implementations do
        xf = x.float()
        xf = xf * torch.rsqrt(self.mean_square(xf) + self.eps)
        return xf.type_as(x) * self.weight

    def mean_square(self, xf: torch.Tensor) -> torch.Tensor:
        """Over the last dim, kept (a backend's form may compute it another way)."""
        return xf.pow(2).mean(-1, keepdim=True)


def rope_frequencies(args: ModelArgs, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim), in the rotate-half layout."""
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / args.head_dim))
    if args.rope_scaling:
        inv_freq = _llama31_scale(inv_freq, **args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (seq, half)
    angles = torch.cat([angles, angles], dim=-1)  # (seq, head_dim)
    return angles.cos().float(), angles.sin().float()


def _llama31_scale(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                   original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.1's frequency scaling: long wavelengths slowed by `factor`, a smooth ramp between."""
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > low_wavelen, inv_freq / factor,
                       torch.where(wavelen < high_wavelen, inv_freq, blended))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               rotated: torch.Tensor | None = None) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim), or 4D broadcasting to x (a table for each
    head). rotated: x's rotate-half when the caller computes it another way."""
    if rotated is None:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
    cos, sin = (t[None, :, None, :] if t.dim() == 2 else t for t in (cos, sin))
    return (x.float() * cos + rotated.float() * sin).type_as(x)


class KVCache(nn.Module):
    """Static cache written at `input_pos`; (batch, kv_heads, max_seq_len, head_dim) per tensor."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # k, v: (batch, kv_heads, seq, head_dim); input_pos: (seq,)
        self.k_cache[:, :, input_pos] = k.to(self.k_cache.dtype)  # a no-op unless the cache holds another dtype
        self.v_cache[:, :, input_pos] = v.to(self.v_cache.dtype)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask, attend=None):
        return self.wo(self.attend(self.wq(x), self.wk(x), self.wv(x), cos, sin, input_pos, mask, attend))

    def attend(self, q, k, v, cos, sin, input_pos, mask, attend=None):
        """The projections' outputs (batch, seq, heads · head_dim) -> the heads' attention output, in the same shape
        as q (RoPE applied, the cache written where there is one)."""
        batch, seq, _ = q.shape
        dtype = q.dtype
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (batch, kv_heads, max_seq_len, head_dim)
            k, v = k[:, :, :attend].to(q.dtype), v[:, :, :attend].to(q.dtype)  # a cache may hold another dtype
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # torch's CPU attention kernel runs bf16/fp16 ~10x slower than fp32 (benchmarks/results/bench.md)
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv_heads)
        return y.to(dtype).transpose(1, 2).reshape(batch, seq, -1)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)  # down
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, input_pos, mask, attend=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, attend)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_frequencies(args, args.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len = 0
        # attend over the filled part of the cache only (see _attended_slots); off while a backend's own
        # attention (torchat.lowering.et) replaces the layers'
        self.filled_attention = True

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocate the KV caches (device of the weights; their dtype unless `dtype` is given); positions must stay
        below max_seq_len."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the model's {self.args.max_seq_len}")
        weight = self.layers[0].attention_norm.weight
        for layer in self.layers:
            # the layer's own KV heads: a tensor-parallel rank (torchat.parallel) holds only some of them
            attention = layer.attention
            attention.kv_cache = KVCache(max_batch_size, attention.n_kv_heads, max_seq_len,
                                         attention.head_dim, dtype or weight.dtype, weight.device)
        self.cache_len = max_seq_len

    def remove_caches(self) -> None:
        """Back to plain causal passes over whole sequences (no state between calls)."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_len = 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (batch, seq) at positions input_pos (seq,) -> logits (batch, seq, vocab), or with last_only the
        last position's (batch, 1, vocab): a prompt then skips the output layer for every other position.

        With caches set up, attention covers the whole cache under a causal mask built from input_pos, so
        one call prefills a prompt and the next decodes one token. Without caches it is a plain causal pass.
        """
        seq = tokens.shape[1]
        if input_pos is None:
            input_pos = torch.arange(seq, device=tokens.device)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        attend = None
        if self.cache_len:
            attend = self._attended_slots(input_pos)
            # (seq, attend): query at position p sees keys 0..p; stale slots beyond p stay hidden
            mask = torch.arange(attend, device=tokens.device)[None, :] <= input_pos[:, None]
        else:
            mask = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask, attend)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()

    def _attended_slots(self, input_pos: torch.Tensor):
        """How many cache slots attention reads: up to the last position written (positions ascend), so a step
        costs what the context holds, not the whole static cache (at SmolLM2's size the attention over 2048 slots
        cost more than its int4 weights). torch.compile'd decode keeps the whole cache: one static graph. In
        torch.export the count is a data-dependent size, bounded by the cache."""
        if not self.filled_attention or (torch.compiler.is_compiling() and not torch.compiler.is_exporting()):
            return self.cache_len
        end = input_pos[-1].item() + 1
        if torch.compiler.is_exporting():
            torch._check(end >= 1)
            torch._check(end <= self.cache_len)
        return end
