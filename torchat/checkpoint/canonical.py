"""torchat's converted form: `model.safetensors` + `model_args.json` (+ `metadata.json`) in one directory."""

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from torchat.checkpoint.base import Checkpoint
from torchat.errors import TorchatError
from torchat.model import ModelArgs

WEIGHTS, ARGS, METADATA = "model.safetensors", "model_args.json", "metadata.json"


def write_canonical(checkpoint: Checkpoint, directory: Path) -> None:
    """Write into an existing (temporary) directory; the caller publishes it atomically."""
    args = checkpoint.args
    assert args is not None, "a canonical checkpoint needs its ModelArgs"
    state_dict = {name: tensor.contiguous() for name, tensor in checkpoint.state_dict.items()
                  if not (args.tie_embeddings and name == "output.weight")}
    save_file(state_dict, directory / WEIGHTS)
    (directory / ARGS).write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    (directory / METADATA).write_text(json.dumps(checkpoint.metadata, indent=2, sort_keys=True) + "\n")


def read_canonical(path: Path, args: ModelArgs | None = None) -> Checkpoint:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    for name in (WEIGHTS, ARGS):
        if not (directory / name).is_file():
            raise TorchatError(f"{directory / name}: missing; convert the checkpoint again with `torchat convert`")
    try:
        state_dict = load_file(directory / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise TorchatError(f"{directory / WEIGHTS}: unreadable ({error}); convert the checkpoint again") from None
    metadata_path = directory / METADATA
    metadata = json.loads(metadata_path.read_text()) if metadata_path.is_file() else {}
    return Checkpoint(state_dict, args or ModelArgs.from_json(directory / ARGS), metadata)

