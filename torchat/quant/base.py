"""What every quantized module shares: a plain, portable persisted form, and a runtime form built from it.

A quantized module is built in its *plain* form: integer codes (4-bit codes two to a byte), scales and zeros
as persistent buffers, in a layout that depends on nothing but the scheme. That form is what a baked checkpoint
stores (safetensors) and what `dequantized_weight()` reads. `pack()` turns it into the *runtime* form (a kernel's
packed layout, which can depend on the CPU's ISA, or a torchao tensor subclass) and drops the plain buffers, so
that an exported program carries each weight once. Before `pack()` the forward pass is the reference: the layer
on the dequantized weight.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class QuantizedModule(nn.Module):
    kind: str = ""  # the key of the class in torchat.quant.modules.MODULE_KINDS, stored in quant.json

    def config(self) -> dict:
        """JSON-able constructor arguments (with `empty`, rebuilds the module before its state dict loads)."""
        raise NotImplementedError

    @classmethod
    def empty(cls, config: dict, dtype: torch.dtype, device) -> "QuantizedModule":
        """A module in plain form with uninitialised buffers of the right shapes, for load_state_dict."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the codes stand for, (out, in) unpadded, in the scales' dtype."""
        raise NotImplementedError

    def pack(self) -> None:
        """Build the runtime form on the buffers' device and drop the plain buffers."""
        raise NotImplementedError

    @property
    def packed(self) -> bool:
        raise NotImplementedError

    @classmethod
    def concatenated(cls, modules: list["QuantizedModule"]) -> "QuantizedModule | None":
        """Packed modules of this kind that read one input, as one whose output is theirs side by side (a backend
        runs one GEMM where it ran several); None where the kind has no such form or the modules differ."""
        return None

    @classmethod
    def _stacked_shell(cls, modules: list["QuantizedModule"]) -> "QuantizedModule | None":
        """For `concatenated`: an empty module of this kind on the meta device whose out_features are the modules'
        summed (its runtime parts still to set, its plain buffers to drop); None unless every module is a packed
        `cls` with one config but for out_features."""
        first = modules[0]
        same = {**first.config(), "out_features": 0}
        if any(type(m) is not cls or not m.packed or {**m.config(), "out_features": 0} != same for m in modules):
            return None
        return cls.empty({**first.config(), "out_features": sum(m.out_features for m in modules)},
                         first.float_dtype, "meta")


def concatenated_intx(tensors: list) -> "torch.Tensor":
    """torchao IntxUnpackedToInt8Tensors with one layout (bits, blocks, activation quantization), rows stacked."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    first = tensors[0]
    layout = (first.target_dtype, list(first.block_size), first.dtype, first.activation_quantization)
    assert all((t.target_dtype, list(t.block_size), t.dtype, t.activation_quantization) == layout
               for t in tensors), "tensors of different layouts"
    return IntxUnpackedToInt8Tensor(*(torch.cat([getattr(t, name) for t in tensors])
                                      for name in ("qdata", "scale", "zero_point")), *layout)


def padded_size(size: int, group_size: int) -> int:
    """`size` rounded up to a multiple of group_size (0 = one group: no padding)."""
    return size if group_size == 0 else math.ceil(size / group_size) * group_size


def pad_columns(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad the last dim of x up to `size` (zero columns of a weight meet zero activations)."""
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes in [0, 15] -> (rows, cols / 2) uint8, column 2j in the low nibble, 2j+1 in the high."""
    assert codes.shape[-1] % 2 == 0, f"an even number of columns is needed, got {tuple(codes.shape)}"
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15, "4-bit codes must lie in [0, 15]"
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: (rows, cols / 2) uint8 -> (rows, cols) uint8 codes in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, in / group_size, group_size); group_size 0 means one group per row."""
    rows, cols = w.shape
    return w.reshape(rows, 1 if group_size == 0 else cols // group_size, cols if group_size == 0 else group_size)
