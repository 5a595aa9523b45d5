"""8da4w on an asymmetric 4-bit grid: a scale and an offset per group (GGUF's Q4_1), on torchat's own kernel.

XNNPACK's blockwise 4-bit GEMM fixes the zero point at 8, but a GGUF Q4_1 weight (and most 4-bit checkpoints)
lies on an asymmetric grid, w = s·c + b with codes c in [0, 15]; re-quantizing it onto the symmetric grid cost
SmolLM2 +68-72 % word perplexity (issue 18). The layer runs torchat::linear_q4 (torchat/kernels/et_linear.cpp):
the codes times the input quantized to int8 per block of 32, with a scale and an offset per block, as llama.cpp's
Q4_1 x Q8_1 dot does; the offsets' term uses the blocks' float sums of the input. (Before, the layer was XNNPACK's
symmetric GEMM on c − 8 plus a per-group correction, two more fp32 GEMMs; on AVX2 that kernel is bound by its
arithmetic, issue 18's profile.)

`asymmetric_int4_grid` finds the grid a float weight already lies on (a GGUF Q4_0/Q4_1 tensor dequantized, even
after a cast to bf16), so such a checkpoint maps onto the layer without re-quantization; a group that lies on no
4-bit grid gets min/max codes and a least-squares scale and offset.
"""

import torch
import torch.nn.functional as F

from torchat.quant.base import QuantizedModule, group_view, pack_nibbles, pad_columns, padded_size, unpack_nibbles

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
    tensor comes back bit for bit (with an fp16 offset too); else min/max codes with a least-squares scale and
    offset. A constant group gets code 0 and its value as the offset.
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
    # and its offsets: a group whose codes do not reach 0 has its minimum above the file's offset, which is fp16 where
    # the minimum may not be; the first shift of the codes by k (the offset k steps down) that makes an fp16 offset
    # give every value back finds it (for Q4_0, -8 scales; torchat::linear_q4 keeps offsets in fp16)
    fits16 = on_grid & exact16
    shifted = fits16 & (offset.half().float() == offset)
    top = codes.amax(-1, keepdim=True)
    for k in range(1, 16):
        candidate = (offset - scale * k).half().float()
        found = (fits16 & ~shifted & (top + k <= 15)
                 & ((scale * (codes + k) + candidate) == g).all(-1, keepdim=True))
        codes, offset = torch.where(found, codes + k, codes), torch.where(found, candidate, offset)
        shifted |= found
    # or, for a Q4_0 tensor with a negative scale (values -7..8 steps), the codes counted down from the top
    for k in range(15, 0, -1):
        candidate = (offset + scale * k).half().float()
        found = (fits16 & ~shifted & (top <= k)
                 & ((-scale * (k - codes) + candidate) == g).all(-1, keepdim=True))
        codes, scale = torch.where(found, k - codes, codes), torch.where(found, -scale, scale)
        offset = torch.where(found, candidate, offset)
        shifted |= found
    # off the grid (or on it only within rounding): least squares, unless degenerate
    refit_scale, refit_offset = _refit(g, codes)
    refit = ~flat & ~(on_grid & exact16) & (refit_scale > 0)
    scale = torch.where(refit, refit_scale.float(), scale)
    offset = torch.where(refit, refit_offset.float(), offset)
    # constant groups: code 0 and the value in the offset (exact for the zero padding of the input dim)
    codes = torch.where(flat, 0.0, codes)
    scale = torch.where(flat, 1.0, scale)
    offset = torch.where(flat, lo, offset)
    return codes.to(torch.uint8).reshape(w.shape), scale[..., 0], offset[..., 0]


Q4_BLOCK = 32  # elements per scale in torchat::linear_q4 (a larger group's scale and offset repeat per block)
Q4_PAIR = 2 * Q4_BLOCK  # elements per 32 bytes of codes

# torchat::linear_q4, the op the packed layer calls: its ExecuTorch kernel is torchat/kernels/et_linear.cpp (whose
# header comment states it); here its definition for export and its reference in torch, which eager runs.
_OPS = torch.library.Library("torchat", "FRAGMENT")
_ARGS = ("Tensor x, Tensor codes, Tensor scales, Tensor offsets, Tensor? norm=None, float eps=0.0, "
         "Tensor? residual=None, bool gated=False")
_OPS.define(f"linear_q4({_ARGS}) -> Tensor")
_OPS.define(f"linear_q4.out({_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")

# byte b of a pair's 32: its low nibble is element _ELEMENT[b] of block _BLOCK[b] of the pair, its high nibble
# element _ELEMENT[b] + 16 (so that each 4-byte lane of the kernel's sums is one block's)
_BLOCK = torch.tensor([(b // 4) % 2 for b in range(32)])
_ELEMENT = torch.tensor([(b // 8) * 4 + b % 4 for b in range(32)])
# the same order for a byte per element (the kernels' int8 activations, linear_q8's weights): position i of a pair's
# 64 holds element KERNEL_ORDER[i] of the pair (block-major), the low nibbles' elements first, then the high ones'
KERNEL_ORDER = torch.cat([_BLOCK * Q4_BLOCK + _ELEMENT, _BLOCK * Q4_BLOCK + _ELEMENT + 16])


KERNEL_TILE = 4  # rows a tile of torchat's linear kernels


def tile_rows(x: torch.Tensor, per_pair: int) -> torch.Tensor:
    """A runtime part of torchat's linear kernels, (rows, pairs · per_pair) in the rows' order (per_pair: its
    elements for one row's pair of blocks), in the kernels' order, same shape: rows in tiles of KERNEL_TILE (the last
    one shorter where they do not divide), a tile's rows interleaved pair by pair (pair 0 of each row, then pair 1,
    ...), so that a tile is one run of memory: on the AVX2 EPYC two threads streamed 4-bit codes at 22-26 GB/s,
    as rows 12-16 (its bandwidth: 29; docs/performance.md)."""
    return _retiled(x, per_pair, untile=False)


def untile_rows(x: torch.Tensor, per_pair: int) -> torch.Tensor:
    """`tile_rows` undone: the rows' order."""
    return _retiled(x, per_pair, untile=True)


def _retiled(x: torch.Tensor, per_pair: int, untile: bool) -> torch.Tensor:
    rows, width = x.shape
    full, pairs = rows - rows % KERNEL_TILE, width // per_pair
    out = []
    for part, tiles, tile in ((x[:full], full // KERNEL_TILE, KERNEL_TILE), (x[full:], 1, rows - full)):
        if part.numel():
            shape = (tiles, pairs, tile, per_pair) if untile else (tiles, tile, pairs, per_pair)
            out.append(part.reshape(shape).transpose(1, 2).reshape(-1, width))
    return torch.cat(out) if out else x.clone()


def to_q4_layout(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) uint8 in [0, 15], in a multiple of 64, as linear_q4's bytes (out, in / 2): each row's pairs of
    blocks in the byte order above, the rows tiled (`tile_rows`)."""
    pairs = codes.view(codes.shape[0], -1, 2, Q4_BLOCK)
    low, high = pairs[:, :, _BLOCK, _ELEMENT], pairs[:, :, _BLOCK, _ELEMENT + 16]
    return tile_rows((low | (high << 4)).reshape(codes.shape[0], -1), Q4_PAIR // 2)


def from_q4_layout(packed: torch.Tensor) -> torch.Tensor:
    """linear_q4's bytes (out, in / 2) as codes (out, in) uint8."""
    rows = packed.shape[0]
    pairs = torch.empty(rows, packed.shape[1] // 32, 2, Q4_BLOCK, dtype=torch.uint8, device=packed.device)
    bytes_ = untile_rows(packed, Q4_PAIR // 2).view(rows, -1, 32)
    pairs[:, :, _BLOCK, _ELEMENT] = bytes_ & 0xF
    pairs[:, :, _BLOCK, _ELEMENT + 16] = bytes_ >> 4
    return pairs.reshape(rows, -1)


def q4_block_parts(codes: torch.Tensor, scales: torch.Tensor,
                   offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_q4's parts in the rows' order: codes (out, padded_in) uint8, fp16 scales and offsets (out, blocks)."""
    return from_q4_layout(codes), untile_rows(scales, 2), untile_rows(offsets, 2)


def quantized_input(x: torch.Tensor, padded: int, norm: torch.Tensor | None = None, eps: float = 0.0,
                    levels: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """The input as torchat's linear kernels take it (linear_q4 here, linear_q8 in torchat.quant.intx): x (..., in)
    RMS-normalized first where `norm` (RMSNorm's weight, with eps) is given, zero-padded to `padded` and quantized to
    int8 per block of 32 (a = max|x| / 127, symmetric; linear_w4: 16 bits, levels 32767); (the quantized values, x)
    in float32, (..., blocks, 32)."""
    xf = x.float()
    if norm is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm.float()
    xf = pad_columns(xf, padded).unflatten(-1, (-1, Q4_BLOCK))
    peak = xf.abs().amax(-1, keepdim=True)
    return torch.round(xf * torch.where(peak > 0, levels / peak, 0.0)) * (peak / levels), xf


def fused_output(y: torch.Tensor, residual: torch.Tensor | None, gated: bool, dtype: torch.dtype) -> torch.Tensor:
    """What the kernels fuse after the linear: `gated`, the outputs' first half gates the second (silu(gate) · up);
    `residual`, added last; the result in `dtype`."""
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    if residual is not None:
        y = y + residual.float()
    return y.to(dtype)


def linear_q4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
              gated: bool = False) -> torch.Tensor:
    """torchat::linear_q4 in torch: x (..., in) quantized to int8 per block of 32 (`quantized_input`) times the
    4-bit weight scale·code (per block), plus offset times the block's float sum of x. Fused around it for a
    transformer layer (torchat.lowering.fusion.KernelBlock): `norm`, x RMS-normalized first; `gated` and `residual` as
    `fused_output` applies them."""
    return _linear_4bit(x, codes, scales, offsets, norm, eps, residual, gated, levels=127)


def _linear_4bit(x, codes, scales, offsets, norm, eps, residual, gated, levels: int) -> torch.Tensor:
    out_features = codes.shape[0]
    quantized, xf = quantized_input(x, codes.shape[1] * 2, norm, eps, levels)
    codes, scales, offsets = q4_block_parts(codes, scales, offsets)
    weight = (codes.float().view(out_features, -1, Q4_BLOCK) * scales.float()[..., None])
    y = quantized.flatten(-2) @ weight.view(out_features, -1).T + xf.sum(-1) @ offsets.float().T
    return fused_output(y, residual, gated, x.dtype)


def _linear_q4_out(x, codes, scales, offsets, norm=None, eps=0.0, residual=None, gated=False, *, out):
    return out.copy_(linear_q4(x, codes, scales, offsets, norm, eps, residual, gated))


def _linear_q4_meta(x, codes, scales, offsets, norm=None, eps=0.0, residual=None, gated=False):
    return x.new_empty(*x.shape[:-1], codes.shape[0] // 2 if gated else codes.shape[0])


_OPS.impl("linear_q4", linear_q4, "CompositeExplicitAutograd")
_OPS.impl("linear_q4.out", _linear_q4_out, "CompositeExplicitAutograd")
_OPS.impl("linear_q4", _linear_q4_meta, "Meta")


# torchat::linear_w4: linear_q4's weights against the input quantized to 16 bits per block of 32, where linear_q4
# takes 8 (int4 weight-only on CPU, torchat.quant.int4: the input's error stays below 2^-16 of its block's largest
# value, where bf16 activations would round each to 2^-9 of itself). Its kernel is torchat/kernels/torch_linear.cpp
# (linear_core.h's Format::w4: the two bytes of each value through the int8 dot products of linear_q4); here its
# definition and its torch form.
_OPS.define(f"linear_w4({_ARGS}) -> Tensor")


def linear_w4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
              norm: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
              gated: bool = False) -> torch.Tensor:
    """torchat::linear_w4 in torch: linear_q4 with the input quantized to 16 bits per block of 32."""
    return _linear_4bit(x, codes, scales, offsets, norm, eps, residual, gated, levels=32767)


_OPS.impl("linear_w4", linear_w4, "CompositeExplicitAutograd")
_OPS.impl("linear_w4", _linear_q4_meta, "Meta")


def q4_parts(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int):
    """linear_q4's (codes, scales, offsets) for codes (out, padded_in) in [0, 15] with a float scale and offset per
    group: the input padded to a multiple of 64 (codes 0, scale and offset 0), the scale and offset per block of
    32 in fp16; the offset absorbs, by least squares over the block, what rounding the scale to fp16 moved
    (nothing for a GGUF file, whose scales and offsets are fp16)."""
    rows = codes.shape[0]
    padded = padded_size(codes.shape[1], Q4_PAIR)
    codes = pad_columns(codes, padded)
    repeat = group_size // Q4_BLOCK
    scale = pad_columns(scale.float().repeat_interleave(repeat, dim=1), padded // Q4_BLOCK)
    offset = pad_columns(offset.float().repeat_interleave(repeat, dim=1), padded // Q4_BLOCK)
    scale16 = scale.half()
    mean_codes = codes.float().view(rows, -1, Q4_BLOCK).mean(-1)
    offset16 = (offset + (scale - scale16.float()) * mean_codes).half()
    return q4_kernel_parts(codes, scale16, offset16)


def q4_kernel_parts(codes: torch.Tensor, scales: torch.Tensor,
                    offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q4_block_parts` undone: linear_q4's parts, tiled, from codes (out, padded_in) and fp16 scales and offsets
    (out, blocks) in the rows' order."""
    return to_q4_layout(codes), tile_rows(scales, 2), tile_rows(offsets, 2)


def load_cpu_kernels(device) -> None:
    """torch's CPU kernels of torchat's linear ops (torchat.kernels.load_torch_kernels), once, for a layer packed or
    run on CPU: at pack time too, so that a model torch.compile traces (which loads nothing) finds them registered.
    A trace itself (export, Dynamo) needs the ops' schemas only."""
    if torch.device(device).type == "cpu" and not torch.compiler.is_compiling():
        from torchat.kernels import load_torch_kernels

        load_torch_kernels()


class KernelLinear:
    """What a linear on one of torchat's kernels shares (here linear_q4; torchat.quant.intx's 8da8w, linear_q8):
    `op`, the op's name under torch.ops.torchat, `torch_form`, its reference in torch, and `kernel_parts()`, the
    weight tensors it takes after x. forward calls the op itself while `kernel` is set (torchat.lowering.et sets it
    while it exports a .pte, `set_kernel`) or on CPU, where torch runs the op's C++ kernel (the .pte kernel's
    arithmetic, torchat/kernels/torch_linear.cpp: eager, and the .pt2 AOTI compiles, which calls it); elsewhere (CUDA)
    its torch form, which eager runs and AOTI compiles like any other torch code."""

    op: str
    torch_form = None
    kernel = False

    def kernel_parts(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def set_kernel(self, on: bool) -> None:
        self.kernel = on

    def run_kernel(self, x: torch.Tensor, **fused) -> torch.Tensor:
        """fused: the ops' norm, eps, residual and gated (a .pte's layer, torchat.lowering.fusion.KernelBlock)."""
        on_cpu = x.device.type == "cpu"
        load_cpu_kernels(x.device)
        op = getattr(torch.ops.torchat, self.op) if self.kernel or on_cpu else self.torch_form
        return op(x, *self.kernel_parts(), **fused)


class Int8DynActAsymInt4Linear(KernelLinear, QuantizedModule):
    """8da4w with an asymmetric group-wise grid: int8 dynamic activations (per block of 32, symmetric) times 4-bit
    codes with a scale and an offset per group, torchat's own kernel (torchat::linear_q4).

    Plain form: qdata (out, in/2) uint8 codes in [0, 15], scale and offset (out, groups) in the float dtype.
    Runtime form: linear_q4's `q4_codes`, `q4_scales` and `q4_offsets` (`q4_parts`); eager and AOTI run the op's
    torch form, a .pte its kernel (`kernel`). The plain form's forward is the same on the same parts, made on the fly;
    quantize_activations=False leaves the activations in float (for tests: then the layer is x @ Wᵀ).
    """

    kind = "int8_dynamic_act_asym_int4_weight"
    op, torch_form = "linear_q4", staticmethod(linear_q4)

    def __init__(self, in_features: int, out_features: int, group_size: int, qdata, scale, offset,
                 quantize_activations: bool = True):
        super().__init__()
        assert group_size % Q4_BLOCK == 0, "the asymmetric 8da4w grid is group-wise, in blocks of 32"
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_size(in_features, group_size)
        self.quantize_activations = quantize_activations
        groups = self.padded_in // group_size
        assert tuple(qdata.shape) == (out_features, self.padded_in // 2), (qdata.shape, out_features, self.padded_in)
        assert scale.shape == offset.shape == (out_features, groups), (scale.shape, offset.shape)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.q4_codes = self.q4_scales = self.q4_offsets = None
        self._float_dtype = scale.dtype

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
        return self.q4_codes is not None

    @property
    def float_dtype(self) -> torch.dtype:
        return self._float_dtype

    def codes(self) -> torch.Tensor:
        """(out, padded_in) codes in [0, 15] as float32."""
        return unpack_nibbles(self.qdata).float()

    def dequantized_weight(self) -> torch.Tensor:
        if self.packed:
            codes, scales, offsets = q4_block_parts(self.q4_codes, self.q4_scales, self.q4_offsets)
            grouped = (codes.float().view(self.out_features, -1, Q4_BLOCK) * scales.float()[..., None]
                       + offsets.float()[..., None])
        else:  # scale·c + offset in float32, the order gguf's Q4_1 dequantizer computes in
            grouped = group_view(self.codes(), self.group_size) * self.scale.float()[..., None] + self.offset.float()[
                ..., None]
        return grouped.reshape(self.out_features, -1)[:, :self.in_features].to(self.float_dtype)

    def kernel_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed:
            return self.q4_codes, self.q4_scales, self.q4_offsets
        return q4_parts(unpack_nibbles(self.qdata), self.scale, self.offset, self.group_size)

    def pack(self) -> None:
        self.q4_codes, self.q4_scales, self.q4_offsets = self.kernel_parts()
        self.qdata = self.scale = self.offset = None
        load_cpu_kernels(self.q4_codes.device)

    @classmethod
    def concatenated(cls, modules: list) -> "Int8DynActAsymInt4Linear | None":
        first, fused = modules[0], cls._stacked_shell(modules)
        if fused is None or any(m.quantize_activations != first.quantize_activations for m in modules):
            return None
        fused.quantize_activations = first.quantize_activations
        # stacked in the rows' order and tiled again (a module's rows need not fill its last tile)
        rows = map(torch.cat, zip(*(q4_block_parts(*m.kernel_parts()) for m in modules)))
        fused.q4_codes, fused.q4_scales, fused.q4_offsets = q4_kernel_parts(*rows)
        fused.qdata = fused.scale = fused.offset = None
        return fused

    def forward(self, x: torch.Tensor, **fused) -> torch.Tensor:
        """fused: linear_q4's norm, eps, residual and gated (a .pte's layer, torchat.lowering.fusion.KernelBlock)."""
        if not self.quantize_activations:
            assert not fused, "the float-activation form (tests) fuses nothing"
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        return self.run_kernel(x, **fused)

    @property
    def runs_on_kernel(self) -> bool:
        """Whether a .pte runs this layer on torchat's kernel (`set_kernel`), its neighbours fusable into it."""
        return self.packed and self.quantize_activations


    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}")
