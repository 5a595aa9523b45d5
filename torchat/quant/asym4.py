"""8da4w on an asymmetric 4-bit grid: a scale and an offset per group, run on XNNPACK's symmetric kernel.

XNNPACK's blockwise 4-bit GEMM fixes the zero point at 8, but a GGUF Q4_1 weight (and most 4-bit checkpoints)
lies on an asymmetric grid, w = s·c + b with codes c in [0, 15]; re-quantizing it onto the symmetric grid cost
SmolLM2 +68-72 % word perplexity (issue 18). The asymmetric grid splits exactly:

    s·c + b = s·(c − 8) + (b + 8·s)

so the layer is the symmetric 8da4w GEMM on the codes c − 8 plus a correction that is constant within a group:
the per-group sums of the activations, x @ Sᵀ with a fixed 0/1 matrix S (groups, in), times C (out, groups),
C = b + 8·s. Both are ordinary fp32 linears that XNNPACK delegates in the same partition as the 4-bit GEMM, and
they are small (S and C hold 1/group_size of the weight's entries).

`asymmetric_int4_grid` finds the grid a float weight already lies on (a GGUF Q4_0/Q4_1 tensor dequantized, even
after a cast to bf16), so such a checkpoint maps onto the layer without re-quantization; a group that lies on no
4-bit grid gets min/max codes and a least-squares scale and offset.
"""

import torch
import torch.nn.functional as F
from torch import nn

from torchat.quant.base import (QuantizedModule, concatenated_intx, group_view, pack_nibbles, pad_columns, padded_size,
                                unpack_nibbles)

# A group counts as lying on a grid when every value is within this many grid steps of it (plus what its dtype's
# rounding allows): far below what random weights could meet by chance in 32 values.
GRID_TOLERANCE = 1e-3


def _refit(g: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares scale and offset (rows, groups, 1) of values g ≈ scale·codes + offset, in float64."""
    g, c = g.double(), codes.double()
    c_mean, g_mean = c.mean(-1, keepdim=True), g.mean(-1, keepdim=True)
    variance = ((c - c_mean) ** 2).sum(-1, keepdim=True)
    scale = ((c - c_mean) * (g - g_mean)).sum(-1, keepdim=True) / variance.clamp(min=1e-300)
    return scale, g_mean - scale * c_mean


def asymmetric_int4_grid(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 (rows, cols) in [0, 15], scale (rows, groups), offset (rows, groups)), float32, with
    w ≈ scale·codes + offset per group, for a weight (rows, cols) whose cols divide into groups.

    Per group: the coarsest grid lo + k-th fractions of the range (k = 1..15) that holds every value, and if the
    values are fp16 multiples as in a GGUF file, that grid's fp16 scale, so that a dequantized Q4_0 or Q4_1
    tensor comes back bit for bit; else min/max codes with a least-squares scale and offset. A constant group
    gets code 8 (nothing on the 4-bit GEMM) and its value as the offset.
    """
    g = group_view(w.detach().float(), group_size)  # (rows, groups, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    # rounding of the values themselves, in steps: a bf16 copy of a Q4_1 weight is still on its grid
    slack = torch.finfo(w.dtype).eps * torch.maximum(lo.abs(), hi.abs())

    codes, scale = torch.round((g - lo) / torch.where(flat, 1.0, span / 15)).clamp(0, 15), span / 15
    on_grid = torch.zeros_like(flat)
    for k in range(15, 0, -1):  # the last fit wins: the coarsest grid (smallest k)
        step = torch.where(flat, 1.0, span / k)
        fraction = (g - lo) / step
        error = (fraction - torch.round(fraction)).abs().amax(-1, keepdim=True)
        fits = ~flat & (error <= GRID_TOLERANCE + 2 * slack / step)
        codes = torch.where(fits, torch.round(fraction).clamp(0, k), codes)
        scale = torch.where(fits, step, scale)
        on_grid |= fits
    offset = lo
    # GGUF's scales are fp16: if the fp16 scale gives every value back exactly, take it
    scale16 = scale.half().float()
    exact16 = ((scale16 * codes + offset) == g).all(-1, keepdim=True)
    scale = torch.where(on_grid & exact16, scale16, scale)
    # off the grid (or on it only within rounding): least squares, unless degenerate
    refit_scale, refit_offset = _refit(g, codes)
    refit = ~flat & ~(on_grid & exact16) & (refit_scale > 0)
    scale = torch.where(refit, refit_scale.float(), scale)
    offset = torch.where(refit, refit_offset.float(), offset)
    # constant groups: code 8 and the value in the offset (exact for the zero padding of the input dim)
    codes = torch.where(flat, 8.0, codes)
    scale = torch.where(flat, 1.0, scale)
    offset = torch.where(flat, lo - 8.0, offset)
    return codes.to(torch.uint8).reshape(w.shape), scale[..., 0], offset[..., 0]


def group_sum_matrix(in_features: int, group_size: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(in / group_size, in) 0/1: x @ Sᵀ sums each group of x's columns (a linear, which XNNPACK delegates)."""
    groups = in_features // group_size
    return torch.eye(groups, dtype=dtype, device=device).repeat_interleave(group_size, dim=1)


def bf16_exact(scale: torch.Tensor) -> torch.Tensor:
    """The scale as XNNPACK runs it (executorch stores group-wise scales in bf16), in scale's dtype."""
    return scale.to(torch.bfloat16).to(scale.dtype)


class Int8DynActAsymInt4Linear(QuantizedModule):
    """8da4w with an asymmetric group-wise grid: int8 dynamic activations (per token, asymmetric) into the
    symmetric int4 GEMM, plus the exact per-group correction (module docstring).

    Plain form: qdata (out, in/2) uint8 codes in [0, 15], scale and offset (out, groups) in the float dtype.
    Runtime form: `weight`, torchao's IntxUnpackedToInt8Tensor of codes − 8 with bf16-exact scales, and
    `correction` C (out, groups), least-squares over each group for what rounding the scale to bf16 moved.
    quantize_activations=False leaves the activations in float (for tests: then the layer is x @ Wᵀ).
    """

    kind = "int8_dynamic_act_asym_int4_weight"

    def __init__(self, in_features: int, out_features: int, group_size: int, qdata, scale, offset,
                 quantize_activations: bool = True):
        super().__init__()
        assert group_size > 0, "the asymmetric 8da4w grid is group-wise"
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_size(in_features, group_size)
        self.quantize_activations = quantize_activations
        groups = self.padded_in // group_size
        assert tuple(qdata.shape) == (out_features, self.padded_in // 2), (qdata.shape, out_features, self.padded_in)
        assert scale.shape == offset.shape == (out_features, groups), (scale.shape, offset.shape)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.register_buffer("group_sum", group_sum_matrix(self.padded_in, group_size, scale.dtype, scale.device),
                             persistent=False)
        self.weight = None
        self.correction = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        w = pad_columns(weight.detach(), padded_size(in_features, group_size))
        codes, scale, offset = asymmetric_int4_grid(w, group_size)
        dtype = dtype or weight.dtype
        return cls(in_features, out_features, group_size, pack_nibbles(codes), scale.to(dtype), offset.to(dtype))

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "Int8DynActAsymInt4Linear":
        n, g = config["out_features"], config["group_size"]
        k = padded_size(config["in_features"], g)
        return cls(config["in_features"], n, g, torch.empty(n, k // 2, dtype=torch.uint8, device=device),
                   torch.empty(n, k // g, dtype=dtype, device=device), torch.empty(n, k // g, dtype=dtype,
                                                                                  device=device))

    @property
    def packed(self) -> bool:
        return self.weight is not None

    @property
    def float_dtype(self) -> torch.dtype:
        return self.correction.dtype if self.packed else self.scale.dtype

    def codes(self) -> torch.Tensor:
        """(out, padded_in) codes in [0, 15] as float32."""
        return unpack_nibbles(self.qdata).float()

    def dequantized_weight(self) -> torch.Tensor:
        if self.packed:
            sym = self.weight.dequantize().float()
            correction = self.correction.float().repeat_interleave(self.group_size, dim=1)
            return (sym + correction)[:, :self.in_features].to(self.float_dtype)
        # scale·c + offset in float32, the order gguf's Q4_1 dequantizer computes in
        grouped = group_view(self.codes(), self.group_size) * self.scale.float()[..., None] + self.offset.float()[
            ..., None]
        return grouped.reshape(self.out_features, -1)[:, :self.in_features].to(self.float_dtype)

    def _runtime_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes − 8 int8 (out, padded_in), bf16-exact scale, correction (out, groups)) in the float dtype."""
        codes = self.codes()
        scale = self.scale.float()
        run_scale = bf16_exact(scale)
        # b + 8·s' + (s − s')·mean(c): the group's mean of what s'·(c − 8) leaves of s·c + b
        mean_codes = group_view(codes, self.group_size).mean(-1)
        correction = self.offset.float() + 8 * run_scale + (scale - run_scale) * mean_codes
        dtype = self.scale.dtype
        return (codes - 8).to(torch.int8), run_scale.to(dtype), correction.to(dtype)

    def pack(self) -> None:
        from torchao.quantization import IntxUnpackedToInt8Tensor
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8TensorActivationQuantization as ActQuant)

        codes, run_scale, correction = self._runtime_parts()
        act = ActQuant.INT8_ASYM_PER_TOKEN if self.quantize_activations else None
        tensor = IntxUnpackedToInt8Tensor(codes, run_scale, torch.zeros_like(codes[:, ::self.group_size]),
                                          torch.int4, [1, self.group_size], run_scale.dtype, act)
        self.weight = nn.Parameter(tensor, requires_grad=False)
        self.correction = correction
        # rebuilt here: a non-persistent buffer made on the meta device (load_quantized) loads no values
        self.group_sum = group_sum_matrix(self.padded_in, self.group_size, correction.dtype, correction.device)
        self.qdata = self.scale = self.offset = None

    @classmethod
    def concatenated(cls, modules: list) -> "Int8DynActAsymInt4Linear | None":
        first, fused = modules[0], cls._stacked_shell(modules)
        if fused is None or any(m.quantize_activations != first.quantize_activations for m in modules):
            return None
        fused.quantize_activations = first.quantize_activations
        fused.weight = nn.Parameter(concatenated_intx([m.weight for m in modules]), requires_grad=False)
        fused.correction = torch.cat([m.correction for m in modules])
        fused.group_sum = first.group_sum  # one input: one group-sum matrix
        fused.qdata = fused.scale = fused.offset = None
        return fused

    def group_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(..., groups): each group of x's columns summed; what the correction multiplies, the same for every
        layer of this group size that reads x (torchat.lowering.et computes it once for w1 and w3)."""
        return F.linear(pad_columns(x, self.padded_in), self.group_sum.to(x.dtype))

    def forward(self, x: torch.Tensor, group_sums: torch.Tensor | None = None) -> torch.Tensor:
        """group_sums: self.group_sums(x) when the caller has it already."""
        if group_sums is None:
            group_sums = self.group_sums(x)
        x = pad_columns(x, self.padded_in)
        # the group sums times C (out, groups)
        corrected = F.linear(group_sums, (self.correction if self.packed else self._plain_correction()).to(x.dtype))
        if self.packed:
            return F.linear(x, self.weight) + corrected
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            _apply_int8_act_asym_per_token_quant_dequant)

        symmetric = group_view(self.codes() - 8, self.group_size) * self.scale.float()[..., None]
        xq = _apply_int8_act_asym_per_token_quant_dequant(x) if self.quantize_activations else x
        return F.linear(xq, symmetric.reshape(self.out_features, -1).to(x.dtype)) + corrected

    def _plain_correction(self) -> torch.Tensor:
        return self.offset.float() + 8 * self.scale.float()  # b + 8·s: s·c + b = s·(c − 8) + (b + 8·s)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}")
