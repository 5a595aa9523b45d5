"""The flags that pick a model and its tokenizer, shared by generate, chat, eval and export, and the loading.

With no model named, the default model (SmolLM2-135M-Instruct, from its GGUF) is fetched and used.
"""

import argparse
import sys
from enum import StrEnum
from pathlib import Path

import torch

from torchat.errors import TorchatError, unknown_key_error


class DType(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


TORCH_DTYPES = {DType.fp32: torch.float32, DType.fp16: torch.float16, DType.bf16: torch.bfloat16}
DEFAULT_MODEL_ASSET = "smollm2-135m-gguf"


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The flags that name a checkpoint (convert uses these alone)."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a model of targets/models.toml (default: smollm2-135m, unless a path flag names one)")
    group = parser.add_argument_group("model")
    group.add_argument("--allow-unpinned", action="store_true",
                       help="fetch a MODEL whose files have no pinned sha256 (trust whatever the source serves)")
    group.add_argument("--checkpoint-path", type=Path, help="a checkpoint file or directory (any --format)")
    group.add_argument("--checkpoint-dir", type=Path, help="a directory holding the checkpoint")
    group.add_argument("--gguf-path", "--load_gguf", dest="gguf_path", type=Path, help="a GGUF file")
    group.add_argument("--format", help="checkpoint format, detected when omitted (gguf, llama2c, meta, hf, torchat)")
    group.add_argument("--params-table", help="a known config name (see torchat/configs.py)")
    group.add_argument("--params-path", type=Path, help="a JSON file of ModelArgs fields")
    group.add_argument("--tokenizer-path", type=Path, help="tokenizer file; found beside the checkpoint if omitted")
    return group


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoint flags plus tokenizer kind, dtype, device and the exported-artifact paths."""
    group = add_checkpoint_arguments(parser)
    group.add_argument("--tokenizer", "--tokenizer-kind", dest="tokenizer_kind",
                       help="tokenizer kind, detected when omitted (sentencepiece, tiktoken, hf, gguf)")
    group.add_argument("--tiktoken", dest="tokenizer_kind", action="store_const", const="tiktoken",
                       help="the checkpoint's tokenizer is Llama-3's tiktoken file")
    group.add_argument("--dtype", "-d", default=DType.fp32, type=_dtype, help="fp32 (default), fp16 or bf16")
    group.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    exported = parser.add_argument_group("exported model (instead of a checkpoint; see `torchat export`)")
    exported.add_argument("--aoti-package-path", type=Path, help="an AOT Inductor package (.pt2)")
    exported.add_argument("--dso-path", type=Path, help="an AOT Inductor shared library (.so)")
    exported.add_argument("--pte-path", type=Path, help="an ExecuTorch program (.pte)")


def _dtype(value: str) -> DType:
    if value not in DType.__members__:
        raise argparse.ArgumentTypeError(f"unknown dtype {value!r}; choose one of: {', '.join(DType)}")
    return DType(value)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """The checkpoint the flags name, or the default model's GGUF."""
    named = [p for p in (args.checkpoint_path, args.checkpoint_dir, args.gguf_path) if p is not None]
    if len(named) + (args.model is not None) > 1:
        raise TorchatError("name the model once: a MODEL, --checkpoint-path, --checkpoint-dir or --gguf-path")
    if named:
        return named[0]
    if args.model is not None:
        return fetch_named_model(args)
    from torchat.assets import fetch_asset

    print("torchat: no model named; using the default model SmolLM2-135M-Instruct", file=sys.stderr)
    return fetch_asset(DEFAULT_MODEL_ASSET)


def fetch_named_model(args: argparse.Namespace) -> Path:
    """A catalog model's files, fetched (verified) into the cache; its config and format fill unset flags."""
    from torchat.manage import fetch_model_files
    from torchat.sources import cache_dir
    from torchat.spec import load_catalog

    model = load_catalog().model(args.model)
    directory = cache_dir() / "models" / model.key
    fetch_model_files(model, directory, allow_unpinned=args.allow_unpinned)
    args.format = args.format or str(model.format)
    first = directory / model.files[0].name
    return first if len(model.files) == 1 and model.format in ("gguf", "llama2c") else directory


def find_tokenizer(checkpoint: Path, metadata: dict) -> Path:
    """The tokenizer beside a checkpoint: the GGUF itself, or a known file name in its directory."""
    if metadata.get("format") == "gguf":
        return checkpoint
    directory = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for name in ("tokenizer.gguf", "tokenizer.json", "tokenizer.model", "original/tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    raise TorchatError(f"no tokenizer found beside {checkpoint} (looked for tokenizer.gguf, tokenizer.json, "
                       "tokenizer.model); pass --tokenizer-path")


def load_eager(args: argparse.Namespace):
    """(Transformer, tokenizer, checkpoint metadata) from the model flags."""
    from torchat.checkpoint import build_model, read_checkpoint, resolve_args
    from torchat.tokenizers import load_tokenizer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise TorchatError("--device cuda, but torch sees no CUDA device; use --device cpu")
    path = checkpoint_path(args)
    checkpoint = read_checkpoint(path, args.format, resolve_args(args.params_table, args.params_path))
    tokenizer = load_tokenizer(args.tokenizer_path or find_tokenizer(path, checkpoint.metadata), args.tokenizer_kind)
    if tokenizer.vocab_size > checkpoint.args.vocab_size:
        raise TorchatError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{checkpoint.args.vocab_size}; pass the model's own --tokenizer-path")
    model = build_model(checkpoint, TORCH_DTYPES[args.dtype], args.device)
    return model, tokenizer, checkpoint.metadata


def torch_dtype(name: str) -> torch.dtype:
    if name not in DType.__members__:
        raise unknown_key_error("dtype", name, DType.__members__)
    return TORCH_DTYPES[DType(name)]


def artifact_path(args: argparse.Namespace) -> Path | None:
    """The exported artifact the flags name (--aoti-package-path, --dso-path, --pte-path), if any."""
    named = [p for p in (getattr(args, "aoti_package_path", None), getattr(args, "dso_path", None),
                         getattr(args, "pte_path", None)) if p is not None]
    if len(named) > 1:
        raise TorchatError("pass only one of --aoti-package-path, --dso-path, --pte-path")
    if named and any(p is not None for p in (args.checkpoint_path, args.checkpoint_dir, args.gguf_path)):
        raise TorchatError("pass either an exported artifact or a checkpoint, not both")
    return named[0] if named else None


def load_artifact(args: argparse.Namespace, path: Path):
    """(TextModel, tokenizer) for an exported artifact: its KV cache length and tokenizer come from its metadata."""
    from torchat.exported import artifact_tokenizer_path, load_exported
    from torchat.tokenizers import load_tokenizer

    model = load_exported(path)
    metadata = model.metadata
    if getattr(args, "max_seq_length", None) and args.max_seq_length > metadata.max_seq_len:
        raise TorchatError(f"--max-seq-length {args.max_seq_length}: {path} was exported with a KV cache of "
                           f"{metadata.max_seq_len}; re-export it with a larger --max-seq-length")
    tokenizer_path = args.tokenizer_path or artifact_tokenizer_path(path, metadata)
    tokenizer = load_tokenizer(tokenizer_path, args.tokenizer_kind or (None if args.tokenizer_path else
                                                                       metadata.tokenizer_kind))
    if tokenizer.vocab_size > metadata.vocab_size:
        raise TorchatError(f"the tokenizer has {tokenizer.vocab_size} tokens but {path.name} only "
                           f"{metadata.vocab_size}; pass the model's own --tokenizer-path")
    quant = ", ".join(str(q) for q in metadata.quant) or "no quant"
    print(f"torchat: loaded {path} ({metadata.backend}, {metadata.dtype}, {metadata.max_seq_len} positions, "
          f"{quant})", file=sys.stderr)
    return model, tokenizer


def load_text_model(args: argparse.Namespace, max_seq_len: int | None = None):
    """(TextModel, tokenizer): the exported artifact a --*-path flag names, else the eager model with a KV cache
    of max_seq_len (default: the model's context). For chat, eval and anything else that runs a TextModel."""
    from torchat.generate import EagerModel

    path = artifact_path(args)
    if path is not None:
        return load_artifact(args, path)
    model, tokenizer, _ = load_eager(args)
    cache_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    return EagerModel(model, cache_len, compile=getattr(args, "compile", False),
                      compile_prefill=getattr(args, "compile_prefill", False)), tokenizer
