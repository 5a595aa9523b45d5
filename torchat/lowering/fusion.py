"""A transformer layer on torchat's linear kernels with the rest of the layer fused into their calls, for the
lowerings that run those kernels: ExecuTorch (torchat.lowering.et, whose attention is its own op) and AOT Inductor on
CPU (`kernel_layers`: the model's own attention, which Inductor compiles between the calls).
"""

from contextlib import contextmanager

import torch
from torch import nn

from torchat.model import Attention, Transformer, TransformerBlock
from torchat.quant.base import QuantizedModule


def fused_linear(linears: list[nn.Module]) -> nn.Module | None:
    """Linears that read one input as one linear, their outputs side by side; None where their kinds differ or
    the kind has no such form (torchat.quant.base.QuantizedModule.concatenated)."""
    first = linears[0]
    if any(type(m) is not type(first) for m in linears):
        return None
    if type(first) is nn.Linear and all(m.bias is None for m in linears):
        fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=False, device="meta")
        fused.weight = nn.Parameter(torch.cat([m.weight for m in linears]), requires_grad=False)
        return fused
    return first.concatenated(linears) if isinstance(first, QuantizedModule) else None


def on_one_kernel(linears: list) -> bool:
    """Whether the linears all run on one of torchat's kernels (`runs_on_kernel`), all of one kind."""
    return all(getattr(m, "runs_on_kernel", False) for m in linears) and len({type(m) for m in linears}) == 1


class KernelBlock(nn.Module):
    """A transformer layer whose linears all run on one of torchat's kernels (8da4w on the asymmetric grid:
    torchat::linear_q4; 8da8w: torchat::linear_q8; int4 on CPU: torchat::linear_w4; torchat/kernels), as four calls
    with the rest of the layer fused into them: the attention norm into the q/k/v projection, the residual into wo
    and w2, the feed-forward norm and SiLU gate into w1 and w3 (one projection). Between them only the attention
    (RoPE, the cache writes, the SDPA) is left, so a decode step makes a few calls a layer where the linears apart
    from their norms, gate and adds made fifteen (SmolLM2 .pte, AVX2-emulated: the step's time outside the linears'
    arithmetic went to calls; a .pt2 runs each of those small ops as an OpenMP region of its own)."""

    def __init__(self, block: TransformerBlock, attention: nn.Module):
        """block: the layer; attention: its attention with one q/k/v projection, `wqkv`, and `attend(qkv, cos, sin,
        input_pos, mask, attend)` for the rest (torchat.lowering.et.CachedAttention, ProjectedAttention)."""
        super().__init__()
        self.attention, self.wo = attention, attention.wo
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        feed_forward = block.feed_forward
        self.w13, self.w2 = fused_linear([feed_forward.w1, feed_forward.w3]), feed_forward.w2

    @classmethod
    def of(cls, block: TransformerBlock, attention: nn.Module) -> "KernelBlock | None":
        """The layer as a KernelBlock, or None unless all its linears run on one of the kernels."""
        feed_forward = block.feed_forward
        return cls(block, attention) if on_one_kernel([attention.wqkv, attention.wo, feed_forward.w1,
                                                       feed_forward.w2, feed_forward.w3]) else None

    def forward(self, x, cos, sin, input_pos, mask, attend=None):
        attention = self.attention
        qkv = attention.wqkv(x, norm=self.attention_norm.weight, eps=self.attention_norm.eps)
        h = self.wo(attention.attend(qkv, cos, sin, input_pos, mask, attend), residual=x)
        gated = self.w13(h, norm=self.ffn_norm.weight, eps=self.ffn_norm.eps, gated=True)
        return self.w2(gated, residual=h)


class ProjectedAttention(nn.Module):
    """The model's attention with its q, k and v projections as one (`wqkv`, None where they have no such form), for
    KernelBlock: `attend` splits the projection's output and runs the model's own attention on it."""

    def __init__(self, attention: Attention):
        super().__init__()
        projections = [attention.wq, attention.wk, attention.wv]
        self.inner, self.wqkv, self.wo = attention, fused_linear(projections), attention.wo
        self.sizes = [p.out_features for p in projections]

    def attend(self, qkv, cos, sin, input_pos, mask, attend=None):
        return self.inner.attend(*qkv.split(self.sizes, dim=-1), cos, sin, input_pos, mask, attend)


@contextmanager
def kernel_layers(model: Transformer):
    """While an AOTI artifact is exported: every layer whose linears all run on one of torchat's kernels (on CPU) as
    a KernelBlock, its attention the model's own; then the model as it was. A layer that does not qualify (float,
    other schemes, CUDA's) stays as it is."""
    blocks = list(model.layers)
    try:
        for i, block in enumerate(blocks):
            attention, feed_forward = block.attention, block.feed_forward
            linears = [attention.wq, attention.wk, attention.wv, attention.wo, feed_forward.w1, feed_forward.w2,
                       feed_forward.w3]
            # checked before the projections are concatenated (a float layer's would be a copy of its weights)
            if block.attention_norm.weight.device.type == "cpu" and on_one_kernel(linears):
                model.layers[i] = KernelBlock.of(block, ProjectedAttention(attention)) or block
        yield model
    finally:
        for i, block in enumerate(blocks):
            model.layers[i] = block
