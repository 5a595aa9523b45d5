"""`torchat quantize`: bake a quantized checkpoint (quantized weights + quant.json) from a float checkpoint.

    torchat quantize [MODEL | --checkpoint-dir ckpt] --quant '{"linear:int4": {"groupsize": 32}}' --dtype fp32 \\
        --output-dir out

The output loads with torchat.quant.load_quantized (and every verb opens it as MODEL) and runs without
quantizing again. The report (which modules each scheme quantized, padded or skipped, and why) goes to stderr
and into quant.json.
"""

import argparse
import sys
from pathlib import Path

from torchat.cli.flags import add_model_flags, model_source
from torchat.errors import TorchatError


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    parser.add_argument("--output-dir", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    from torchat.model_source import resolve
    from torchat.quant import bake_quantized, parse_quant, read_report
    from torchat.vocabulary import Dtype

    source = model_source(args)
    if not source.quant:
        raise TorchatError("quantize needs --quant (JSON or a file holding it), e.g. "
                           "'{\"linear:int4\": {\"group_size\": 32}}'")
    specs = parse_quant(source.quant)  # a bad --quant fails before the checkpoint is read
    resolved = resolve(source)
    if resolved.kind != "checkpoint":
        raise TorchatError(f"{resolved.path} is {'already quantized' if resolved.kind == 'baked' else 'exported'}; "
                           "quantize a float checkpoint")
    out = bake_quantized(resolved.path, specs, str(source.dtype or Dtype.FP32), args.output_dir,
                         source.tokenizer_path)
    print(read_report(out).summary(), file=sys.stderr)
    print(f"quantized {resolved.path} -> {out}")
    return 0
