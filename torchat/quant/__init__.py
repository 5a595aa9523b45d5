"""Quantization: parse --quant, quantize a model in place, bake a quantized checkpoint, load one, and say which
backends run each scheme correctly.

    specs = parse_quant('{"linear:int4": {"groupsize": 32}}')
    report = quantize_model(model, specs)                 # in place; report.summary() says what was quantized
    bake_quantized(Path("ckpt"), specs, "fp32", Path("out"))   # offline: quantized weights + quant.json
    model = load_quantized(Path("out"))                    # swaps modules, loads the baked tensors, no requantizing
    backend_support(specs, "et")                           # raises TorchatError where the numbers would be wrong

Layering: lowering imports quant, quant imports model; never the reverse.
"""

import importlib

# parsing needs only the standard library (the build graph validates presets without torch); the rest is
# imported on first use
from torchat.quant.spec import QuantSpec, parse_quant, specs_from_dict, specs_to_json

_LAZY = {"QUANT_MANIFEST": "checkpoint", "bake_quantized": "checkpoint", "is_quantized_dir": "checkpoint",
         "load_quantized": "checkpoint", "read_report": "checkpoint", "QuantReport": "quantizer",
         "SchemeReport": "quantizer", "backend_support": "quantizer", "pack_model": "quantizer",
         "quantize_model": "quantizer", "QUANTIZERS": "schemes"}

__all__ = ["QUANTIZERS", "QUANT_MANIFEST", "QuantReport", "QuantSpec", "SchemeReport", "backend_support",
           "bake_quantized", "is_quantized_dir", "load_quantized", "pack_model", "parse_quant", "quantize_model",
           "read_report", "specs_from_dict", "specs_to_json"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"torchat.quant.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'torchat.quant' has no attribute {name!r}")
