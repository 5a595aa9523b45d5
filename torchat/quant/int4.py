"""int4 weight-only linear (group-wise, asymmetric): plain min/max scales or HQQ-fitted ones; GPTQ fills the same.

The code convention is tinygemm's, the layout of torch's int4 kernels: w ~ (q - 8) * scale + zero, q in [0, 15],
with one (scale, zero) per `group_size` input columns of an output row. The input dim is zero-padded up to a
multiple of the group size (SmolLM2's 576 is no multiple of 128 or 256), and the activations with it, so
every linear is quantized whatever its shape; the report says which were padded.

Runtime: on CPU torchat's own kernel, torchat::linear_w4 (torchat/kernels/torch_linear.cpp): the codes in
linear_q4's layout (torchat.quant.asym4, the 8da4w kernel's) with an fp16 scale and offset per block of 32
(offset = zero − 8·scale), against the input in float32. torch's `_weight_int4pack_mm_for_cpu` ran before: it is
fast only with bf16 activations (10-20x slower in fp32), and on AVX2 it is bound by its arithmetic (SmolLM2 int4
.pt2 decode 0.59x llama.cpp Q4_1 on the AVX2 EPYC, issue 18), where this kernel streams the weights as linear_q4
does. On CUDA `aten._weight_int4pack_mm` in bf16 (that path is written to torch's documented layout and is untested
here: no GPU). We call the aten op ourselves rather than torchao's PrototypeInt4WeightOnlyConfig because its
Int4OpaqueTensor rejects group size 256 and stores the ISA-dependent packed layout, which a baked checkpoint must
not.
"""

import torch
import torch.nn.functional as F

from torchat.errors import TorchatError
from torchat.quant.asym4 import load_cpu_kernels, q4_block_parts, q4_kernel_parts, q4_parts
from torchat.quant.base import (QuantizedModule, group_view, pack_nibbles, pad_columns, padded_size,
                                unpack_nibbles)

MID = 8  # tinygemm's mid-point for 4 bits


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
        # the runtime form, made by pack(): on CUDA tinygemm's weight and scale-and-zero; on CPU linear_q4's parts
        # (codes, fp16 scales, fp16 offsets) for torchat::linear_w4
        self.register_buffer("packed_weight", None, persistent=False)
        self.register_buffer("scale_and_zero", None, persistent=False)
        self.register_buffer("q4_scales", None, persistent=False)
        self.register_buffer("q4_offsets", None, persistent=False)
        self.compute_dtype = self._float_dtype = scale.dtype

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
            # (in / group_size, out, 2): the kernel's scale-and-zero layout
            self.scale_and_zero = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous().to(
                self.compute_dtype)
        else:  # w = scale·(q − 8) + zero = scale·q + (zero − 8·scale)
            offset = self.zero.float() - MID * self.scale.float()
            self.packed_weight, self.q4_scales, self.q4_offsets = q4_parts(codes, self.scale, offset, self.group_size)
            load_cpu_kernels(device)
        self.qdata = self.scale = self.zero = None

    @property
    def float_dtype(self) -> torch.dtype:
        return self._float_dtype

    @property
    def runs_on_kernel(self) -> bool:
        """Whether the layer runs torchat::linear_w4 (packed on CPU), which takes its neighbours' norm, gate and
        residual too (torchat.lowering.fusion.KernelBlock)."""
        return self.q4_scales is not None

    @classmethod
    def concatenated(cls, modules: list) -> "Int4WeightOnlyLinear | None":
        """Modules packed on CPU with one config but for out_features as one, their rows stacked in order and tiled
        again (linear_q4's layout, torchat.quant.asym4)."""
        fused = cls._stacked_shell(modules)
        if fused is None or not all(m.runs_on_kernel for m in modules):
            return None
        rows = map(torch.cat, zip(*(q4_block_parts(m.packed_weight, m.q4_scales, m.q4_offsets) for m in modules)))
        fused.packed_weight, fused.q4_scales, fused.q4_offsets = q4_kernel_parts(*rows)
        fused.qdata = fused.scale = fused.zero = None
        return fused

    def forward(self, x: torch.Tensor, **fused) -> torch.Tensor:
        """fused: linear_w4's norm, eps, residual and gated, on CPU (torchat.lowering.fusion.KernelBlock)."""
        if not self.packed:
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        if self.runs_on_kernel:
            load_cpu_kernels(x.device)
            return torch.ops.torchat.linear_w4(x, self.packed_weight, self.q4_scales, self.q4_offsets, **fused)
        x2 = pad_columns(x, self.padded_in).reshape(-1, self.padded_in).to(self.compute_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm(x2, self.packed_weight, self.group_size, self.scale_and_zero)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}, packed={self.packed}")
