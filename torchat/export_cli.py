"""`torchat export`: lower a model to an AOT Inductor (.pt2, .so) or ExecuTorch (.pte) artifact.

    torchat export --gguf-path m.gguf --output-aoti-package-path m.pt2 [--quant JSON] [--dtype bf16]
    torchat export --checkpoint-dir artifacts/quantize/<key>-m/ --output-pte-path m.pte

The input is any checkpoint the model flags name, quantized here with --quant, or a quantized checkpoint
directory (one with quant.json) baked by `torchat quantize`. The artifact is checked against the eager model
before it is published; its tokenizer is written beside it (see --tokenizer-copy).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from torchat.errors import TorchatError
from torchat.loader import TORCH_DTYPES, add_model_arguments, checkpoint_path, find_tokenizer

DEFAULT_MAX_SEQ_LEN = 2048
OUTPUT_FLAGS = {"output_aoti_package_path": ".pt2", "output_dso_path": ".so", "output_pte_path": ".pte"}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_arguments(parser)
    out = parser.add_argument_group("output (one of)")
    out.add_argument("--output-aoti-package-path", type=Path, help="an AOT Inductor package (.pt2)")
    out.add_argument("--output-dso-path", type=Path, help="an AOT Inductor shared library (.so)")
    out.add_argument("--output-pte-path", type=Path, help="an ExecuTorch XNNPACK program (.pte)")
    out.add_argument("--output-path", type=Path, help="any of the above, the backend picked by the extension")
    parser.add_argument("--quant", help="quantization, as `torchat quantize --quant` takes it (JSON)")
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help=f"KV cache length inside the artifact (default: the model's context, at most "
                             f"{DEFAULT_MAX_SEQ_LEN})")
    parser.add_argument("--tokenizer-copy", action=argparse.BooleanOptionalAction, default=True,
                        help="write the tokenizer beside the artifact, named in its metadata (default: yes)")


def output_path(args: argparse.Namespace) -> Path:
    named = [(flag, getattr(args, flag)) for flag in (*OUTPUT_FLAGS, "output_path") if getattr(args, flag)]
    if len(named) != 1:
        raise TorchatError("pass exactly one of --output-aoti-package-path, --output-dso-path, --output-pte-path, "
                           "--output-path")
    flag, path = named[0]
    if flag in OUTPUT_FLAGS and path.suffix != OUTPUT_FLAGS[flag]:
        raise TorchatError(f"--{flag.replace('_', '-')} {path}: the file name must end in {OUTPUT_FLAGS[flag]}")
    return path


def quant_specs(args: argparse.Namespace, path: Path) -> list:
    """The quant specs of --quant, or of the baked checkpoint's quant.json; [] when not quantized."""
    baked = path.is_dir() and (path / "quant.json").is_file()
    if baked and args.quant:
        raise TorchatError(f"{path} is already quantized (quant.json); drop --quant")
    if not baked and not args.quant:
        return []
    from torchat.quant import QuantSpec, parse_quant

    if args.quant:
        return parse_quant(args.quant)
    manifest = json.loads((path / "quant.json").read_text())
    return [QuantSpec(spec["scheme"], spec["options"]) for spec in manifest["specs"]]


def load_model(args: argparse.Namespace, path: Path, specs: list):
    """(model quantized by `specs`, tokenizer or None, tokenizer source path or None) from the flags."""
    from torchat.checkpoint import build_model, read_checkpoint, resolve_args
    from torchat.tokenizers import load_tokenizer

    if path.is_dir() and (path / "quant.json").is_file():
        from torchat.quant import load_quantized

        model, metadata = load_quantized(path, args.device), {}
    else:
        checkpoint = read_checkpoint(path, args.format, resolve_args(args.params_table, args.params_path))
        model = build_model(checkpoint, TORCH_DTYPES[args.dtype], args.device)
        metadata = checkpoint.metadata
        if specs:
            from torchat.quant import quantize_model

            with torch.no_grad():
                print(quantize_model(model, specs).summary(), file=sys.stderr)
    dtype = model.norm.weight.dtype
    if dtype != TORCH_DTYPES[args.dtype]:
        raise TorchatError(f"{path} holds a {dtype} model but --dtype is {args.dtype}; pass the --dtype it was "
                           "quantized in")
    try:
        source = args.tokenizer_path or find_tokenizer(path, metadata)
    except TorchatError:
        print(f"torchat export: no tokenizer beside {path}; the artifact names none (pass --tokenizer-path)",
              file=sys.stderr)
        return model, None, None
    return model, load_tokenizer(source, args.tokenizer_kind), Path(source)


def copy_tokenizer(source: Path, kind: str, directory: Path) -> str:
    """Write the tokenizer into `directory` (atomically); returns its file name there."""
    name = "tokenizer.gguf" if kind == "gguf" else source.name
    destination = directory / name
    if destination.exists() and destination.resolve() == source.resolve():
        return name
    scratch = directory / f".{name}.{os.getpid()}.tmp"
    try:
        if kind == "gguf":
            from torchat.convert import write_tokenizer_gguf

            write_tokenizer_gguf(source, scratch)  # vocabulary only, not the whole model
        else:
            shutil.copyfile(source, scratch)
        os.replace(scratch, destination)
    finally:
        scratch.unlink(missing_ok=True)
    return name


def run(args: argparse.Namespace) -> int:
    from torchat.lowering import check_supported, export_model, lowering_for

    output = output_path(args)
    lowering = lowering_for(output)
    path = checkpoint_path(args)
    specs = quant_specs(args, path)
    # refuse a wrong dtype, device or quant scheme before minutes of loading and lowering
    check_supported(lowering, args.dtype, args.device, specs)
    model, tokenizer, tokenizer_source = load_model(args, path, specs)
    max_seq_len = args.max_seq_length or min(model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    tokenizer_file = None
    if tokenizer is not None:
        tokenizer_file = tokenizer_source.name if not args.tokenizer_copy else \
            ("tokenizer.gguf" if tokenizer.kind == "gguf" else tokenizer_source.name)
    report = export_model(model, output, max_seq_len=max_seq_len, dtype=str(args.dtype), device=args.device,
                          quant=[spec.to_dict() for spec in specs], quant_specs=specs, tokenizer=tokenizer,
                          tokenizer_file=tokenizer_file)
    if tokenizer is not None and args.tokenizer_copy:
        copy_tokenizer(tokenizer_source, tokenizer.kind, output.parent)
    print(report.summary(), file=sys.stderr)
    return 0
