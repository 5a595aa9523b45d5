"""GGUF files (llama.cpp's format) read into torchat's canonical checkpoint.

The `gguf` package parses the file and dequantizes; this module maps llama.cpp's metadata to ModelArgs and
its tensor names to ours, reverses the stored shapes (GGUF lists dimensions innermost first) and permutes
q/k rows out of Meta's interleaved-pair rotary layout (llama.cpp's converter writes that layout) into the
model's rotate-half layout.
"""

import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from torchat.checkpoint.base import Checkpoint, check_state_dict, meta_to_hf_layout
from torchat.errors import TorchatError
from torchat.model import ModelArgs, rope_frequencies

SUPPORTED_ARCHITECTURES = ("llama",)

# The tensor types this reader dequantizes, keyed by the name llama.cpp gives them.
GGUF_TYPES: dict[str, GGMLQuantizationType] = {
    t.name: t for t in (
        GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
    )
}

# llama.cpp tensor name (without `.weight`) -> canonical name; per-layer names follow `blk.N.`
_GLOBAL_NAMES = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_NAMES = {
    "attn_norm": "attention_norm", "attn_q": "attention.wq", "attn_k": "attention.wk",
    "attn_v": "attention.wv", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_GGUF_GLOBAL_NAMES = {canonical: name for name, canonical in _GLOBAL_NAMES.items()}
_GGUF_LAYER_NAMES = {canonical: name for name, canonical in _LAYER_NAMES.items()}
# Llama-3.1-style files carry the rotary frequency divisors as a tensor, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"

# What the gguf reader raises on a truncated or malformed file: short reads surface as failed numpy views,
# reshapes and indexing, bad enum values and undecodable strings as ValueError, duplicates as KeyError.
_READER_ERRORS = (ValueError, IndexError, KeyError, OverflowError)


def gguf_metadata(path: Path) -> dict:
    """Every metadata key of a GGUF file -> its value (str, int, float, bool or list); no tensor data read."""
    path = Path(path)
    reader = _open_reader(path)
    return _read_fields(reader, path)


def read_gguf(path: Path, args: ModelArgs | None = None, dtype: torch.dtype = torch.float32) -> Checkpoint:
    """A llama-architecture GGUF file as a canonical checkpoint, every tensor dequantized to `dtype`.

    `args` overrides the configuration the file states. Tensors are dequantized one at a time so that the
    peak memory is the output plus one tensor.
    """
    path = Path(path)
    reader = _open_reader(path)
    fields = _read_fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    _check_types(tensors, path)
    if args is None:
        args = _args_from_metadata(fields, tensors, path)
    names = {gguf_name: _canonical_name(gguf_name, path) for gguf_name in tensors if gguf_name != _ROPE_FREQS}
    # fail on a missing or mis-shaped tensor before dequantizing anything
    check_state_dict({names[n]: torch.empty(_shape(t), device="meta") for n, t in tensors.items() if n in names},
                     args, path)

    state_dict = {}
    for gguf_name, name in names.items():
        tensor = _dequantize_tensor(tensors[gguf_name]).to(dtype)
        state_dict[name] = meta_to_hf_layout({name: tensor}, args)[name]
    metadata = {
        "architecture": fields["general.architecture"],
        "file_type": _file_type_name(fields.get("general.file_type")),
        "tokenizer_model": fields.get("tokenizer.ggml.model"),
        "tensor_types": dict(Counter(t.tensor_type.name for t in tensors.values())),
    }
    if "tokenizer.chat_template" in fields:
        metadata["chat_template"] = fields["tokenizer.chat_template"]
    return Checkpoint(state_dict=state_dict, args=args, metadata=metadata)


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise TorchatError(f"{path}: no such file; check the checkpoint path")
    try:
        reader = GGUFReader(path)
    except _READER_ERRORS as e:
        raise TorchatError(f"{path}: not a readable GGUF file ({e}); the file is truncated, corrupt or in "
                           "another format: download it again or check the path") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise TorchatError(f"{path}: tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} but the file "
                               f"has {size} bytes; the file is truncated: download it again")
    return reader


def _read_fields(reader: GGUFReader, path: Path) -> dict:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except _READER_ERRORS as e:
        raise TorchatError(f"{path}: unreadable GGUF metadata ({e}); the file is corrupt: download it again") from e


def _shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first: a (rows, cols) weight is stored as [cols, rows]
    return tuple(int(d) for d in reversed(tensor.shape))


def _canonical_name(gguf_name: str, path: Path) -> str:
    stem, dot, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if suffix == "weight" and len(parts) == 1 and stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.weight"
    if suffix == "weight" and len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() \
            and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    raise TorchatError(f"{path}: unexpected tensor {gguf_name!r}; torchat reads llama-architecture GGUF files "
                       "with the tensors llama.cpp's converter writes")


def gguf_tensor_name(canonical_name: str) -> str:
    """The GGUF (llama.cpp) name of a canonical tensor name: `_canonical_name`'s inverse, for writing a GGUF."""
    stem = canonical_name.removesuffix(".weight")
    if stem in _GGUF_GLOBAL_NAMES:
        return f"{_GGUF_GLOBAL_NAMES[stem]}.weight"
    _, layer, rest = stem.split(".", 2)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}.weight"


def _check_types(tensors: dict[str, ReaderTensor], path: Path) -> None:
    for t in tensors.values():
        if t.tensor_type.name not in GGUF_TYPES:
            raise TorchatError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which torchat cannot "
                               f"read; supported: {', '.join(sorted(GGUF_TYPES))} (re-quantize the model to one "
                               "of them)")


def _dequantize_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """float32 copy of one tensor, in PyTorch's (outermost-first) shape."""
    values = dequantize(tensor.data, tensor.tensor_type)
    if not values.flags.writeable:
        values = values.copy()  # F32 data comes back as a view of the read-only memory map
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(_shape(tensor))


def _file_type_name(value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return LlamaFileType(value).name
    except ValueError:
        return str(value)


def _args_from_metadata(fields: dict, tensors: dict[str, ReaderTensor], path: Path) -> ModelArgs:
    arch = fields.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise TorchatError(f"{path}: architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def value(key: str, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise TorchatError(f"{path}: metadata key {arch}.{key} is missing; the file is incomplete (or pass "
                               "--params-table/--params-path)")
        if isinstance(v, list):  # per-layer values: torchat's model has one for all layers
            if len(set(v)) != 1:
                raise TorchatError(f"{path}: {arch}.{key} varies across layers ({v}); torchat's model needs "
                                   "one value for all layers")
            v = v[0]
        return v

    if "token_embd.weight" not in tensors:
        raise TorchatError(f"{path}: tensor 'token_embd.weight' is missing; the file is incomplete")
    n_heads = int(value("attention.head_count"))
    args = ModelArgs(
        dim=int(value("embedding_length")),
        n_layers=int(value("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(value("attention.head_count_kv", n_heads)),
        # the embedding's rows are the model's vocabulary, even where the token list is shorter
        vocab_size=_shape(tensors["token_embd.weight"])[0],
        hidden_dim=int(value("feed_forward_length")),
        norm_eps=_from_float32(value("attention.layer_norm_rms_epsilon")),
        rope_theta=_from_float32(value("rope.freq_base", 10000.0)),
        max_seq_len=int(value("context_length")),
        tie_embeddings="output.weight" not in tensors,
    )
    rope_dim = int(value("rope.dimension_count", args.head_dim))
    if rope_dim != args.head_dim:
        raise TorchatError(f"{path}: rotary dimension {rope_dim} differs from head_dim {args.head_dim}; torchat "
                           "supports full-width rotary embeddings only")
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" and float(fields.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0:
        raise TorchatError(f"{path}: rope scaling {scaling!r} is not supported; torchat supports Llama-3.1-style "
                           "scaling (a rope_freqs tensor) only")
    if _ROPE_FREQS in tensors:
        original = int(fields.get(f"{arch}.rope.scaling.original_context_length", 8192))
        args.rope_scaling = _rope_scaling_from_factors(_dequantize_tensor(tensors[_ROPE_FREQS]).double(), args,
                                                       original, path)
    return args


def _from_float32(value: float) -> float:
    """The shortest decimal that the stored float32 rounds from: 9.999999747e-06 -> 1e-05."""
    return float(str(np.float32(value)))


def _rope_scaling_from_factors(factors: torch.Tensor, args: ModelArgs, original: int, path: Path) -> dict | None:
    """Recover ModelArgs.rope_scaling from llama.cpp's per-frequency divisors, factors (head_dim // 2,).

    llama.cpp divides frequency i by factors[i]: 1 for short wavelengths, `factor` for long ones, and between
    them 1 / ((1 - s) / factor + s) with s = (original / wavelength - low) / (high - low). `factor` is the
    largest divisor; the ramp's points give (low, high) by a straight-line fit of s against original /
    wavelength; a ramp of under two points cannot say, and Meta's (1, 4) is taken. The result is checked by
    rebuilding the model's rotary table.
    """
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return None
    half = args.head_dim // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(half, dtype=torch.float64) * 2 / args.head_dim))
    ramp = (factors > 1.0 + 1e-4) & (factors < factor - 1e-4)
    low, high = 1.0, 4.0
    if int(ramp.sum()) >= 2:
        s = (1 / factors[ramp] - 1 / factor) / (1 - 1 / factor)
        x = original * inv_freq[ramp] / (2 * math.pi)  # original / wavelength
        slope, intercept = np.polyfit(x.numpy(), s.numpy(), 1)  # s = slope * x + intercept
        low, high = -intercept / slope, (1 - intercept) / slope
    scaling = dict(factor=round(factor, 4), low_freq_factor=round(float(low), 4),
                   high_freq_factor=round(float(high), 4), original_max_position_embeddings=original)
    # the model's angles at position 1 are its inverse frequencies; they must equal llama.cpp's
    cos, sin = rope_frequencies(ModelArgs(**{**args.to_dict(), "rope_scaling": scaling}), 2)
    ours = torch.atan2(sin[1, :half].double(), cos[1, :half].double())
    if not torch.allclose(ours, inv_freq / factors, rtol=1e-4, atol=0):
        raise TorchatError(f"{path}: the rope_freqs tensor is not Llama-3.1-style frequency scaling; torchat "
                           "cannot reproduce it (pass --params-path with a rope_scaling that matches)")
    return scaling
