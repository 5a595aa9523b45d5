"""The quantization schemes, one registry entry each, keyed by the --quant token (after torchat.quant.spec's
aliases): what each quantizes and how. Which backends refuse a scheme is torch-free data: torchat.quant.spec."""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from torchat.errors import TorchatError
from torchat.quant.asym4 import Int8DynActAsymInt4Linear
from torchat.quant.int4 import Int4WeightOnlyLinear
from torchat.quant.int8 import Int8WeightOnlyLinear
from torchat.quant.intx import Int8DynActInt4Linear, Int8DynActInt8Linear, QuantizedEmbedding

# module name -> the new module, or a string saying why that module was left as it is
Results = dict[str, "nn.Module | str"]


@dataclass(frozen=True)
class Scheme:
    """target: the module type it replaces (None: the whole model); quantize(model, candidates, options,
    calibration) -> Results."""

    target: type | None
    quantize: Callable[[nn.Module, dict[str, nn.Module], dict, object], Results]
    description: str


def _linear_fits(linear: nn.Linear) -> str | None:
    if linear.bias is not None:
        return "has a bias (the quantized linears are bias-free, like every llama-family linear)"
    return None


def _per_linear(build: Callable[[nn.Linear, dict], nn.Module]):
    def quantize(model, candidates, options, calibration) -> Results:
        return {name: _linear_fits(linear) or build(linear, options) for name, linear in candidates.items()}
    return quantize


def _quantize_embedding(model, candidates, options, calibration) -> Results:
    results: Results = {}
    group = options["group_size"]
    for name, embedding in candidates.items():
        dim = embedding.embedding_dim
        if group and dim % group:
            results[name] = f"embedding dim {dim} is not a multiple of group_size {group}"
        else:
            results[name] = QuantizedEmbedding.from_float(embedding.weight, options["bitwidth"], group)
    return results


def _quantize_gptq(model, candidates, options, calibration) -> Results:
    from torchat.quant.gptq import gptq_quantize_model

    if calibration is None:
        raise TorchatError("linear:gptq needs calibration text: bake with `torchat quantize` (it calibrates on the "
                           "shipped English text), or pass calibration_tokens (a token tensor or the tokenizer)")
    if isinstance(calibration, torch.Tensor):
        tokens = calibration
    else:  # a tokenizer: windows of the calibration split of the English text
        from torchat.quant.calibration import calibration_tokens

        tokens = calibration_tokens(calibration, options["calibration_limit"], options["calibration_seq_length"])
    results: Results = {name: reason for name, linear in candidates.items() if (reason := _linear_fits(linear))}
    names = [name for name in candidates if name not in results]
    results |= gptq_quantize_model(model, names, tokens.to(next(model.parameters()).device),
                                   options["group_size"], options["blocksize"], options["percdamp"])
    return results


# linear:8da4w's `grid` option -> the module that holds weights on that grid
INT4_GRIDS: dict[str, type] = {"symmetric": Int8DynActInt4Linear, "asymmetric": Int8DynActAsymInt4Linear}
HEAD = "output"  # the Transformer's output projection (tied to the embedding table in SmolLM2)


def _with_8bit_head(build: Callable[[nn.Linear, dict], nn.Module]):
    """A 4-bit scheme's per-linear quantizer whose head is 8da8w (per-channel int8 weights, torchat::linear_q8 on
    CPU) when the spec's head_bitwidth is 8: on SmolLM2 the 4-bit head, a Q8_0 table on no 4-bit grid, cost most of
    the 4-bit schemes' word perplexity (8da4w: ~12 of its +14 %)."""
    def build_one(name: str, linear: nn.Linear, options: dict) -> nn.Module:
        if name == HEAD and options["head_bitwidth"] == 8:
            return Int8DynActInt8Linear.from_float(linear.weight)
        return build(linear, options)

    def quantize(model, candidates, options, calibration) -> Results:
        return {name: _linear_fits(linear) or build_one(name, linear, options) for name, linear in candidates.items()}
    return quantize


QUANTIZERS: dict[str, Scheme] = {
    "embedding": Scheme(nn.Embedding, _quantize_embedding,
                        "int8 (per row or group-wise) or int4 (group-wise) symmetric embedding table"),
    "linear:int8": Scheme(nn.Linear, _per_linear(lambda m, o: Int8WeightOnlyLinear.from_float(m.weight, o["group_size"])),
                          "int8 weight-only linear, symmetric, per channel (group_size 0) or group-wise"),
    "linear:int4": Scheme(nn.Linear, _with_8bit_head(lambda m, o: Int4WeightOnlyLinear.from_float(m.weight,
                                                                                                   o["group_size"])),
                          "int4 weight-only linear, asymmetric group-wise, min/max scales (tinygemm layout)"),
    "linear:8da4w": Scheme(nn.Linear, _with_8bit_head(lambda m, o: INT4_GRIDS[o["grid"]].from_float(m.weight,
                                                                                                    o["group_size"])),
                           "int8 per-token dynamic activations, int4 group-wise weights on a symmetric grid or "
                           "an asymmetric one (a scale and an offset per group)"),
    "linear:8da8w": Scheme(nn.Linear, _per_linear(lambda m, o: Int8DynActInt8Linear.from_float(m.weight)),
                           "int8 per-token dynamic activations, int8 symmetric per-channel weights"),
    "linear:gptq": Scheme(nn.Linear, _quantize_gptq,
                          "int4 weight-only linear with GPTQ error compensation, calibrated on English text"),
    "linear:hqq": Scheme(nn.Linear, _per_linear(lambda m, o: Int4WeightOnlyLinear.from_float(m.weight,
                                                                                             o["group_size"], "hqq")),
                         "int4 weight-only linear with HQQ-fitted scales and zeros"),
    "precision": Scheme(None, lambda *args: {}, "the float dtype of the model (applied before any quantizer)"),
}


def padding_of(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, padded) for a quantized linear whose input dim was padded to its group size."""
    padded = getattr(module, "padded_in", None)
    if padded is not None and padded != module.in_features:
        return module.in_features, padded
    return None
