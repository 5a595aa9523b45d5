"""`torchat convert`: any checkpoint format -> torchat's canonical directory (torchat.convert)."""

import argparse
from pathlib import Path

from torchat.cli.flags import add_checkpoint_flags, dtype, model_source
from torchat.vocabulary import Dtype


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_checkpoint_flags(parser)
    parser.add_argument("--dtype", "-d", type=dtype, default=Dtype.FP32, help=f"{', '.join(Dtype)} (default fp32)")
    parser.add_argument("--output-dir", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    from torchat.checkpoint import resolve_args
    from torchat.convert import convert_checkpoint
    from torchat.errors import TorchatError
    from torchat.model_source import resolve

    resolved = resolve(model_source(args))
    if resolved.kind != "checkpoint":
        raise TorchatError(f"{resolved.path} is not a float checkpoint (it is {resolved.kind}); convert reads "
                           "checkpoints")
    out = convert_checkpoint(resolved.path, args.output_dir, resolved.format,
                             resolve_args(args.params_table, args.params_path), args.tokenizer_path, args.dtype)
    print(f"converted {resolved.path} -> {out}")
    return 0
