"""The `--quant` option: JSON (or the seed's single-quoted Python-dict spelling) -> ordered `QuantSpec`s.

    parse_quant('{"linear:int4": {"groupsize": 32}, "embedding": {"bitwidth": 8}}')
      -> [QuantSpec("linear:int4", {"group_size": 32, "head_bitwidth": 4}),
          QuantSpec("embedding", {"bitwidth": 8, "group_size": 0})]

Each scheme declares its options here: one spelling per field after normalisation (`groupsize` -> `group_size`),
defaults filled in, every value checked, so two spellings of the same request give equal specs (and keys); and the
backends that refuse it, with the reason. Standard library only: the build graph normalises presets with it.
"""

import ast
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torchat.errors import TorchatError, unknown_key_error
from torchat.vocabulary import Backend, Dtype, dtype_name

INT4_GROUP_SIZES = (32, 64, 128, 256)

# the seed's alternative spellings of option names
OPTION_SPELLINGS = {"groupsize": "group_size"}
# the seed's alternative scheme tokens -> the registry key
SCHEME_ALIASES = {"linear:a8w4dq": "linear:8da4w", "linear:int4-gptq": "linear:gptq"}


@dataclass(frozen=True)
class QuantSpec:
    """One quantization step: a registry key of QUANTIZERS and its normalised options."""

    scheme: str
    options: dict = field(default_factory=dict)

    def __hash__(self):
        return hash((self.scheme, json.dumps(self.options, sort_keys=True)))

    def to_dict(self) -> dict:
        return {"scheme": self.scheme, "options": dict(self.options)}


@dataclass(frozen=True)
class Option:
    default: Any
    check: Callable[[Any], bool]
    allowed: str  # said in the error when `check` fails


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choice(*values) -> Option:
    return Option(values[0], lambda v: v in values, f"one of {', '.join(map(str, values))}")


def _group(default, allowed: tuple[int, ...]) -> Option:
    return Option(default, lambda v: _is_int(v) and v in allowed, f"one of {', '.join(map(str, allowed))}")


def _positive_int(default) -> Option:
    return Option(default, lambda v: _is_int(v) and v > 0, "a positive integer")


_CALIBRATION = {
    "calibration_limit": _positive_int(8),  # calibration sequences
    "calibration_seq_length": _positive_int(512),  # tokens per sequence
    "percdamp": Option(0.01, lambda v: isinstance(v, (int, float)) and 0 < v < 1, "a number in (0, 1)"),
    "blocksize": _group(128, (32, 64, 128, 256, 512)),
}

# scheme -> option name -> Option. Keys must match torchat.quant.schemes.QUANTIZERS (a test checks).
SCHEME_OPTIONS: dict[str, dict[str, Option]] = {
    "embedding": {"bitwidth": _choice(8, 4),
                  "group_size": Option(0, lambda v: _is_int(v) and (v == 0 or v in (32, 64, 128, 256)),
                                       "0 (one scale per row) or one of 32, 64, 128, 256")},
    "linear:int8": {"bitwidth": _choice(8),
                    "group_size": Option(0, lambda v: _is_int(v) and (v == 0 or v in (32, 64, 128, 256)),
                                         "0 (one scale per output channel) or one of 32, 64, 128, 256")},
    # head_bitwidth 8 (here and in 8da4w): the output projection as 8da8w (per-channel int8 weights) instead
    "linear:int4": {"group_size": _group(128, INT4_GROUP_SIZES), "head_bitwidth": _choice(4, 8)},
    # grid: "symmetric" re-quantizes onto XNNPACK's zero-point-8 grid (ExecuTorch's recipe); "asymmetric" keeps a
    # scale and an offset per group on the same kernel, plus a per-group correction (torchat.quant.asym4)
    "linear:8da4w": {"group_size": _group(256, INT4_GROUP_SIZES), "bitwidth": _choice(4),
                     "grid": _choice("symmetric", "asymmetric"), "head_bitwidth": _choice(4, 8)},
    "linear:8da8w": {"group_size": Option(0, lambda v: v == 0, "0 (one scale per output channel: XNNPACK has "
                                          "no group-wise int8 kernel)"), "bitwidth": _choice(8)},
    "linear:gptq": {"group_size": _group(128, INT4_GROUP_SIZES), **_CALIBRATION},
    "linear:hqq": {"group_size": _group(128, INT4_GROUP_SIZES)},
    "precision": {"dtype": Option(Dtype.FP32, lambda v: isinstance(v, str) and dtype_name(v) is not None,
                                  f"one of {', '.join(Dtype)}")},
}

_WEIGHT_ONLY_ET = ("weight-only linear quantization lowered to ExecuTorch's XNNPACK delegate gives silently wrong "
                   "logits (its scales are dropped: errors of 200-3000 on a logit scale of 5)")
_TINYGEMM_ET = ("int4 weight-only's kernel (torchat::linear_w4 on CPU) has no ExecuTorch kernel, and the "
                "weight-only int4 forms XNNPACK takes give silently wrong logits")
_ET_FIX = "use linear:8da4w (int8 dynamic activations, int4 weights), which XNNPACK runs correctly"

# scheme -> backend -> why its numbers would be wrong there (or it cannot run there); read by
# torchat.quant.backend_support before an export and by the build graph, which leaves such targets out
REFUSED: dict[str, dict[Backend, str]] = {
    "linear:int8": {Backend.ET: f"{_WEIGHT_ONLY_ET}; {_ET_FIX}"},
    "linear:int4": {Backend.ET: f"{_TINYGEMM_ET}; {_ET_FIX}"},
    "linear:gptq": {Backend.ET: f"{_TINYGEMM_ET}; {_ET_FIX}"},
    "linear:hqq": {Backend.ET: f"{_TINYGEMM_ET}; {_ET_FIX}"},
}


def parse_quant(text_or_path: str) -> list[QuantSpec]:
    """The specs of a --quant value (JSON text, the seed's Python-dict text, or a file holding either), in order."""
    text = text_or_path.strip()
    where = "--quant"
    if text and text[0] not in "{[":
        path = Path(text)
        if not path.is_file():
            raise TorchatError(f"--quant {text_or_path!r}: neither a JSON object nor a readable file; pass e.g. "
                               "'{\"linear:int4\": {\"group_size\": 32}}'")
        text, where = path.read_text().strip(), str(path)
    return specs_from_dict(_load_mapping(text, where), where)


def _load_mapping(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as json_error:
        try:  # the seed's examples use single-quoted Python dict syntax
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise TorchatError(f"{where}: not valid JSON ({json_error}); write e.g. "
                               "'{\"linear:int4\": {\"group_size\": 32}}'") from None
    if not isinstance(value, dict):
        raise TorchatError(f"{where}: expected a JSON object mapping scheme -> options, got {type(value).__name__}")
    return value


def specs_from_dict(mapping: dict, where: str = "--quant") -> list[QuantSpec]:
    """Check and normalise {scheme: options} (insertion order kept)."""
    specs, seen = [], set()
    for token, options in mapping.items():
        scheme = SCHEME_ALIASES.get(token, token)
        if scheme not in SCHEME_OPTIONS:
            raise unknown_key_error(f"quantization scheme in {where}:", token,
                                    list(SCHEME_OPTIONS) + list(SCHEME_ALIASES))
        if scheme in seen:
            raise TorchatError(f"{where}: scheme {scheme!r} given twice (as {token!r}); give it once")
        seen.add(scheme)
        specs.append(QuantSpec(scheme, normalise_options(scheme, options, where)))
    return specs


def normalise_options(scheme: str, options, where: str = "--quant") -> dict:
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise TorchatError(f"{where}: options of {scheme!r} must be an object, got {options!r}")
    schema = SCHEME_OPTIONS[scheme]
    out = {}
    for raw_name, value in options.items():
        name = OPTION_SPELLINGS.get(raw_name, raw_name)
        if name not in schema:
            raise TorchatError(f"{where}: unknown option {raw_name!r} for {scheme!r}; allowed: "
                               f"{', '.join(sorted(schema))}")
        if name in out:
            raise TorchatError(f"{where}: option {name!r} of {scheme!r} given twice (as {raw_name!r})")
        option = schema[name]
        if not option.check(value):
            raise TorchatError(f"{where}: {scheme} {raw_name} = {value!r} is not allowed; use {option.allowed}")
        out[name] = value
    for name, option in schema.items():
        out.setdefault(name, option.default)
    if scheme == "precision":
        out["dtype"] = str(dtype_name(out["dtype"]))
    if scheme == "embedding" and out["bitwidth"] == 4 and out["group_size"] == 0:
        raise TorchatError(f"{where}: embedding bitwidth 4 needs a group_size (32, 64, 128 or 256), not 0")
    if scheme == "linear:gptq" and out["blocksize"] % out["group_size"] and out["group_size"] % out["blocksize"]:
        raise TorchatError(f"{where}: linear:gptq blocksize {out['blocksize']} and group_size "
                           f"{out['group_size']} must divide one another")
    return dict(sorted(out.items()))


def specs_to_json(specs: list[QuantSpec]) -> str:
    """The canonical JSON of specs (the inverse of parse_quant for normalised specs)."""
    return json.dumps({spec.scheme: spec.options for spec in specs})


def refusal(specs: list[QuantSpec], backend: str) -> tuple[str, str] | None:
    """(scheme, why) for the first of these specs that `backend` refuses, or None."""
    if backend not in list(Backend):
        raise unknown_key_error("backend", backend, Backend)
    for spec in specs:
        reason = REFUSED.get(spec.scheme, {}).get(Backend(backend))
        if reason:
            return spec.scheme, reason
    return None
