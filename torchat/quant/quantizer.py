"""Applying specs to a model: quantize_model and its report, packing, and the backend check."""

from dataclasses import dataclass, field

import torch
from torch import nn

from torchat.dtypes import dtype_of, torch_dtype
from torchat.errors import TorchatError, unknown_key_error
from torchat.quant.base import QuantizedModule
from torchat.quant.schemes import QUANTIZERS, padding_of
from torchat.quant.spec import SCHEME_ALIASES, QuantSpec, refusal


@dataclass
class SchemeReport:
    """What one spec did: modules it replaced, those it padded ({name: [in, padded_in]}), those it left and why."""

    spec: QuantSpec
    quantized: list[str] = field(default_factory=list)
    padded: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "quantized": self.quantized, "padded": self.padded, "skipped": self.skipped}

    def summary(self) -> str:
        if self.spec.scheme == "precision":
            return f"precision: the model cast to {self.spec.options['dtype']} before quantizing"
        line = f"{self.spec.scheme} {self.spec.options}: quantized {len(self.quantized)}"
        line += f" of {len(self.quantized) + len(self.skipped)} modules"
        if self.padded:
            shapes = sorted({f"{a}->{b}" for a, b in self.padded.values()})
            line += f" ({len(self.padded)} with the input dim zero-padded to the group size: {', '.join(shapes)})"
        reasons: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            reasons.setdefault(reason, []).append(name)
        for reason, names in sorted(reasons.items()):
            line += f"; skipped {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {reason}"
        return line


@dataclass
class QuantReport:
    dtype: str
    schemes: list[SchemeReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "schemes": [s.to_dict() for s in self.schemes]}

    @classmethod
    def from_dict(cls, values: dict) -> "QuantReport":
        schemes = [SchemeReport(QuantSpec(s["scheme"], s["options"]), s["quantized"], s["padded"], s["skipped"])
                   for s in values["schemes"]]
        return cls(values["dtype"], schemes)

    def summary(self) -> str:
        return "\n".join([f"dtype {self.dtype}"] + [s.summary() for s in self.schemes])

    def quantized(self) -> list[str]:
        return [name for s in self.schemes for name in s.quantized]


def quantize_model(model: nn.Module, specs: list[QuantSpec], calibration_tokens=None, *,
                   pack: bool = True) -> QuantReport:
    """Quantize a Transformer in place, spec by spec (a `precision` spec first, wherever it stands: quantized
    weights keep the dtype they were made in). A module the first matching spec quantized stays as it is.

    calibration_tokens: for linear:gptq, a (samples, seq) int64 tensor, or a tokenizer whose encoding of the
    calibration text gives them. pack=False leaves the modules in the plain form that bake_quantized saves.
    """
    ordered = sorted(specs, key=lambda s: s.scheme != "precision")
    for spec in ordered:
        if spec.scheme not in QUANTIZERS:
            raise unknown_key_error("quantization scheme", spec.scheme, list(QUANTIZERS) + list(SCHEME_ALIASES))
    owner: dict[str, str] = {}  # module name -> scheme that quantized it
    report = QuantReport(str(dtype_of(next(model.parameters()).dtype)))
    for spec in ordered:
        scheme = QUANTIZERS[spec.scheme]
        scheme_report = SchemeReport(spec)
        report.schemes.append(scheme_report)
        if spec.scheme == "precision":
            dtype = torch_dtype(spec.options["dtype"])
            model.to(dtype)
            report.dtype = spec.options["dtype"]
            continue
        candidates = {name: m for name, m in model.named_modules() if type(m) is scheme.target}
        results = scheme.quantize(model, candidates, spec.options, calibration_tokens)
        for name, module in model.named_modules():
            if name in owner and _same_family(module, scheme.target):
                scheme_report.skipped[name] = f"already quantized by {owner[name]}"
        for name, result in results.items():
            if isinstance(result, str):
                scheme_report.skipped[name] = result
                continue
            model.set_submodule(name, result)
            owner[name] = spec.scheme
            scheme_report.quantized.append(name)
            if (padding := padding_of(result)) is not None:
                scheme_report.padded[name] = list(padding)
    if pack:
        pack_model(model)
    return report


def _same_family(module: nn.Module, target: type | None) -> bool:
    is_embedding = hasattr(module, "num_embeddings")
    return target is not None and isinstance(module, QuantizedModule) and is_embedding == (target is nn.Embedding)


def pack_model(model: nn.Module) -> None:
    """Runtime form for every quantized module still in plain form."""
    for module in model.modules():
        if isinstance(module, QuantizedModule) and not module.packed:
            module.pack()


def backend_support(specs: list[QuantSpec], backend: str) -> None:
    """Raise TorchatError if any spec gives wrong numbers or cannot run on `backend` (eager, aoti, et)."""
    for spec in specs:
        if spec.scheme not in QUANTIZERS:
            raise unknown_key_error("quantization scheme", spec.scheme, list(QUANTIZERS) + list(SCHEME_ALIASES))
    refused = refusal(specs, backend)
    if refused:
        raise TorchatError(f"quantization {refused[0]} is refused for backend {backend}: {refused[1]}")

