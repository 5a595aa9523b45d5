"""`torchat tokenizer-bin`: write the tokenizer.bin that the C++ runners read (torchat.tokenizer_bin)."""

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from torchat.tokenizer_bin import CHAT_FORMATS

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer-path", type=Path, help="tokenizer.model, tokenizer.json or a .gguf")
    source.add_argument("--checkpoint-dir", type=Path, help="a converted checkpoint directory (its tokenizer)")
    parser.add_argument("--tokenizer", "--tokenizer-kind", dest="tokenizer_kind",
                        help="tokenizer kind, detected when omitted (sentencepiece, tiktoken, hf, gguf)")
    parser.add_argument("--chat-format", choices=sorted(CHAT_FORMATS),
                        help="the chat format the runner renders (default: read from the tokenizer)")
    parser.add_argument("--output", "--output-path", dest="output", type=Path, required=True)


def run(args: argparse.Namespace) -> int:
    from torchat.tokenizer_bin import build_tokenizer_bin, write_atomically
    from torchat.tokenizers import load_tokenizer

    # a converted checkpoint directory holds one tokenizer file (tokenizer.model, tokenizer.json or tokenizer.gguf)
    tokenizer = load_tokenizer(args.tokenizer_path or args.checkpoint_dir, args.tokenizer_kind)
    data = build_tokenizer_bin(tokenizer, args.chat_format)
    write_atomically(Path(args.output), data)
    print(f"wrote {args.output} ({len(data) / 2**20:.1f} MiB, {tokenizer.kind}, {tokenizer.vocab_size} tokens)")
    return 0
