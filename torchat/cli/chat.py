"""`torchat chat`: a multi-turn conversation that keeps its KV cache between turns (torchat.chat.ChatSession).

Reads one user message a line (a prompt when stdin is a terminal); Ctrl-C stops an answer, Ctrl-D ends.
"""

import argparse
import sys

from torchat.cli.flags import (add_generation_flags, add_model_flags, add_parallel_flags, generator_of, model_source,
                               sampling_of)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    add_parallel_flags(parser)
    add_generation_flags(parser)
    parser.add_argument("--system", help="the system prompt")
    parser.add_argument("--chat-template", help="jinja (the tokenizer's own), llama3 or llama2; chosen from the "
                                                "tokenizer when omitted")
    parser.add_argument("--stats", action="store_true", help="a stats line on stderr after each answer")


def run(args: argparse.Namespace) -> int:
    from torchat.chat import ChatSession
    from torchat.model_source import open_model
    from torchat.templates import pick_template
    from torchat.tokenizers import StreamDecoder

    sampling = sampling_of(args)
    opened = open_model(model_source(args))
    text_model, tokenizer = opened.text_model, opened.tokenizer
    template = pick_template(tokenizer, args.chat_template)
    session = ChatSession(text_model, tokenizer, template, sampling, args.max_new_tokens, args.system,
                          generator_of(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"torchat chat ({template} format, {text_model.max_seq_len}-token context). Ctrl-C stops an answer, "
              "Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if not line.strip():
            continue
        decoder = StreamDecoder(tokenizer)
        try:
            for token in session.reply(line):
                sys.stdout.write(decoder.add(token))
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write(decoder.flush() + "\n")
        sys.stdout.flush()
        if args.stats:
            print(session.stats.summary(text_model.device), file=sys.stderr)
