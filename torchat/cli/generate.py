"""`torchat generate`: stream a completion of --prompt, then one stats line on stderr."""

import argparse
import sys

from torchat.cli.flags import (add_generation_flags, add_model_flags, add_parallel_flags, generator_of, model_source,
                               sampling_of)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    add_parallel_flags(parser)
    add_generation_flags(parser)
    parser.add_argument("--prompt", default="Hello, my name is")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend BOS to the prompt (default: as the tokenizer says)")


def run(args: argparse.Namespace) -> int:
    from torchat.generate import generate_text
    from torchat.model_source import open_model

    sampling = sampling_of(args)  # a bad setting fails before minutes of loading
    opened = open_model(model_source(args))
    stats = generate_text(opened, args.prompt, args.max_new_tokens, sampling, generator_of(args), bos=args.bos,
                          write=_write, fit_cache=args.max_seq_length is None)
    print(stats.summary(opened.text_model.device), file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
