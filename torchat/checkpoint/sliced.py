"""Parts of a checkpoint's tensors, read without the rest: what one tensor-parallel rank loads (torchat.parallel).

    sliced = open_sliced(path)                       # the config and metadata; no tensor data read
    sliced.read("layers.0.attention.wq.weight", Slice.span(0, 0, 256), torch.float32)   # rows 0..255 only

Safetensors files (torchat's converted form, Hugging Face) are read at the slice's byte offsets (positioned reads,
no memory map); a GGUF file is memory-mapped by the gguf reader and only the slice's rows, or the quantization
blocks of its columns, are read and dequantized. So a rank's resident memory is its slices, not the model (for a
GGUF, plus the mapped pages of its own quantized slices). Other formats (Meta and
llama2.c pickles, pytorch_model.bin) cannot be sliced without loading them: convert them first.
"""

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from torchat.checkpoint.base import check_state_dict, permute_meta_to_hf
from torchat.errors import TorchatError
from torchat.model import ModelArgs

SLICEABLE_FORMATS = ("gguf", "hf", "torchat")


@dataclass(frozen=True)
class Slice:
    """The part of one tensor to read: all of it (dim None), or the concatenation along `dim` of the index ranges
    [start, stop) in `ranges` (a range may be listed twice: a repeated KV head)."""

    dim: int | None = None
    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def span(cls, dim: int, start: int, stop: int) -> "Slice":
        return cls(dim, ((start, stop),))


WHOLE = Slice()


@dataclass
class SlicedCheckpoint:
    """A checkpoint opened for slicing: `args`, `metadata`, and `read(name, part, dtype)` in canonical form."""

    args: ModelArgs
    metadata: dict
    reader: object                      # _SafetensorsTensors or _GGUFTensors
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def read(self, name: str, part: Slice, dtype: torch.dtype) -> torch.Tensor:
        if part.dim is None:
            return self.reader.read(name, None, None).to(dtype)
        pieces, done = [], {}
        for start, stop in part.ranges:
            if (start, stop) not in done:  # a repeated range is read once
                done[(start, stop)] = self.reader.read(name, part.dim, (start, stop)).to(dtype)
            pieces.append(done[(start, stop)])
        return torch.cat(pieces, dim=part.dim) if len(pieces) > 1 else pieces[0].contiguous()


def open_sliced(path: Path, fmt: str | None = None, args: ModelArgs | None = None) -> SlicedCheckpoint:
    """A checkpoint file or directory opened for reading slices; its shapes are checked against its config."""
    from torchat.checkpoint import detect_format

    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "gguf":
        sliced = _open_gguf(path, args)
    elif fmt in ("torchat", "hf"):
        sliced = _open_safetensors(path, fmt, args)
    else:
        raise TorchatError(f"{path}: a {fmt} checkpoint cannot be read in slices (--tp reads "
                           f"{', '.join(SLICEABLE_FORMATS)}); "
                           f"convert it first: torchat convert {path} --output-dir DIR")
    check_state_dict({k: torch.empty(s, device="meta") for k, s in sliced.shapes.items()}, sliced.args, path)
    sliced.metadata.setdefault("format", fmt)
    return sliced


# --- safetensors -----------------------------------------------------------------------------------------------

class _SafetensorsTensors:
    """Canonical name -> a tensor's place in a safetensors file, read by positioned reads (os.preadv) rather than a
    memory map: a mapped page that was read counts in the process's resident memory until unmapped, so a rank reading
    its half of a mapped file would peak at the whole model's size (its slices' pages plus their copies)."""

    def __init__(self, files: dict[str, tuple[Path, str]]):
        self.fds = {file: os.open(file, os.O_RDONLY) for file in {f for f, _ in files.values()}}
        headers = {file: _safetensors_header(file) for file in self.fds}
        self.entries = {}  # name -> (fd, dtype, shape, absolute byte offset)
        for name, (file, key) in files.items():
            base, header = headers[file]
            entry = header[key]
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise TorchatError(f"{file}: tensor {key!r} is {entry['dtype']}; --tp reads "
                                   f"{', '.join(_SAFETENSORS_DTYPES)} tensors")
            self.entries[name] = (self.fds[file], _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                  base + entry["data_offsets"][0])

    def __del__(self):
        for fd in getattr(self, "fds", {}).values():
            os.close(fd)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, dim: int | None, span: tuple[int, int] | None) -> torch.Tensor:
        fd, dtype, shape, offset = self.entries[name]
        size = dtype.itemsize
        row = math.prod(shape[1:]) * size  # bytes of one row (dim 0 entry)
        if dim is None:
            out = torch.empty(shape, dtype=dtype)
            _read_into(fd, out, offset)
        elif dim == 0:
            out = torch.empty((span[1] - span[0], *shape[1:]), dtype=dtype)
            _read_into(fd, out, offset + span[0] * row)
        else:  # columns of a matrix: a piece of every row
            assert dim == 1 and len(shape) == 2, (name, shape, dim)
            out = torch.empty((shape[0], span[1] - span[0]), dtype=dtype)
            for r in range(shape[0]):
                _read_into(fd, out[r], offset + r * row + span[0] * size)
        return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(the data's start, the header: key -> {dtype, shape, data_offsets}) of a safetensors file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _read_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous tensor `out` with the bytes at `offset`."""
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise TorchatError(f"a safetensors file ends before tensor data at byte {offset + done}; the file is "
                               "truncated: download or convert it again")
        done += n


def _open_safetensors(path: Path, fmt: str, args: ModelArgs | None) -> SlicedCheckpoint:
    directory = path if path.is_dir() else path.parent
    if fmt == "torchat":
        from torchat.checkpoint.canonical import ARGS, METADATA, WEIGHTS

        files = [directory / WEIGHTS]
        args = args or ModelArgs.from_json(directory / ARGS)
        metadata = json.loads((directory / METADATA).read_text()) if (directory / METADATA).is_file() else {}
        rename = lambda key: key  # noqa: E731 - canonical names already
    else:
        from torchat.checkpoint.hf import _weight_files, args_from_hf_config, canonical_name

        files = _weight_files(directory)
        if args is None:
            args = args_from_hf_config(json.loads((directory / "config.json").read_text()))
        metadata, rename = {"format": "hf"}, canonical_name
    not_safetensors = [f for f in files if f.suffix != ".safetensors"]
    if not_safetensors:
        raise TorchatError(f"{not_safetensors[0]}: --tp slices safetensors files only; convert the checkpoint first "
                           f"(torchat convert {path} --output-dir DIR)")
    keys = {}
    try:
        for file in files:
            keys |= {name: (file, key) for key in _safetensors_header(file)[1] if (name := rename(key)) is not None}
        tensors = _SafetensorsTensors(keys)
    except (OSError, ValueError, KeyError, struct.error) as error:
        raise TorchatError(f"{files[0]}: unreadable safetensors header ({error}); download or convert it "
                           "again") from None
    shapes = {name: tensors.shape(name) for name in keys}
    return SlicedCheckpoint(args, metadata, tensors, shapes)


# --- GGUF ------------------------------------------------------------------------------------------------------

class _GGUFTensors:
    """Canonical name -> the gguf reader's tensor (a view of the memory map); slices dequantized on their own."""

    def __init__(self, tensors: dict, args: ModelArgs, path: Path):
        self.tensors, self.args, self.path = tensors, args, path

    def read(self, name: str, dim: int | None, span: tuple[int, int] | None) -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        from torchat.checkpoint.gguf import _shape

        tensor = self.tensors[name]
        shape = _shape(tensor)
        data, qtype = tensor.data, tensor.tensor_type
        if dim == 0:
            data, shape = data[span[0]:span[1]], (span[1] - span[0], *shape[1:])
        elif dim == 1:
            start, stop = span
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                data = data[:, start:stop]
            else:  # (rows, bytes): whole quantization blocks of each row
                block, size = GGML_QUANT_SIZES[qtype]
                if start % block or stop % block:
                    raise TorchatError(f"{self.path}: {name} is {qtype.name}, in blocks of {block} columns; columns "
                                       f"{start}..{stop} split a block: use a --tp that splits it on block bounds")
                data = data[:, start // block * size:stop // block * size]
            shape = (shape[0], stop - start)
        values = dequantize(np.ascontiguousarray(data), qtype)
        out = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            # whole heads in llama.cpp's interleaved-pair rotary layout -> the model's rotate-half layout
            out = permute_meta_to_hf(out, out.shape[0] // self.args.head_dim)
        return out


def _open_gguf(path: Path, args: ModelArgs | None) -> SlicedCheckpoint:
    from collections import Counter

    from torchat.checkpoint.gguf import (_ROPE_FREQS, _args_from_metadata, _canonical_name, _check_types,
                                         _file_type_name, _open_reader, _read_fields, _shape)

    reader = _open_reader(path)
    fields = _read_fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    _check_types(tensors, path)
    args = args or _args_from_metadata(fields, tensors, path)
    named = {_canonical_name(n, path): t for n, t in tensors.items() if n != _ROPE_FREQS}
    metadata = {"architecture": fields["general.architecture"],
                "file_type": _file_type_name(fields.get("general.file_type")),
                "tokenizer_model": fields.get("tokenizer.ggml.model"),
                "tensor_types": dict(Counter(t.tensor_type.name for t in tensors.values()))}
    if "tokenizer.chat_template" in fields:
        metadata["chat_template"] = fields["tokenizer.chat_template"]
    return SlicedCheckpoint(args, metadata, _GGUFTensors(named, args, path),
                            {name: _shape(t) for name, t in named.items()})
