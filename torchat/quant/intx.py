"""torchao's IntxUnpackedToInt8Tensor behind torchat modules: 8da4w and 8da8w linears, int8/int4 embeddings.

8da8w linears (and the 8-bit head of the 8da4w presets) are torchat's own: torchat::linear_q8, int8 weights against
the input quantized per block of 32 as linear_q4 takes it (its kernel torchat/kernels/et_linear.cpp, with a .pte
layer's norms, gate and residual adds fused in; eager and AOTI run the op's torch form); torchao gives their codes.

These are the forms ExecuTorch's XNNPACK delegate lowers correctly (notes/library-feasibility.md): the exported
graph holds torchao's quantize/dequantize ops, which the partitioner and its quant fusion recognise. Codes and
scales of embeddings come from torchao (`IntxUnpackedToInt8Tensor.from_hp`, symmetric, as
`IntxWeightOnlyConfig` chooses them), and so do 8da8w's per-channel weights; 8da4w weights get searched scales (`symmetric_int4_qparams`); a baked
checkpoint stores codes and scales plainly (4-bit codes two to a byte, offset by 8) and `pack()` rebuilds the
tensor subclass.
"""

import torch
import torch.nn.functional as F
from torch import nn

from torchat.quant.asym4 import (KERNEL_ORDER, Q4_PAIR, KernelLinear, fused_output, load_cpu_kernels, quantized_input,
                                 tile_rows, untile_rows)
from torchat.quant.base import (QuantizedModule, concatenated_intx, group_view, pack_nibbles, pad_columns, padded_size,
                                unpack_nibbles)

BIT_DTYPES = {4: torch.int4, 8: torch.int8}


# torchat::linear_q8, what a .pte's 8da8w layer calls: its ExecuTorch kernel is torchat/kernels/et_linear.cpp; here its
# definition for export and its reference in torch
_OPS = torch.library.Library("torchat", "FRAGMENT")
_ARGS = ("Tensor x, Tensor weight, Tensor scales, Tensor? norm=None, float eps=0.0, Tensor? residual=None, "
         "bool gated=False")
_OPS.define(f"linear_q8({_ARGS}) -> Tensor")
_OPS.define(f"linear_q8.out({_ARGS}, *, Tensor(a!) out) -> Tensor(a!)")


def to_q8_layout(codes: torch.Tensor) -> torch.Tensor:
    """int8 weights (out, in), in a multiple of 64, in linear_q8's byte order (each pair of blocks of 32 in the
    order of the kernels' activations, asym4.KERNEL_ORDER; the rows tiled, asym4.tile_rows)."""
    return tile_rows(codes.view(codes.shape[0], -1, Q4_PAIR)[:, :, KERNEL_ORDER].reshape(codes.shape), Q4_PAIR)


def from_q8_layout(weight: torch.Tensor) -> torch.Tensor:
    """linear_q8's bytes (out, padded_in) back in the elements' order."""
    codes = torch.empty_like(weight).view(weight.shape[0], -1, Q4_PAIR)
    codes[:, :, KERNEL_ORDER] = untile_rows(weight, Q4_PAIR).view(weight.shape[0], -1, Q4_PAIR)
    return codes.view(weight.shape)


def linear_q8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, norm: torch.Tensor | None = None,
              eps: float = 0.0, residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """torchat::linear_q8 in torch: x (..., in) quantized to int8 per block of 32 (asym4.quantized_input, the norm
    fused before it) times the int8 weight (out, padded_in) in linear_q8's order, times each row's float32 scale;
    the gate and residual after it as asym4.fused_output applies them."""
    quantized, _ = quantized_input(x, weight.shape[1], norm, eps)
    y = (quantized.flatten(-2) @ from_q8_layout(weight).float().T) * scales
    return fused_output(y, residual, gated, x.dtype)


def _linear_q8_out(x, weight, scales, norm=None, eps=0.0, residual=None, gated=False, *, out):
    return out.copy_(linear_q8(x, weight, scales, norm, eps, residual, gated))


def _linear_q8_meta(x, weight, scales, norm=None, eps=0.0, residual=None, gated=False):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2 if gated else weight.shape[0])


_OPS.impl("linear_q8", linear_q8, "CompositeExplicitAutograd")
_OPS.impl("linear_q8.out", _linear_q8_out, "CompositeExplicitAutograd")
_OPS.impl("linear_q8", _linear_q8_meta, "Meta")


def _intx_from_float(w: torch.Tensor, group_size: int, bits: int):
    """torchao's symmetric codes and scales (weight-only, as for embeddings)."""
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType

    block = (1, group_size or w.shape[1])
    return IntxUnpackedToInt8Tensor.from_hp(w, block, BIT_DTYPES[bits], mapping_type=MappingType.SYMMETRIC)


# Divisors tried for a group's largest magnitude m (scale = m / divisor): torchao's choice, m / 7.5, and coarser
# grids that may fit the rest of the group better. A peak is never clipped: a divisor above 7.5 (8 for a negative
# peak, which code -8 holds) is capped there, since clipping the outliers, though it lowers the squared weight error,
# raised SmolLM2's perplexity at groups of 128 and 256. Scales stay positive: XNNPACK fails to run a .pte with a
# negative one ("error: 0x1"), which rules out mirrored grids.
SEARCH_DIVISORS = (6.5, 7.0, 7.25, 7.5, 8.0)


def symmetric_int4_qparams(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Codes int8 (rows, cols) in [-8, 7] and positive scales (rows, groups) in scale_dtype, with values that bf16
    holds exactly (XNNPACK stores group scales in bf16, executorch's node_visitor.get_quant_params), for a weight
    (rows, cols) whose cols divide into groups.

    Per group, the scale of least squared error among SEARCH_DIVISORS and the least-squares refit of the best
    one's codes, none finer than the grid that holds the group's peak; codes are rounded against the bf16 scale
    they will run with. Written here, not taken from torchao: its `from_hp` has only the m / 7.5 scale.
    """
    g = group_view(w.detach().float(), group_size)  # (rows, groups, group_size)
    signed_peak = g.gather(-1, g.abs().argmax(-1, keepdim=True))  # (rows, groups, 1)
    peak = signed_peak.abs()
    finest = peak / torch.where(signed_peak < 0, 8.0, 7.5)  # the smallest scale that clips no value
    best_error = torch.full_like(peak, float("inf"))
    best_scale = torch.ones_like(peak)

    def consider(raw: torch.Tensor) -> None:
        nonlocal best_error, best_scale
        scale = torch.maximum(raw, finest).to(torch.bfloat16).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group: codes 0 anyway
        error = ((torch.round(g / scale).clamp(-8, 7) * scale - g) ** 2).sum(-1, keepdim=True)
        better = error < best_error
        best_error, best_scale = torch.where(better, error, best_error), torch.where(better, scale, best_scale)

    for divisor in SEARCH_DIVISORS:
        consider(peak / divisor)
    codes = torch.round(g / best_scale).clamp(-8, 7)
    consider((g * codes).sum(-1, keepdim=True).abs() / (codes * codes).sum(-1, keepdim=True).clamp(min=1))
    codes = torch.round(g / best_scale).clamp(-8, 7).to(torch.int8).reshape(w.shape)
    return codes, best_scale[..., 0].to(scale_dtype)


def _intx_tensor(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int, bits: int,
                 dynamic_activations: bool):
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQuant)

    act = ActQuant.INT8_ASYM_PER_TOKEN if dynamic_activations else None
    return IntxUnpackedToInt8Tensor(codes, scale, zero_point, BIT_DTYPES[bits], [1, group_size or codes.shape[1]],
                                    scale.dtype, act)


class IntxModule(QuantizedModule):
    """Shared plain form: qdata (rows, cols) int8 or, for 4 bits, (rows, cols/2) uint8; scale; zero_point int8."""

    bits: int
    dynamic_activations: bool

    def _init_plain(self, rows: int, cols: int, group_size: int, qdata, scale, zero_point) -> None:
        groups = 1 if group_size == 0 else cols // group_size
        want = (rows, cols // 2) if self.bits == 4 else (rows, cols)
        assert tuple(qdata.shape) == want, (qdata.shape, want)
        assert scale.shape == zero_point.shape == (rows, groups), (scale.shape, zero_point.shape)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.weight = None

    def _set_plain_from(self, tensor) -> None:
        codes = tensor.qdata
        self.qdata = pack_nibbles(codes + 8) if self.bits == 4 else codes
        self.scale, self.zero_point = tensor.scale, tensor.zero_point.to(torch.int8)

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qdata).to(torch.int8) - 8 if self.bits == 4 else self.qdata

    def _dequantized(self) -> torch.Tensor:
        if self.packed:
            return self.weight.dequantize().float()
        grouped = group_view(self.codes().float(), self.group_size) - self.zero_point.float()[..., None]
        return (grouped * self.scale.float()[..., None]).reshape(self.codes().shape)

    @property
    def packed(self) -> bool:
        return self.weight is not None

    @property
    def float_dtype(self) -> torch.dtype:
        return self.weight.dtype if self.packed else self.scale.dtype

    def pack(self) -> None:
        tensor = _intx_tensor(self.codes(), self.scale, self.zero_point, self.group_size, self.bits,
                              self.dynamic_activations)
        self.weight = nn.Parameter(tensor, requires_grad=False)
        self.qdata = self.scale = self.zero_point = None


class Int8DynActInt4Linear(IntxModule):
    """8da4w: per-token asymmetric int8 activations, symmetric int4 group-wise weights (input dim padded)."""

    kind = "int8_dynamic_act_int4_weight"
    bits, dynamic_activations = 4, True

    def __init__(self, in_features: int, out_features: int, group_size: int, qdata, scale, zero_point):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_in = padded_size(in_features, group_size)
        self._init_plain(out_features, self.padded_in, group_size, qdata, scale, zero_point)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        w = pad_columns(weight.detach().to(dtype or weight.dtype), padded_size(in_features, group_size))
        module = cls.empty({"in_features": in_features, "out_features": out_features, "group_size": group_size},
                           w.dtype, w.device)
        # scales that bf16 holds exactly, so that the eager model computes what the .pte runs (rounding them so
        # cut SmolLM2's eager-vs-pte logit gap from 1.34 to 0.51 on four layers)
        codes, scale = symmetric_int4_qparams(w, group_size, w.dtype)
        module.qdata, module.scale = pack_nibbles(codes + 8), scale
        return module

    def config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "Int8DynActInt4Linear":
        n, g = config["out_features"], config["group_size"]
        k = padded_size(config["in_features"], g)
        return cls(config["in_features"], n, g, torch.empty(n, k // 2, dtype=torch.uint8, device=device),
                   torch.empty(n, k // g, dtype=dtype, device=device),
                   torch.zeros(n, k // g, dtype=torch.int8, device=device))

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantized()[:, :self.in_features].to(self.float_dtype)

    @classmethod
    def concatenated(cls, modules: list) -> "Int8DynActInt4Linear | None":
        fused = cls._stacked_shell(modules)
        if fused is not None:
            fused.weight = nn.Parameter(concatenated_intx([m.weight for m in modules]), requires_grad=False)
            fused.qdata = fused.scale = fused.zero_point = None
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_columns(x, self.padded_in)
        if self.packed:
            return F.linear(x, self.weight)
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            _apply_int8_act_asym_per_token_quant_dequant)

        w = pad_columns(self.dequantized_weight(), self.padded_in).to(x.dtype)
        return F.linear(_apply_int8_act_asym_per_token_quant_dequant(x), w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"padded_in={self.padded_in}")


class Int8DynActInt8Linear(KernelLinear, Int8DynActInt4Linear):
    """8da8w: int8 activations quantized per block of 32 on the fly (symmetric), symmetric int8 weights with one
    scale per output channel; torchat::linear_q8 (a .pte runs its kernel, eager and AOTI its torch form).

    Plain form: torchao's per-channel codes, qdata (out, in) int8 with scale (out, 1) and zero_point 0 (as baked).
    Runtime form (`pack`): linear_q8's `q8_weight` (the codes padded to a multiple of 64, in its byte order) and
    `q8_scales` (out,) float32. Before torchat's kernel, a .pte ran XNNPACK's qd8-f32-qc8w GEMM on per-token
    asymmetric activations, and eager torchao's form of the same."""

    kind = "int8_dynamic_act_int8_weight"
    bits = 8
    op, torch_form = "linear_q8", staticmethod(linear_q8)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._float_dtype = self.scale.dtype
        self.q8_weight = self.q8_scales = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 0, dtype: torch.dtype | None = None):
        assert group_size == 0, "8da8w weights are per channel"
        out_features, in_features = weight.shape
        w = weight.detach().to(dtype or weight.dtype)
        module = cls.empty({"in_features": in_features, "out_features": out_features, "group_size": 0},
                           w.dtype, w.device)
        module._set_plain_from(_intx_from_float(w, 0, 8))
        return module

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "Int8DynActInt8Linear":
        n, k = config["out_features"], config["in_features"]
        return cls(k, n, 0, torch.empty(n, k, dtype=torch.int8, device=device),
                   torch.empty(n, 1, dtype=dtype, device=device), torch.zeros(n, 1, dtype=torch.int8, device=device))

    @property
    def packed(self) -> bool:
        return self.q8_weight is not None

    @property
    def float_dtype(self) -> torch.dtype:
        return self._float_dtype

    def kernel_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """linear_q8's (weight, scales): the runtime form, or made from the plain one."""
        if self.packed:
            return self.q8_weight, self.q8_scales
        assert not self.zero_point.any(), "8da8w weights are symmetric"
        padded = pad_columns(self.qdata, padded_size(self.in_features, Q4_PAIR))
        return to_q8_layout(padded), self.scale.float().reshape(-1)

    def pack(self) -> None:
        self.q8_weight, self.q8_scales = self.kernel_parts()
        self.qdata = self.scale = self.zero_point = None
        load_cpu_kernels(self.q8_weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        weight, scales = self.kernel_parts()
        return (from_q8_layout(weight)[:, :self.in_features].float() * scales[:, None]).to(self.float_dtype)

    @classmethod
    def concatenated(cls, modules: list) -> "Int8DynActInt8Linear | None":
        fused = cls._stacked_shell(modules)
        if fused is not None:
            # stacked in the rows' order and tiled again (a module's rows need not fill its last tile)
            weight, fused.q8_scales = map(torch.cat, zip(*((from_q8_layout(w), s) for w, s in
                                                          (m.kernel_parts() for m in modules))))
            fused.q8_weight = to_q8_layout(weight)
            fused.qdata = fused.scale = fused.zero_point = None
        return fused

    @property
    def runs_on_kernel(self) -> bool:
        """Whether a .pte runs this layer on torchat's kernel (`set_kernel`), its neighbours fusable into it."""
        return self.packed

    def forward(self, x: torch.Tensor, **fused) -> torch.Tensor:
        return self.run_kernel(x, **fused)


class QuantizedEmbedding(IntxModule):
    """Rows of int8 (one scale per row, group_size 0, or per group) or int4 (group-wise) codes."""

    kind = "intx_embedding"
    dynamic_activations = False

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int, qdata, scale, zero_point):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits, self.group_size = (num_embeddings, embedding_dim, bits,
                                                                                group_size)
        self._init_plain(num_embeddings, embedding_dim, group_size, qdata, scale, zero_point)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype | None = None):
        rows, cols = weight.shape
        assert group_size == 0 or cols % group_size == 0, (cols, group_size)
        w = weight.detach().to(dtype or weight.dtype)
        module = cls.empty({"num_embeddings": rows, "embedding_dim": cols, "bits": bits, "group_size": group_size},
                           w.dtype, w.device)
        module._set_plain_from(_intx_from_float(w, group_size, bits))
        return module

    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "group_size": self.group_size}

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "QuantizedEmbedding":
        rows, cols, bits, g = config["num_embeddings"], config["embedding_dim"], config["bits"], config["group_size"]
        groups = 1 if g == 0 else cols // g
        qdata = (torch.empty(rows, cols // 2, dtype=torch.uint8, device=device) if bits == 4
                 else torch.empty(rows, cols, dtype=torch.int8, device=device))
        return cls(rows, cols, bits, g, qdata, torch.empty(rows, groups, dtype=dtype, device=device),
                   torch.zeros(rows, groups, dtype=torch.int8, device=device))

    def dequantized_weight(self) -> torch.Tensor:
        return self._dequantized().to(self.float_dtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.weight if self.packed else self.dequantized_weight())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"
