"""int8 weight-only linear, symmetric: one scale per output channel (group_size 0) or per group of inputs.

Written here rather than taken from torchao: `Int8WeightOnlyConfig` runs 10x slower than fp32 on this CPU
(notes/library-feasibility.md). Channel-wise runs `aten._weight_int8pack_mm`, which is fast only with bf16
activations (52 us against fp32 F.linear's 72 us for 1536x576 at M=1, one thread; 725 us with fp32
activations), so an fp32 model computes these matmuls in bf16 and casts back. Group-wise has no kernel: it
multiplies by the dequantized weight (slow in eager; torch.compile fuses the dequantization).
"""

import torch
import torch.nn.functional as F

from torchat.quant.base import QuantizedModule, group_view, pad_columns, padded_size

CPU_COMPUTE_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def quantize_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (out, in) in [-127, 127], scale float32 (out, groups)); w's in % group_size == 0."""
    grouped = group_view(w.float(), group_size)
    scale = (grouped.abs().amax(-1) / 127).clamp(min=1e-10)
    codes = torch.round(grouped / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(w.shape), scale


class Int8WeightOnlyLinear(QuantizedModule):
    """Buffers qdata (out, padded_in) int8 and scale (out, groups); the plain form is the runtime form."""

    kind = "int8_weight_only"

    def __init__(self, in_features: int, out_features: int, group_size: int, qdata: torch.Tensor,
                 scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_size(in_features, group_size)
        groups = 1 if group_size == 0 else self.padded_in // group_size
        assert qdata.shape == (out_features, self.padded_in) and qdata.dtype == torch.int8, qdata.shape
        assert scale.shape == (out_features, groups), scale.shape
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("kernel_scale", None, persistent=False)  # (out,) in compute_dtype, once packed
        self._packed = False
        self.compute_dtype = scale.dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        w = pad_columns(weight.detach().float(), padded_size(in_features, group_size))
        codes, scale = quantize_int8(w, group_size)
        return cls(in_features, out_features, group_size, codes, scale.to(dtype or weight.dtype))

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "Int8WeightOnlyLinear":
        n, g = config["out_features"], config["group_size"]
        k = padded_size(config["in_features"], g)
        return cls(config["in_features"], n, g, torch.empty(n, k, dtype=torch.int8, device=device),
                   torch.empty(n, 1 if g == 0 else k // g, dtype=dtype, device=device))

    def dequantized_weight(self) -> torch.Tensor:
        w = group_view(self.qdata.float(), self.group_size) * self.scale.float()[..., None]
        return w.reshape(self.qdata.shape)[:, :self.in_features].to(self.scale.dtype)

    @property
    def packed(self) -> bool:
        return self._packed

    def pack(self) -> None:
        # int8 codes and scales are what the kernels take; copied because _weight_int8pack_mm crashes
        # (SIGSEGV) on codes that are not 64-byte aligned, as tensors read from safetensors can be
        self.qdata = self.qdata.clone()
        self.compute_dtype = CPU_COMPUTE_DTYPE[self.scale.dtype] if self.qdata.device.type == "cpu" else \
            self.scale.dtype
        if self.group_size == 0:
            # a buffer, not a cast inside forward: inductor fails to feed a computed scale to the extern kernel
            self.kernel_scale = self.scale[:, 0].to(self.compute_dtype).contiguous()
        self._packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and self.group_size == 0 and x.device.type == "cpu":
            x2 = x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous()
            y = torch._weight_int8pack_mm(x2, self.qdata, self.kernel_scale)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.group_size == 0:
            return F.linear(x, self.qdata.to(x.dtype)) * self.scale[:, 0].to(x.dtype)
        weight = group_view(self.qdata.to(x.dtype), self.group_size) * self.scale.to(x.dtype)[..., None]
        return F.linear(pad_columns(x, self.padded_in), weight.reshape(self.qdata.shape))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}")
