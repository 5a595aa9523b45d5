"""The model side of serving: a cache of `slots` sequences, each prefilled alone and decoded together.

Two kinds behind one interface (`Slots`):
- `BatchedSlots`: an eager Transformer whose KV cache has one row per slot (`setup_caches(slots, max_seq_len)`).
  `forward_rows` runs the model's own modules (norms, projections, feed-forward, quantized or not) for rows of
  the cache that sit at different positions, so the active requests decode as one batch of `(B, 1)` tokens.
- `SingleSlot`: any `TextModel` (an exported .pt2/.so/.pte, whose graph is fixed to batch 1, or a compiled eager
  model): one slot, the artifact's own cache; requests take turns.

Each slot remembers the tokens its cache holds, so a request that continues a conversation prefills only what
the cache does not hold yet (the longest common prefix, as torchat.chat does across turns).
"""

import torch
import torch.nn.functional as F

from torchat.generate import TextModel


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """torchat.model.apply_rope with a position per row: x (batch, seq, heads, head_dim), cos/sin (batch, seq,
    head_dim). The same operations in the same order, so one row gives the model's own numbers."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos[:, :, None, :] + rotated.float() * sin[:, :, None, :]).type_as(x)


def _cache_rows(buffer: torch.Tensor, rows: list[int], attend: int) -> torch.Tensor:
    """(len(rows), kv_heads, attend, head_dim): a view when the rows are consecutive (the usual case: slots are
    handed out lowest first), else a gathered copy."""
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return buffer[first:first + len(rows), :, :attend]
    return buffer[torch.tensor(rows, device=buffer.device), :, :attend]


@torch.inference_mode()
def forward_rows(model, tokens: torch.Tensor, positions: torch.Tensor, rows: list[int],
                 last_only: bool = False) -> torch.Tensor:
    """tokens (batch, seq) at positions (batch, seq) (ascending within a row) written into cache rows `rows` ->
    logits (batch, seq, vocab) float32, or with last_only the last position's (batch, 1, vocab). The model's caches
    must be set up with at least max(rows)+1 rows.

    Torchat.model.Transformer.forward with one position vector per row: each row attends over its own cache row
    up to its own position; rows with shorter contexts see the extra slots masked out.
    """
    batch, seq = tokens.shape
    attend = int(positions.max()) + 1
    assert attend <= model.cache_len, f"position {attend - 1} beyond the cache of {model.cache_len}"
    cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (batch, seq, head_dim)
    # (batch, 1, seq, attend): a query at position p sees keys 0..p of its own row
    mask = (torch.arange(attend, device=tokens.device)[None, None, :] <= positions[:, :, None])[:, None]
    index = torch.tensor(rows, device=tokens.device)[:, None].expand(batch, seq)  # (batch, seq)
    # one row (a prefill, or a decode alone) holds consecutive positions: a slice write, cheaper than index_put
    first = int(positions[0, 0]) if batch == 1 else None
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        attention, x = layer.attention, layer.attention_norm(h)
        heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        q = _rotate(attention.wq(x).view(batch, seq, heads, head_dim), cos, sin)
        k = _rotate(attention.wk(x).view(batch, seq, kv_heads, head_dim), cos, sin)
        v = attention.wv(x).view(batch, seq, kv_heads, head_dim)
        cache = attention.kv_cache
        if first is not None:
            cache.k_cache[rows[0], :, first:first + seq] = k[0].transpose(0, 1)
            cache.v_cache[rows[0], :, first:first + seq] = v[0].transpose(0, 1)
        else:
            # advanced indices on dims 0 and 2 select (batch, seq, kv_heads, head_dim): k's own layout
            cache.k_cache[index, :, positions] = k
            cache.v_cache[index, :, positions] = v
        keys, values = _cache_rows(cache.k_cache, rows, attend), _cache_rows(cache.v_cache, rows, attend)
        q = q.transpose(1, 2)  # (batch, heads, seq, head_dim)
        if q.device.type == "cpu" and q.dtype != torch.float32:
            # as torchat.model.Attention: torch's CPU attention runs bf16/fp16 far slower than fp32
            q, keys, values = q.float(), keys.float(), values.float()
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=heads != kv_heads)
        h = h + attention.wo(y.type_as(x).transpose(1, 2).reshape(batch, seq, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    if last_only:
        h = h[:, -1:]
    return model.output(model.norm(h)).float()


class Slots:
    """`count` cache rows of `max_seq_len` positions; `held[i]` lists the token ids row i holds at 0..len-1."""

    count: int
    max_seq_len: int
    device: torch.device

    def __init__(self, count: int):
        self.held: list[list[int]] = [[] for _ in range(count)]

    def prefill(self, slot: int, tokens: list[int], start: int) -> torch.Tensor:
        """Feed `tokens` at positions start.. into `slot` -> logits (vocab,) of the last one."""
        raise NotImplementedError

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token per slot at its position -> logits (len(slots), vocab)."""
        raise NotImplementedError


class BatchedSlots(Slots):
    """An eager Transformer with one KV cache row per slot; `decode` runs all active rows as one batch."""

    def __init__(self, model, count: int, max_seq_len: int):
        super().__init__(count)
        self.model, self.count, self.max_seq_len = model, count, max_seq_len
        self.device = next(model.parameters()).device
        model.setup_caches(count, max_seq_len)  # (count, kv_heads, max_seq_len, head_dim) per layer

    def prefill(self, slot, tokens, start):
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(tokens), device=self.device)[None]
        return forward_rows(self.model, ids, positions, [slot], last_only=True)[0, -1]

    def decode(self, slots, tokens, positions):
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        at = torch.tensor(positions, dtype=torch.long, device=self.device)[:, None]
        return forward_rows(self.model, ids, at, slots)[:, -1]


class SingleSlot(Slots):
    """Any TextModel (batch 1): one slot, its own cache."""

    def __init__(self, text_model: TextModel):
        super().__init__(1)
        self.text_model, self.count = text_model, 1
        self.max_seq_len, self.device = text_model.max_seq_len, text_model.device

    def prefill(self, slot, tokens, start):
        from torchat.generate import prefill

        return prefill(self.text_model, tokens, start)

    def decode(self, slots, tokens, positions):
        from torchat.generate import decode_one_token

        return decode_one_token(self.text_model, tokens[0], positions[0])[None]


def open_slots(opened, count: int) -> Slots:
    """Slots for an opened model (torchat.model_source.OpenedModel): batched rows for an eager model decoded
    eagerly, one slot for an exported artifact or a compiled decode (whose graph holds batch 1)."""
    from torchat.generate import EagerModel

    text_model = opened.text_model
    if isinstance(text_model, EagerModel) and not text_model.compiled and count > 1:
        return BatchedSlots(text_model.model, count, text_model.max_seq_len)
    return SingleSlot(text_model)
