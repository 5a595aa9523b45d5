"""The flag groups, each defined once: every verb that takes a flag takes it with the same spelling, aliases,
default and help. The seed's spellings are aliases (`--quantize`, `--compile_prefill`, `--load_gguf`, `--pte`,
`-d`); parsers refuse abbreviations (allow_abbrev=False), so `--pte-p` never half-works.

Numbers are checked here, at parse time, with a one-line error: nothing below the CLI sees a negative count.
"""

import argparse
import os
from pathlib import Path

from torchat.errors import TorchatError
from torchat.model_source import ModelSource
from torchat.threads import PTE_FLAGS
from torchat.vocabulary import DEFAULT_MAX_SEQ_LEN, Device, Dtype, dtype_name

# --- value types: a bad value is one line naming the flag's rule ---------------------------------------------


def _number(parse, accept, rule: str):
    """An argparse type: `parse` the text, keep it when `accept`s it, else a one-line error naming `rule`."""
    def convert(value: str):
        try:
            number = parse(value)
        except ValueError:
            number = None
        if number is None or not accept(number):
            raise argparse.ArgumentTypeError(f"{value!r} is not {rule}")
        return number
    return convert


positive_int = _number(int, lambda n: n >= 1, "a positive integer")
non_negative_int = _number(int, lambda n: n >= 0, "an integer >= 0")
non_negative_float = _number(float, lambda n: 0 <= n < float("inf"), "a finite number >= 0")
probability = _number(float, lambda n: 0 < n <= 1, "a number in (0, 1]")


def dtype(value: str) -> Dtype:
    name = dtype_name(value)
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; choose one of: {', '.join(Dtype)}")
    return name


# --- the groups ------------------------------------------------------------------------------------------------

ARTIFACT_FLAGS = ("aoti_package_path", "dso_path", "pte_path")
CHECKPOINT_FLAGS = ("checkpoint_path", "checkpoint_dir", "gguf_path")


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """What names a model: MODEL, or one path flag; and how to read it (convert takes these alone)."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a catalog model (`torchat list`), a build target MODEL-QUANT[-DTYPE]-BACKEND, or a path: "
                             "a checkpoint file or directory, a quantized checkpoint, a .pt2, .so or .pte "
                             "(default: SmolLM2-135M-Instruct)")
    group = parser.add_argument_group("model")
    group.add_argument("--checkpoint-path", type=Path, help="a checkpoint file or directory (any --format)")
    group.add_argument("--checkpoint-dir", type=Path, help="a directory holding a checkpoint, or a quantized one")
    group.add_argument("--gguf-path", "--load_gguf", dest="gguf_path", type=Path, help="a GGUF file")
    group.add_argument("--format", help="checkpoint format, detected when omitted (gguf, llama2c, meta, hf, torchat)")
    group.add_argument("--params-table", help="a known config name (see torchat/configs.py)")
    group.add_argument("--params-path", type=Path, help="a JSON file of ModelArgs fields")
    group.add_argument("--tokenizer-path", type=Path, help="tokenizer file; found beside the model if omitted")
    group.add_argument("--allow-unpinned", action="store_true",
                       help="accept a catalog model's file whose sha256 differs from its recorded pin")
    return group


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Every flag that opens a model (generate, chat, eval, bench, export, quantize, server)."""
    group = add_checkpoint_flags(parser)
    group.add_argument("--aoti-package-path", type=Path, help="an AOT Inductor package (.pt2)")
    group.add_argument("--dso-path", type=Path, help="an AOT Inductor shared library (.so)")
    group.add_argument(*PTE_FLAGS, dest="pte_path", type=Path, help="an ExecuTorch program (.pte)")
    group.add_argument("--tokenizer", "--tokenizer-kind", dest="tokenizer_kind",
                       help="tokenizer kind, detected when omitted (sentencepiece, tiktoken, hf, gguf)")
    group.add_argument("--tiktoken", dest="tokenizer_kind", action="store_const", const="tiktoken",
                       help="the tokenizer is Llama-3's tiktoken file")
    group.add_argument("--build", action="store_true", help="build a target MODEL that the store does not hold yet")
    run = parser.add_argument_group("how to run it")
    run.add_argument("--dtype", "-d", type=dtype, default=None,
                     help=f"{', '.join(Dtype)} (default: what the model holds; fp32 for a float checkpoint)")
    run.add_argument("--device", default=Device.CPU, choices=list(Device))
    run.add_argument("--quant", "--quantize", dest="quant",
                     help="quantize first: JSON or a file holding it, e.g. '{\"linear:int4\": {\"group_size\": 32}}'")
    run.add_argument("--max-seq-length", type=positive_int, default=None,
                     help=f"the KV cache (context) length (default: an exported model's own; {DEFAULT_MAX_SEQ_LEN} "
                          "within the model's context for a checkpoint)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument("--compile-prefill", "--compile_prefill", dest="compile_prefill", action="store_true",
                     help="torch.compile the prefill too (dynamic shapes)")


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    """Tensor parallelism (generate, chat, eval, server): docs/distributed.md."""
    parser.add_argument("--tp", type=positive_int, default=1, metavar="N",
                        help="split the model over N processes (tensor parallel; gloo on CPU, nccl on CUDA): started "
                             "here, or by torchrun --nproc-per-node N (default 1)")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """Sampling and length (generate, chat, server)."""
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", "--num-tokens", dest="max_new_tokens", type=positive_int, default=200,
                       help="the longest answer, in tokens (default 200)")
    group.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 (default) is greedy")
    group.add_argument("--top-k", type=positive_int, default=None)
    group.add_argument("--top-p", type=probability, default=None)
    group.add_argument("--seed", type=non_negative_int, default=None)


def model_source(args: argparse.Namespace) -> ModelSource:
    """The ModelSource the flags name: MODEL, or the one path flag."""
    named = {flag: getattr(args, flag) for flag in (*ARTIFACT_FLAGS, *CHECKPOINT_FLAGS)
             if getattr(args, flag, None) is not None}
    artifacts = [flag for flag in named if flag in ARTIFACT_FLAGS]
    if len(artifacts) > 1:
        raise TorchatError("pass only one of --aoti-package-path, --dso-path, --pte-path")
    tokenizer_path = args.tokenizer_path
    world = os.environ.get("WORLD_SIZE", "1")
    if getattr(args, "tp", None) == 1 and world.isdigit() and int(world) > 1:
        raise TorchatError(f"torchrun started {world} processes but --tp is 1 (each would run the whole model); "
                           f"pass --tp {world}")
    if artifacts and len(named) > 1:
        # the seed's form `--pte-path m.pte --checkpoint-path ckpt`: the checkpoint only lends its tokenizer
        from torchat.model_source import find_tokenizer

        checkpoint = next(named[flag] for flag in named if flag not in ARTIFACT_FLAGS)
        tokenizer_path = tokenizer_path or find_tokenizer(Path(checkpoint))
        named = {artifacts[0]: named[artifacts[0]]}
    if len(named) > 1:
        raise TorchatError("name the model once: one of MODEL, --checkpoint-path, --checkpoint-dir, --gguf-path")
    return ModelSource(
        model=args.model, checkpoint=next(iter(named.values()), None), format=args.format,
        params_table=args.params_table, params_path=args.params_path, tokenizer_path=tokenizer_path,
        tokenizer_kind=getattr(args, "tokenizer_kind", None), dtype=getattr(args, "dtype", None),
        device=getattr(args, "device", Device.CPU), quant=getattr(args, "quant", None),
        max_seq_len=getattr(args, "max_seq_length", None), compile=getattr(args, "compile", False),
        compile_prefill=getattr(args, "compile_prefill", False), allow_unpinned=args.allow_unpinned,
        build=getattr(args, "build", False), tp=getattr(args, "tp", 1))


def sampling_of(args: argparse.Namespace):
    from torchat.generate import Sampling

    return Sampling(args.temperature, args.top_k, args.top_p)


def generator_of(args: argparse.Namespace):
    import torch

    return torch.Generator().manual_seed(args.seed) if args.seed is not None else None
