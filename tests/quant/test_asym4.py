"""The asymmetric 8da4w layer: a GGUF Q4_0/Q4_1 tensor lands on it with no re-quantization (bit for bit against
gguf's own dequantizer), plain and packed for torchat::linear_q4, whose activation quantization is checked against
one written out here (the op's ExecuTorch kernel against this reference: tests/lowering/test_kernels.py)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from torchat.quant.asym4 import Int8DynActAsymInt4Linear, asymmetric_int4_grid, from_q4_layout, to_q4_layout
from torchat.quant.base import group_view
from torchat.quant.int4 import Int4WeightOnlyLinear

GGUF_4BIT = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]


def gguf_weight(qtype: GGMLQuantizationType, out_features=64, in_features=256, seed=0, mean=0.0) -> torch.Tensor:
    """A random weight written by gguf's quantizer and read back by its dequantizer (float32)."""
    w = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05 + mean).numpy()
    return torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape).copy())


@pytest.mark.parametrize("qtype", GGUF_4BIT, ids=lambda t: t.name)
def test_gguf_4bit_tensor_maps_onto_the_layer_exactly(qtype):
    w = gguf_weight(qtype)
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    layer.quantize_activations = False
    assert torch.equal(layer.dequantized_weight(), w)  # bit for bit: no re-quantization
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", GGUF_4BIT, ids=lambda t: t.name)
def test_runtime_form_holds_the_gguf_weights_exactly(qtype):
    """Packed for torchat::linear_q4: fp16 scales and offsets per block of 32, the codes in the kernel's byte order;
    a GGUF tensor (fp16 scales and offsets) still gives gguf's dequantized weights bit for bit."""
    w = gguf_weight(qtype)
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    codes = layer.codes().to(torch.uint8)
    layer.pack()
    assert layer.q4_scales.dtype == layer.q4_offsets.dtype == torch.float16
    assert torch.equal(from_q4_layout(layer.q4_codes), codes)
    assert torch.equal(layer.dequantized_weight(), w)


def test_kernel_byte_order():
    """Byte b of a pair of blocks: low nibble element (b // 8) * 4 + b % 4 of block (b // 4) % 2, high nibble 16
    further (each 4-byte lane of the kernel's integer sums is one block's)."""
    codes = torch.arange(64, dtype=torch.uint8).remainder(16).reshape(1, 64)
    codes[0, 32:] = 15 - codes[0, 32:]
    packed = to_q4_layout(codes)[0]
    for b in range(32):
        block, element = (b // 4) % 2, (b // 8) * 4 + b % 4
        assert int(packed[b]) & 0xF == int(codes[0, 32 * block + element])
        assert int(packed[b]) >> 4 == int(codes[0, 32 * block + element + 16])
    assert torch.equal(from_q4_layout(to_q4_layout(codes)), codes)


def test_dynamic_activations_are_quantized_per_block_of_32():
    """The layer's int8 activations: per block of 32, scale max|x| / 127, round to nearest; the offsets' term takes
    the block's float sum. Checked against the quantization written out here, on a weight whose offsets are large
    (where the float sums matter), packed and plain alike."""
    w = gguf_weight(GGMLQuantizationType.Q4_1, mean=0.3)
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(2))
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    w = layer.dequantized_weight()
    blocks = x.view(4, -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(blocks / step) * step).view_as(x)
    codes, scale = group_view(layer.codes(), 32), layer.scale[..., None]
    symmetric = (codes * scale).view_as(w)  # the part of w the int8 activations meet
    expected = xq @ symmetric.T + blocks.sum(-1) @ layer.offset.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    error = float((layer(x) - x @ w.T).norm() / (x @ w.T).norm())
    assert 0 < error < 0.01  # int8 per-block rounding: small, not nothing
    layer.pack()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_bf16_copy_of_a_grid_is_found_and_random_weights_fit_by_least_squares():
    w = gguf_weight(GGMLQuantizationType.Q4_1)
    codes, scale, offset = asymmetric_int4_grid(w.bfloat16(), 32)
    reference_codes, _, _ = asymmetric_int4_grid(w, 32)
    assert torch.equal(codes, reference_codes)  # the same grid through bf16's rounding
    random = torch.randn(32, 128, generator=torch.Generator().manual_seed(3)) * 0.05
    codes, scale, offset = asymmetric_int4_grid(random, 32)
    rebuilt = (codes.float().reshape(32, 4, 32) * scale[..., None] + offset[..., None]).reshape(32, 128)
    step = (random.reshape(32, 4, 32).amax(-1) - random.reshape(32, 4, 32).amin(-1)) / 15
    assert bool(((rebuilt - random).abs().reshape(32, 4, 32) <= step[..., None]).all())
    assert int(codes.max()) <= 15 and bool((scale > 0).all())


def test_padded_input_dim_and_constant_groups_are_exact():
    w = gguf_weight(GGMLQuantizationType.Q4_0, in_features=96)[:, :80]  # 80 columns: padded to 96
    w[:3, :32] = 0.0
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    assert layer.padded_in == 96
    assert torch.equal(layer.dequantized_weight(), w)


@pytest.mark.parametrize("quant, layer_type", [
    ('{"linear:8da4w": {"group_size": 32, "grid": "asymmetric", "head_bitwidth": 8}}', Int8DynActAsymInt4Linear),
    ('{"linear:int4": {"group_size": 32, "head_bitwidth": 8}}', Int4WeightOnlyLinear)], ids=["8da4w", "int4"])
def test_head_bitwidth_8_makes_the_head_8da8w(quant, layer_type):
    """The head on 8 bits, the layers on 4; the head answers as the 8-bit head it is (within int8's rounding of the
    float head), where the 4-bit one is off by more."""
    from tiny_model import tiny_transformer

    from torchat.quant import parse_quant, quantize_model
    from torchat.quant.intx import Int8DynActInt8Linear

    model = tiny_transformer()
    head = model.output.weight.detach().clone()
    quantize_model(model, parse_quant(quant))
    assert type(model.output) is Int8DynActInt8Linear
    assert type(model.layers[0].feed_forward.w1) is layer_type
    x = torch.randn(3, head.shape[1], generator=torch.Generator().manual_seed(0))
    error = (model.output(x) - x @ head.T).abs().max() / (x @ head.T).abs().max()
    assert error < 0.01
