"""Each quantized module against independent references on random weights: quantize -> dequantize error
bounds derived from the scheme's grid, and the packed kernels against F.linear / F.embedding on the
dequantized weights."""

import pytest
import torch
import torch.nn.functional as F

from torchat.quant.base import group_view, pack_nibbles, unpack_nibbles
from torchat.quant.gptq import gptq_quantize_weight
from torchat.quant.int4 import Int4WeightOnlyLinear, minmax_qparams, quantize_codes
from torchat.quant.int8 import Int8WeightOnlyLinear
from torchat.quant.intx import Int8DynActInt4Linear, Int8DynActInt8Linear, QuantizedEmbedding


def weights(out_features=96, in_features=576, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


def groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), zero-padding the input dim as the modules do."""
    padded = -(-w.shape[1] // group_size) * group_size
    return F.pad(w, (0, padded - w.shape[1])).reshape(w.shape[0], -1, group_size)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_nibbles_round_trip():
    codes = torch.randint(0, 16, (7, 10), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_minmax_error_is_within_half_a_step(group_size):
    w = weights()  # in = 576: padded to 640 for 128 and 768 for 256
    module = Int4WeightOnlyLinear.from_float(w, group_size)
    g = groups(w, group_size)
    step = (g.amax(-1) - g.amin(-1)) / 15  # (out, groups): the grid spacing of each group
    bound = (step / 2)[..., None].expand_as(g).reshape(w.shape[0], -1)[:, :w.shape[1]]
    error = (module.dequantized_weight() - w).abs()
    assert bool((error <= bound + 1e-6).all()), float((error - bound).max())
    assert int(module.codes().max()) <= 15
    assert module.padded_in == -(-576 // group_size) * group_size


@pytest.mark.parametrize("group_size", [32, 64])
def test_hqq_fits_weights_better_than_minmax(group_size):
    w = weights()
    minmax = Int4WeightOnlyLinear.from_float(w, group_size).dequantized_weight()
    hqq = Int4WeightOnlyLinear.from_float(w, group_size, "hqq").dequantized_weight()
    assert relative_error(hqq, w) < relative_error(minmax, w) < 0.12


@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_int8_error_is_within_half_a_step(group_size):
    w = weights()
    module = Int8WeightOnlyLinear.from_float(w, group_size)
    g = w[:, None, :] if group_size == 0 else groups(w, group_size)
    bound = (g.abs().amax(-1) / 127 / 2)[..., None].expand_as(g).reshape(w.shape[0], -1)[:, :w.shape[1]]
    assert bool(((module.dequantized_weight() - w).abs() <= bound + 1e-7).all())


@pytest.mark.parametrize("group_size", [32, 256])
def test_8da4w_weight_error_is_within_a_symmetric_step(group_size):
    w = weights()
    module = Int8DynActInt4Linear.from_float(w, group_size)
    g = groups(w, group_size)
    scale = module.scale.float()[..., None]  # (out, groups, 1)
    codes = group_view(module.codes().float(), group_size)
    # unclipped values round to the nearest step of their group's scale; clipped ones lie beyond the grid's ends
    inside = (g / scale >= -8.5) & (g / scale <= 7.5)
    error = (codes * scale - g).abs()
    assert bool((error[inside] <= scale.expand_as(g)[inside] / 2 + 1e-7).all())
    # no peak is clipped, so every value stays within one step of torchao's |max| / 7.5 grid, as before the search
    torchao_step = g.abs().amax(-1) / 7.5
    bound = torchao_step[..., None].expand_as(g).reshape(w.shape[0], -1)[:, :w.shape[1]]
    assert bool(((module.dequantized_weight() - w).abs() <= bound + 1e-6).all())
    assert bool((module.scale > 0).all())  # XNNPACK runs no negative scale
    assert -8 <= int(module.codes().min()) and int(module.codes().max()) <= 7
    assert torch.equal(module.scale, module.scale.to(torch.bfloat16).float())  # what XNNPACK stores


@pytest.mark.parametrize("group_size", [32, 128])
def test_8da4w_scale_search_beats_torchaos_scales(group_size):
    """torchao's own symmetric int4 quantizer (|max| / 7.5) is the reference the search must improve on."""
    from torchao.quantization import IntxUnpackedToInt8Tensor, MappingType

    w = weights(in_features=512)
    reference = IntxUnpackedToInt8Tensor.from_hp(w, (1, group_size), torch.int4,
                                                 mapping_type=MappingType.SYMMETRIC).dequantize()
    ours = Int8DynActInt4Linear.from_float(w, group_size).dequantized_weight()
    assert relative_error(ours, w) ** 2 < 0.95 * relative_error(reference, w) ** 2


@pytest.mark.parametrize("bits, group_size, bound", [(8, 0, 0.01), (8, 32, 0.01), (4, 32, 0.12)])
def test_embedding_error(bits, group_size, bound):
    w = weights(200, 64) * 20
    module = QuantizedEmbedding.from_float(w, bits, group_size)
    assert relative_error(module.dequantized_weight(), w) < bound


def _reference_int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token asymmetric int8 fake quantization, written from its definition."""
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-128 - torch.round(low / scale)).clamp(-128, 127)
    q = (torch.round(x / scale) + zero).clamp(-128, 127)
    return (q - zero) * scale


def _reference_block_int8_activations(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 fake quantization per block of 32 (torchat's linear kernels), written from its definition."""
    blocks = x.unflatten(-1, (-1, 32))
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scale) * scale).flatten(-2)


@pytest.mark.parametrize("make, atol", [
    (lambda w: Int4WeightOnlyLinear.from_float(w, 32), 5e-3),
    (lambda w: Int4WeightOnlyLinear.from_float(w, 256), 5e-3),
    (lambda w: Int4WeightOnlyLinear.from_float(w, 64, "hqq"), 5e-3),
    (lambda w: Int8WeightOnlyLinear.from_float(w, 0), 2e-2),
    (lambda w: Int8WeightOnlyLinear.from_float(w, 128), 1e-5),
    (lambda w: Int8DynActInt4Linear.from_float(w, 32), 1e-4),
    (lambda w: Int8DynActInt4Linear.from_float(w, 128), 1e-4),
    (lambda w: Int8DynActInt8Linear.from_float(w), 1e-4),
], ids=["int4-g32", "int4-g256", "hqq-g64", "int8", "int8-g128", "8da4w-g32", "8da4w-g128", "8da8w"])
def test_packed_kernel_matches_the_dequantized_weight(make, atol):
    """Packed runtime (linear_w4 / int8pack / torchao subclass / linear_q8) vs F.linear on dequantized weights.
    Channel-wise int8 computes in bf16 on CPU, hence its looser tolerance; int4's linear_w4 keeps its scales and
    offsets in fp16 (a weight moves by up to 2^-11 of its scale) and its input in 16 bits (output scale about 4)."""
    w = weights()
    x = torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(1))
    module = make(w)
    dequantized = module.dequantized_weight()
    if isinstance(module, Int8DynActInt8Linear):
        reference = F.linear(_reference_block_int8_activations(x), dequantized)
    elif isinstance(module, Int8DynActInt4Linear):
        reference = F.linear(_reference_int8_activations(x), dequantized)
    else:
        reference = F.linear(x, dequantized)
    module.pack()
    assert module.packed
    out = module(x)
    assert out.shape == reference.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, reference, atol=atol, rtol=0)
    assert reference.abs().max() > 0.5  # the tolerance is small against the outputs


def test_packed_embedding_matches_the_dequantized_table():
    w = weights(50, 64)
    module = QuantizedEmbedding.from_float(w, 4, 32)
    tokens = torch.tensor([[0, 3, 49, 3]])
    reference = F.embedding(tokens, module.dequantized_weight())
    module.pack()
    assert torch.equal(module(tokens), reference)


def test_bf16_int4_keeps_bf16():
    w = weights().bfloat16()
    module = Int4WeightOnlyLinear.from_float(w, 64)
    assert module.scale.dtype == torch.bfloat16
    module.pack()
    assert module(torch.randn(2, 576, dtype=torch.bfloat16)).dtype == torch.bfloat16


def _correlated_inputs(rows: int, columns: int, rank: int = 64) -> torch.Tensor:
    """Activations of a layer are strongly correlated: rank-64 structure plus a little noise."""
    generator = torch.Generator().manual_seed(2)
    structure = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, columns, generator=generator)
    return structure + 0.1 * torch.randn(rows, columns, generator=generator)


@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_round_to_nearest_on_the_layer_output(group_size):
    """GPTQ's objective is ||X W^T - X Q^T||: on correlated inputs it must beat min/max rounding there,
    while its codes still use the same grid (error per group bounded by the group's own range)."""
    w = weights(64, 256)
    x = _correlated_inputs(2048, 256)
    codes, scale, zero = gptq_quantize_weight(w, 2 * x.T @ x / x.shape[0], group_size, 128, 0.01, torch.float32)
    gptq = Int4WeightOnlyLinear.from_codes(codes, scale, zero, group_size, 256).dequantized_weight()
    nearest = Int4WeightOnlyLinear.from_float(w, group_size).dequantized_weight()
    gptq_error = relative_error(x @ gptq.T, x @ w.T)
    nearest_error = relative_error(x @ nearest.T, x @ w.T)
    assert gptq_error < 0.6 * nearest_error, (gptq_error, nearest_error)


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With H = I there is nothing to compensate: GPTQ must reduce to min/max rounding."""
    w = weights(16, 64)
    codes, scale, zero = gptq_quantize_weight(w, torch.eye(64), 32, 128, 1e-6, torch.float32)
    s, z = minmax_qparams(w, 32)
    assert torch.equal(codes, quantize_codes(w, s, z, 32))
