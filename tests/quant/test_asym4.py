"""The asymmetric 8da4w layer: a GGUF Q4_0/Q4_1 tensor lands on it with no re-quantization (bit for bit against
gguf's own dequantizer), and the symmetric GEMM plus the per-group correction is the layer x @ Wᵀ."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from torchat.quant.asym4 import Int8DynActAsymInt4Linear, asymmetric_int4_grid, group_sum_matrix

GGUF_4BIT = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1]


def gguf_weight(qtype: GGMLQuantizationType, out_features=64, in_features=256, seed=0) -> torch.Tensor:
    """A random weight written by gguf's quantizer and read back by its dequantizer (float32)."""
    w = (torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05).numpy()
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
def test_runtime_form_is_the_symmetric_gemm_plus_the_correction(qtype):
    """Packed: torchao's symmetric int4 tensor (the 8da4w GEMM XNNPACK runs) plus group sums times C. Only the
    scales' rounding to bf16 (what XNNPACK stores) moves the weights: by (s − s')·(c − mean c), at most 15 of a
    scale's bf16 half-ulps (2^-8 of it)."""
    w = gguf_weight(qtype)
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    scale = layer.scale.clone()
    layer.quantize_activations = False
    layer.pack()
    from torchao.quantization import IntxUnpackedToInt8Tensor

    assert isinstance(layer.weight, IntxUnpackedToInt8Tensor) and layer.weight.target_dtype == torch.int4
    assert int(layer.weight.zero_point.abs().max()) == 0 and int(layer.weight.qdata.min()) >= -8
    assert torch.equal(layer.weight.scale, layer.weight.scale.bfloat16().float())
    bound = (15 * 2 ** -8 * scale + 1e-7).repeat_interleave(32, dim=1)
    assert bool(((layer.dequantized_weight() - w).abs() <= bound).all())
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
    expected = x @ layer.dequantized_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_dynamic_activations_are_quantized_like_8da4w():
    w = gguf_weight(GGMLQuantizationType.Q4_1)
    x = torch.randn(4, w.shape[1], generator=torch.Generator().manual_seed(2))
    layer = Int8DynActAsymInt4Linear.from_float(w, 32)
    quantized = layer(x)
    error = float((quantized - x @ w.T).norm() / (x @ w.T).norm())
    assert 0 < error < 0.02  # int8 per-token rounding: small, not nothing
    layer.pack()
    torch.testing.assert_close(layer(x), quantized, rtol=0.02, atol=0.02)


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
    assert torch.equal(group_sum_matrix(4, 2, torch.float32) @ torch.arange(4.0), torch.tensor([1.0, 5.0]))


def test_8da4w_head_bitwidth_8_makes_the_head_8da8w():
    from tiny_model import tiny_transformer

    from torchat.quant import parse_quant, quantize_model
    from torchat.quant.intx import Int8DynActInt8Linear

    model = tiny_transformer()
    quantize_model(model, parse_quant('{"linear:8da4w": {"group_size": 32, "grid": "asymmetric", "head_bitwidth": 8}}'))
    assert type(model.output) is Int8DynActInt8Linear
    assert type(model.layers[0].feed_forward.w1) is Int8DynActAsymInt4Linear
