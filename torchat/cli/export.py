"""`torchat export`: lower a model to an AOT Inductor (.pt2, .so) or ExecuTorch (.pte) artifact.

    torchat export [MODEL | --gguf-path m.gguf | ...] --output-aoti-package-path m.pt2 [--quant JSON] [--dtype bf16]
    torchat export artifacts/quantize/<key>-m/ --output-pte-path m.pte

The input is any model source that names a checkpoint (quantized here with --quant), or a quantized checkpoint
directory baked by `torchat quantize`. The artifact is checked against the eager model before it is published;
its tokenizer is written beside it, with the tokenizer.bin the C++ runners read (see --tokenizer-copy).
"""

import argparse
import sys
from pathlib import Path

from torchat.cli.flags import add_model_flags, model_source
from torchat.errors import TorchatError
from torchat.vocabulary import DEFAULT_MAX_SEQ_LEN

# the output flags: one per suffix a backend writes
OUTPUT_FLAGS = {"output_aoti_package_path": ".pt2", "output_dso_path": ".so", "output_pte_path": ".pte"}


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    out = parser.add_argument_group("output (one of)")
    out.add_argument("--output-aoti-package-path", type=Path, help="an AOT Inductor package (.pt2)")
    out.add_argument("--output-dso-path", type=Path, help="an AOT Inductor shared library (.so)")
    out.add_argument("--output-pte-path", type=Path, help="an ExecuTorch XNNPACK program (.pte)")
    out.add_argument("--output-path", type=Path, help="any of the above, the backend picked by the extension")
    out.add_argument("--tokenizer-copy", action=argparse.BooleanOptionalAction, default=True,
                     help="write the tokenizer and tokenizer.bin beside the artifact, named in its metadata "
                          "(default: yes)")


def output_path(args: argparse.Namespace) -> Path:
    named = [(flag, getattr(args, flag)) for flag in (*OUTPUT_FLAGS, "output_path") if getattr(args, flag)]
    if len(named) != 1:
        raise TorchatError("pass exactly one of --output-aoti-package-path, --output-dso-path, --output-pte-path, "
                           "--output-path")
    flag, path = named[0]
    if flag in OUTPUT_FLAGS and path.suffix != OUTPUT_FLAGS[flag]:
        raise TorchatError(f"--{flag.replace('_', '-')} {path}: the file name must end in {OUTPUT_FLAGS[flag]}")
    return path


def run(args: argparse.Namespace) -> int:
    from torchat.convert import write_tokenizer_files
    from torchat.lowering import check_supported, export_model, lowering_for
    from torchat.model_source import open_transformer, planned_quant, resolve

    output = output_path(args)
    lowering = lowering_for(output)
    source = model_source(args)
    if source.compile or source.compile_prefill:
        raise TorchatError("--compile applies to running a model; an export compiles it for its backend anyway")
    resolved = resolve(source)
    if resolved.kind == "artifact":
        raise TorchatError(f"{resolved.path} is already exported; export from the checkpoint it came from")
    specs, dtype = planned_quant(source, resolved)
    # refuse a wrong dtype, device or quant scheme before minutes of loading and lowering
    check_supported(lowering, dtype, source.device, specs)
    parts = open_transformer(source, need_tokenizer=False, resolved=resolved)
    if parts.tokenizer is None:
        print(f"torchat export: no tokenizer beside {resolved.path}; the artifact names none (pass "
              "--tokenizer-path)", file=sys.stderr)
    max_seq_len = source.max_seq_len or min(parts.model.args.max_seq_len, DEFAULT_MAX_SEQ_LEN)
    tokenizer_file = None
    if parts.tokenizer is not None:
        tokenizer_file = ("tokenizer.gguf" if parts.tokenizer.kind == "gguf" else parts.tokenizer_path.name) \
            if args.tokenizer_copy else parts.tokenizer_path.name
    report = export_model(parts.model, output, max_seq_len=max_seq_len, dtype=str(dtype), device=source.device,
                          quant=parts.quant, quant_specs=specs, tokenizer=parts.tokenizer,
                          tokenizer_file=tokenizer_file)
    if parts.tokenizer is not None and args.tokenizer_copy:
        write_tokenizer_files(parts.tokenizer_path, parts.tokenizer, output.parent)
    print(report.summary(), file=sys.stderr)
    return 0
