"""int4 weight-only linear (group-wise, asymmetric): plain min/max scales or HQQ-fitted ones; GPTQ fills the same.

The code convention is tinygemm's, the layout of torch's int4 kernels: w ~ (q - 8) * scale + zero, q in [0, 15],
with one (scale, zero) per `group_size` input columns of an output row. The input dim is zero-padded up to a
multiple of the group size (SmolLM2's 576 is no multiple of 128 or 256), and the activations with it, so
every linear is quantized whatever its shape; the report says which were padded.

Runtime: on CPU `aten._weight_int4pack_mm_for_cpu`, on CUDA `aten._weight_int4pack_mm` in bf16 (that path is
written to torch's documented layout and is untested here: no GPU). We call the aten ops ourselves rather
than torchao's PrototypeInt4WeightOnlyConfig because its Int4OpaqueTensor rejects group size 256 and stores
the ISA-dependent packed layout, which a baked checkpoint must not.
"""

import torch
import torch.nn.functional as F

from torchat.errors import TorchatError
from torchat.quant.base import (QuantizedModule, group_view, pack_nibbles, pad_columns, padded_size,
                                unpack_nibbles)

MID = 8  # tinygemm's mid-point for 4 bits

# On CPU the tinygemm kernel is fast only with bf16 activations (notes/baselines.md: 10-20x slower in fp32), so
# an fp32 model runs its int4 matmuls in bf16 (activations rounded to bf16, accumulation in fp32) and casts
# the result back; scales and zeros are kept in bf16 for it. fp16/bf16 models use their own dtype.
CPU_COMPUTE_DTYPE = {torch.float32: torch.bfloat16, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def minmax_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) from each group's min and max; w (out, in) with in % group_size == 0."""
    from torchao.quantization.quant_primitives import MappingType, _choose_qparams_affine_tinygemm

    scale, zero = _choose_qparams_affine_tinygemm(w.float(), MappingType.ASYMMETRIC, (1, group_size), torch.int32,
                                                  0, 15, 1e-6, torch.float32, torch.float32)
    return scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


def hqq_qparams(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero) fitted by HQQ's half-quadratic solver (torchao's implementation, on CPU)."""
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_affine_hqq

    _, scale, zero, _ = _choose_qparams_and_quantize_affine_hqq(
        w.float(), nbits=4, group_size=group_size, axis=1, compute_dtype=torch.float32, device=w.device)
    return scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes (out, in) uint8 in [0, 15] of w for the given per-group scale and zero (out, in / group_size)."""
    scale, zero = scale.float()[..., None], zero.float()[..., None]
    codes = torch.round((group_view(w.float(), group_size) - (zero - MID * scale)) / scale).clamp(0, 15)
    return codes.reshape(w.shape).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) float32 weight of codes, the inverse of quantize_codes up to rounding."""
    w = (group_view(codes.float(), group_size) - MID) * scale.float()[..., None] + zero.float()[..., None]
    return w.reshape(codes.shape)


class Int4WeightOnlyLinear(QuantizedModule):
    """y = x @ dequant(W).T with W in 4-bit codes; plain buffers qdata (out, padded_in/2), scale, zero."""

    kind = "int4_weight_only"

    def __init__(self, in_features: int, out_features: int, group_size: int, qdata: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_size(in_features, group_size)
        groups = self.padded_in // group_size
        assert qdata.shape == (out_features, self.padded_in // 2) and qdata.dtype == torch.uint8, qdata.shape
        assert scale.shape == zero.shape == (out_features, groups), (scale.shape, zero.shape)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("packed_weight", None, persistent=False)
        self.register_buffer("scale_and_zero", None, persistent=False)
        self.compute_dtype = scale.dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, algorithm: str = "minmax",
                   dtype: torch.dtype | None = None) -> "Int4WeightOnlyLinear":
        """Quantize a float (out, in) weight; algorithm "minmax" or "hqq"; scales stored in `dtype`."""
        out_features, in_features = weight.shape
        dtype = dtype or weight.dtype
        w = pad_columns(weight.detach().float(), padded_size(in_features, group_size))
        scale, zero = (hqq_qparams if algorithm == "hqq" else minmax_qparams)(w, group_size)
        return cls.from_qparams(w, scale.to(dtype), zero.to(dtype), group_size, in_features)

    @classmethod
    def from_qparams(cls, padded_weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                     in_features: int) -> "Int4WeightOnlyLinear":
        """Codes of an already padded weight for stored (rounded) scales/zeros: the codes fit what is stored."""
        codes = quantize_codes(padded_weight, scale, zero, group_size)
        return cls.from_codes(codes, scale, zero, group_size, in_features)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                   in_features: int) -> "Int4WeightOnlyLinear":
        return cls(in_features, codes.shape[0], group_size, pack_nibbles(codes), scale, zero)

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "Int4WeightOnlyLinear":
        n, k, g = config["out_features"], padded_size(config["in_features"], config["group_size"]), config["group_size"]
        return cls(config["in_features"], n, g, torch.empty(n, k // 2, dtype=torch.uint8, device=device),
                   torch.empty(n, k // g, dtype=dtype, device=device), torch.empty(n, k // g, dtype=dtype, device=device))

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qdata)

    def dequantized_weight(self) -> torch.Tensor:
        assert not self.packed, "the plain codes are dropped once packed"
        w = dequantize_codes(self.codes(), self.scale, self.zero, self.group_size)
        return w[:, :self.in_features].to(self.scale.dtype)

    @property
    def packed(self) -> bool:
        return self.packed_weight is not None

    def pack(self) -> None:
        codes, device = self.codes(), self.qdata.device
        if device.type == "cuda":
            # tinygemm on CUDA: uint8 (out, in/2) with the even column in the high nibble, bf16 scales,
            # innerKTiles dividing in/16 (UNTESTED: no GPU was available)
            if self.out_features % 8:
                raise TorchatError(f"int4 on CUDA needs out_features divisible by 8, got {self.out_features}")
            inner_k_tiles = next(t for t in (8, 4, 2) if (self.padded_in // 16) % t == 0)  # in % 32 == 0
            cuda_bytes = (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()
            self.packed_weight = torch.ops.aten._convert_weight_to_int4pack(cuda_bytes, inner_k_tiles)
            self.compute_dtype = torch.bfloat16
        else:
            self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
            self.compute_dtype = CPU_COMPUTE_DTYPE[self.scale.dtype]
        # (in / group_size, out, 2): the kernels' scale-and-zero layout
        self.scale_and_zero = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous().to(
            self.compute_dtype)
        self.qdata = self.scale = self.zero = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        x2 = pad_columns(x, self.padded_in).reshape(-1, self.padded_in).to(self.compute_dtype).contiguous()
        if x2.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed_weight, self.group_size, self.scale_and_zero)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed_weight, self.group_size,
                                                            self.scale_and_zero)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}, packed={self.packed}")
