"""Checkpoint conversion: any checkpoint format -> the canonical directory, published atomically; and the
tokenizer files a model directory carries.

The output holds model.safetensors, model_args.json, metadata.json and the tokenizer: the given
--tokenizer-path copied as is, or for a GGUF a vocabulary-only `tokenizer.gguf` (the file's tokenizer.* keys).
"""

import shutil
from pathlib import Path

from torchat.dtypes import torch_dtype
from torchat.errors import TorchatError
from torchat.publish import publish_dir
from torchat.vocabulary import Dtype


def write_tokenizer_gguf(source: Path, destination: Path) -> None:
    """A GGUF with no tensors that keeps only the tokenizer keys (and the architecture gguf insists on)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(destination, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def convert_checkpoint(source: Path, output_dir: Path, fmt: str | None = None, args=None,
                       tokenizer_path: Path | None = None, dtype: Dtype = Dtype.FP32) -> Path:
    """Read `source`, validate it, and publish the canonical form at `output_dir` (replacing it atomically)."""
    from torchat.checkpoint import read_checkpoint
    from torchat.checkpoint.canonical import write_canonical

    checkpoint = read_checkpoint(source, fmt, args)
    to = torch_dtype(dtype)
    checkpoint.state_dict = {k: v.to(to) for k, v in checkpoint.state_dict.items()}
    # the file's name, not its path: the same checkpoint converts to the same bytes wherever it lies (a store
    # names its inputs by their digests in the artifact's manifest)
    checkpoint.metadata |= {"source": Path(source).name, "dtype": str(dtype)}
    output_dir = Path(output_dir)
    with publish_dir(output_dir) as tmp:
        write_canonical(checkpoint, tmp)
        if tokenizer_path is not None:
            if not Path(tokenizer_path).is_file():
                raise TorchatError(f"{tokenizer_path}: no such tokenizer file; check --tokenizer-path")
            shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)
        elif checkpoint.metadata["format"] == "gguf":
            write_tokenizer_gguf(source, tmp / "tokenizer.gguf")
    return output_dir


def write_tokenizer_files(source: Path, tokenizer, directory: Path) -> list[Path]:
    """Write a model's tokenizer into `directory` beside an exported artifact: the tokenizer file (for a GGUF
    only its vocabulary, `tokenizer.gguf`) and the tokenizer.bin that the C++ runners read. Each is published
    atomically; a file that already is the source is left alone."""
    from torchat.publish import publish_file
    from torchat.tokenizer_bin import build_tokenizer_bin

    name = "tokenizer.gguf" if tokenizer.kind == "gguf" else source.name
    destination = directory / name
    if not (destination.exists() and destination.resolve() == Path(source).resolve()):
        with publish_file(destination) as scratch:
            if tokenizer.kind == "gguf":
                write_tokenizer_gguf(source, scratch)  # vocabulary only, not the whole model
            else:
                shutil.copyfile(source, scratch)
    with publish_file(directory / "tokenizer.bin") as scratch:
        scratch.write_bytes(build_tokenizer_bin(tokenizer))
    return [destination, directory / "tokenizer.bin"]
