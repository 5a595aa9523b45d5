"""torchao's IntxUnpackedToInt8Tensor behind torchat modules: 8da4w linear and int8/int4 embeddings.

These are the forms ExecuTorch's XNNPACK delegate lowers correctly (notes/library-feasibility.md): the exported
graph holds torchao's quantize/dequantize ops, which the partitioner and its quant fusion recognise. Codes and
scales come from torchao (`IntxUnpackedToInt8Tensor.from_hp`, symmetric, as `Int8DynamicActivationIntxWeightConfig`
and `IntxWeightOnlyConfig` choose them); a baked checkpoint stores them plainly (4-bit codes two to a byte,
offset by 8) and `pack()` rebuilds the tensor subclass.
"""

import torch
import torch.nn.functional as F
from torch import nn

from torchat.quant.base import (QuantizedModule, group_view, pack_nibbles, pad_columns, padded_size,
                                unpack_nibbles)

BIT_DTYPES = {4: torch.int4, 8: torch.int8}


def _intx_from_float(w: torch.Tensor, group_size: int, bits: int, dynamic_activations: bool):
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActQuant)

    block = (1, group_size or w.shape[1])
    act = ActQuant.INT8_ASYM_PER_TOKEN if dynamic_activations else None
    return IntxUnpackedToInt8Tensor.from_hp(w, block, BIT_DTYPES[bits], mapping_type=MappingType.SYMMETRIC,
                                            activation_quantization=act)


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
        module._set_plain_from(_intx_from_float(w, group_size, 4, True))
        # XNNPACK stores group-wise weight scales in bf16 (executorch's node_visitor.get_quant_params): round them
        # here, so the eager model computes what the .pte runs (this alone cut SmolLM2's eager-vs-pte logit gap
        # from 1.34 to 0.51 on four layers)
        module.scale = module.scale.to(torch.bfloat16).to(module.scale.dtype)
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
        module._set_plain_from(_intx_from_float(w, group_size, bits, False))
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
