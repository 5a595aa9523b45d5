"""`torchat quantize`: bake a quantized checkpoint (quantized weights + quant.json) from a float checkpoint.

    torchat quantize --checkpoint-dir ckpt --quant '{"linear:int4": {"groupsize": 32}}' --dtype fp32 --output-dir out

The output loads with torchat.quant.load_quantized and runs without quantizing again. The report (which
modules each scheme quantized, padded or skipped, and why) goes to stderr and into quant.json.
"""

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--checkpoint-dir", type=Path, required=True,
                        help="the float checkpoint (a `torchat convert` directory, or any format torchat reads)")
    parser.add_argument("--quant", "--quantize", dest="quant", required=True,
                        help="quantization JSON (or a file holding it), e.g. '{\"linear:int4\": {\"groupsize\": 32}}'")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="dtype of the float weights and scales (a precision spec overrides it)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--tokenizer-path", type=Path, default=None,
                        help="tokenizer for GPTQ's calibration text (default: the one in --checkpoint-dir)")


def run(args: argparse.Namespace) -> int:
    from torchat.quant import bake_quantized, parse_quant, read_report

    specs = parse_quant(args.quant)
    out = bake_quantized(args.checkpoint_dir, specs, args.dtype, args.output_dir, args.tokenizer_path)
    print(read_report(out).summary(), file=sys.stderr)
    print(f"quantized {args.checkpoint_dir} -> {out}")
    return 0
