"""`torchat generate`: stream a completion of --prompt, then one stats line on stderr."""

import argparse
import sys

import torch

from torchat.generate import EagerModel, GenerationStats, Sampling, generate
from torchat.loader import add_model_arguments, artifact_path, load_artifact, load_eager


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", default="Hello, my name is")
    parser.add_argument("--max-new-tokens", "--num-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seq-length", type=int, default=None,
                        help="KV cache length (default: prompt + max new tokens, within the model's context)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    parser.add_argument("--compile-prefill", action="store_true", help="torch.compile the prefill (dynamic shapes)")
    parser.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend BOS to the prompt (default: as the tokenizer says)")


def run(args: argparse.Namespace) -> int:
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    exported = artifact_path(args)
    if exported is not None:
        text_model, tokenizer = load_artifact(args, exported)
        prompt = tokenizer.encode(args.prompt, bos=tokenizer.add_bos if args.bos is None else args.bos)
    else:
        model, tokenizer, _ = load_eager(args)
        prompt = tokenizer.encode(args.prompt, bos=tokenizer.add_bos if args.bos is None else args.bos)
        cache_len = args.max_seq_length or min(len(prompt) + args.max_new_tokens, model.args.max_seq_len)
        text_model = EagerModel(model, cache_len, compile=args.compile, compile_prefill=args.compile_prefill)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    print_completion(text_model, tokenizer, prompt, args.max_new_tokens, sampling, generator, args.prompt)
    return 0


def print_completion(text_model, tokenizer, prompt, max_new_tokens, sampling, generator, prompt_text) -> None:
    from torchat.tokenizers import StreamDecoder

    stats = GenerationStats()
    decoder = StreamDecoder(tokenizer)
    sys.stdout.write(prompt_text)
    for token in generate(text_model, prompt, max_new_tokens, sampling, tokenizer.stop_ids, stats=stats,
                          generator=generator):
        if token in tokenizer.stop_ids:
            break
        sys.stdout.write(decoder.add(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    print(stats.summary(text_model.device), file=sys.stderr)
