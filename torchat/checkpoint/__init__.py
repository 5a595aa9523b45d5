"""Checkpoint formats, one registry entry each, and the one way to get a model from files.

    FORMATS[fmt](path, args | None) -> Checkpoint   (canonical names, rotate-half q/k, float tensors)

The config comes, in order, from --params-path, --params-table, the file itself, or the seed's convention of
matching the checkpoint's directory name against the known configs (said on stderr).
"""

import importlib
import sys
from pathlib import Path

import torch

from torchat.checkpoint.base import Checkpoint, check_state_dict
from torchat.configs import lookup_config, match_config_name
from torchat.errors import TorchatError, unknown_key_error
from torchat.model import ModelArgs, Transformer, rope_frequencies


def _lazy(module: str, function: str):
    def read(path: Path, args: ModelArgs | None = None) -> Checkpoint:
        return getattr(importlib.import_module(module), function)(path, args)
    return read


FORMATS = {
    "gguf": _lazy("torchat.checkpoint.gguf", "read_gguf"),
    "llama2c": _lazy("torchat.checkpoint.torchfile", "read_llama2c"),
    "meta": _lazy("torchat.checkpoint.torchfile", "read_meta"),
    "hf": _lazy("torchat.checkpoint.hf", "read_hf"),
    "torchat": _lazy("torchat.checkpoint.canonical", "read_canonical"),
}


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise TorchatError(f"{path}: no such file or directory; check --checkpoint-path")
    directory = path if path.is_dir() else path.parent
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
    if (directory / "model_args.json").is_file() and (directory / "model.safetensors").is_file():
        return "torchat"
    if (directory / "config.json").is_file() and (path.is_dir() or path.suffix in (".safetensors", ".bin")
                                                   or path.name.endswith(".index.json")):
        return "hf"
    if (directory / "params.json").is_file() and any(directory.glob("consolidated.*.pth")):
        return "meta"
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        return "llama2c"
    raise TorchatError(f"{path}: cannot tell the checkpoint format; pass --format (one of: "
                       f"{', '.join(sorted(FORMATS))})")


def resolve_args(params_table: str | None = None, params_path: Path | None = None) -> ModelArgs | None:
    if params_path is not None:
        try:
            return ModelArgs.from_json(Path(params_path))
        except (OSError, ValueError) as error:
            raise TorchatError(f"{params_path}: not a usable params file ({error})") from None
    if params_table is not None:
        return ModelArgs.from_dict(lookup_config(params_table))
    return None


def read_checkpoint(path: Path, fmt: str | None = None, args: ModelArgs | None = None) -> Checkpoint:
    """Read and validate a checkpoint; the result's args and state dict agree in every tensor shape."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise unknown_key_error("checkpoint format", fmt, FORMATS)
    checkpoint = FORMATS[fmt](path, args)
    if checkpoint.args is None:
        name = match_config_name(path.parent.name if path.is_file() else path.name)
        print(f"torchat: no config in {path.name}; using --params-table {name} (matched from the path)",
              file=sys.stderr)
        checkpoint = FORMATS[fmt](path, ModelArgs.from_dict(lookup_config(name)))
    check_state_dict(checkpoint.state_dict, checkpoint.args, path)
    checkpoint.metadata.setdefault("format", fmt)
    return checkpoint


def build_model(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Transformer:
    """The Transformer with the checkpoint's weights, in `dtype` on `device`, in eval mode."""
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    state_dict = {k: v for k, v in checkpoint.state_dict.items()
                  if not (checkpoint.args.tie_embeddings and k == "output.weight")}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if checkpoint.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # the rope tables are buffers computed from args, not stored in checkpoints
    model.rope_cos, model.rope_sin = rope_frequencies(checkpoint.args, checkpoint.args.max_seq_len)
    return model.to(device=device, dtype=dtype).eval()
