"""`torchat convert`: any checkpoint format -> the canonical directory, published atomically.

The output holds model.safetensors, model_args.json, metadata.json and the tokenizer: the given
--tokenizer-path copied as is, or for a GGUF a vocabulary-only `tokenizer.gguf` (the file's tokenizer.* keys).
"""

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from torchat.errors import TorchatError
from torchat.loader import TORCH_DTYPES, DType, add_checkpoint_arguments, checkpoint_path


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--dtype", default=DType.fp32, choices=list(DType))
    parser.add_argument("--output-dir", type=Path, required=True)


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
                       tokenizer_path: Path | None = None, dtype: DType = DType.fp32) -> Path:
    """Read `source`, validate it, and publish the canonical form at `output_dir` (replacing it atomically)."""
    from torchat.checkpoint import read_checkpoint
    from torchat.checkpoint.canonical import write_canonical

    checkpoint = read_checkpoint(source, fmt, args)
    torch_dtype = TORCH_DTYPES[DType(dtype)]
    checkpoint.state_dict = {k: v.to(torch_dtype) for k, v in checkpoint.state_dict.items()}
    checkpoint.metadata |= {"source": str(source), "dtype": str(dtype)}
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        write_canonical(checkpoint, tmp)
        if tokenizer_path is not None:
            if not Path(tokenizer_path).is_file():
                raise TorchatError(f"{tokenizer_path}: no such tokenizer file; check --tokenizer-path")
            shutil.copyfile(tokenizer_path, tmp / Path(tokenizer_path).name)
        elif checkpoint.metadata["format"] == "gguf":
            write_tokenizer_gguf(source, tmp / "tokenizer.gguf")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.rename(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def run(args: argparse.Namespace) -> int:
    from torchat.checkpoint import resolve_args

    source = checkpoint_path(args)
    out = convert_checkpoint(source, args.output_dir, args.format, resolve_args(args.params_table, args.params_path),
                             args.tokenizer_path, args.dtype)
    print(f"converted {source} -> {out}")
    return 0
