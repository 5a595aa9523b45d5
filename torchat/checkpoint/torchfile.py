"""Checkpoints saved with torch.save: llama2.c / gpt-fast single files and Meta's consolidated shards.

Both keep Meta's interleaved-pair rotary layout, permuted here into the model's rotate-half layout.
Every load is `weights_only=True`: a file that needs arbitrary unpickling is refused, never executed.
"""

import json
import pickle
import re
from pathlib import Path

import torch

from torchat.checkpoint.base import Checkpoint, meta_to_hf_layout
from torchat.errors import TorchatError
from torchat.model import ModelArgs


def load_torch_file(path: Path) -> dict:
    """torch.load with weights_only=True, with the refusal turned into a one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise TorchatError(f"{path}: refused to unpickle ({reason}); torchat loads only weights — re-save "
                           "the file with torch.save(model.state_dict())") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise TorchatError(f"{path}: not a readable torch checkpoint ({str(error).splitlines()[0]}); "
                           "the file is truncated or corrupt — download it again") from None


def _strip_prefixes(state_dict: dict) -> dict:
    """Drop wrappers that training code leaves on names (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    return {re.sub(r"^(_orig_mod\.|module\.|model\.)+", "", k): v for k, v in state_dict.items()}


def _unfuse_wqkv(state_dict: dict, args: ModelArgs) -> dict:
    """gpt-fast fuses q, k and v into one `wqkv` matrix; split it back into wq, wk, wv."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("attention.wqkv.weight"):
            kv_rows = args.n_kv_heads * args.head_dim
            wq, wk, wv = tensor.split([args.dim, kv_rows, kv_rows], dim=0)
            prefix = name[: -len("wqkv.weight")]
            out |= {prefix + "wq.weight": wq, prefix + "wk.weight": wk, prefix + "wv.weight": wv}
        else:
            out[name] = tensor
    return out


def _args_from_state_dict(base: dict, state_dict: dict) -> dict:
    """Fill what a config often leaves implicit (hidden_dim, vocab, tying) from the tensors themselves."""
    values = dict(base)
    values["hidden_dim"] = state_dict["layers.0.feed_forward.w1.weight"].shape[0]
    values["vocab_size"] = state_dict["tok_embeddings.weight"].shape[0]
    output = state_dict.get("output.weight")
    values["tie_embeddings"] = output is None or (
        output.data_ptr() == state_dict["tok_embeddings.weight"].data_ptr())
    values["n_layers"] = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("layers."))
    return values


_LLAMA2C_ARG_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "max_seq_len")


def read_llama2c(path: Path, args: ModelArgs | None = None) -> Checkpoint:
    """A single torch file: llama2.c's `{"model": ..., "model_args": ...}`, gpt-fast's model.pth, or a bare
    Meta-named state dict (then the config must come from --params-table/--params-path or the path)."""
    path = Path(path)
    loaded = load_torch_file(path)
    if not isinstance(loaded, dict):
        raise TorchatError(f"{path}: expected a state dict, found {type(loaded).__name__}")
    raw = loaded.get("model", loaded) if isinstance(loaded.get("model"), dict) else loaded
    state_dict = _strip_prefixes({k: v for k, v in raw.items() if isinstance(v, torch.Tensor)})
    if "tok_embeddings.weight" not in state_dict:
        raise TorchatError(f"{path}: no 'tok_embeddings.weight'; this is not a llama2.c/gpt-fast/Meta checkpoint "
                           "(pass --format to pick another reader)")
    file_args = loaded.get("model_args") if isinstance(loaded.get("model_args"), dict) else None
    if args is None and file_args is not None:
        base = {k: file_args[k] for k in _LLAMA2C_ARG_KEYS if file_args.get(k) is not None}
        args = ModelArgs.from_dict(_args_from_state_dict(base, state_dict))
    if args is None:
        # no config anywhere in the file: the caller resolves one and reads again
        return Checkpoint(state_dict, None, {"format": "llama2c"})
    state_dict = meta_to_hf_layout(_unfuse_wqkv(state_dict, args), args)
    return Checkpoint(state_dict, args, {"format": "llama2c"})


# Meta's model-parallel shards: the dimension each tensor is split along (norms are replicated)
_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def _merge_shards(shards: list[dict]) -> dict:
    if len(shards) == 1:
        return shards[0]
    merged = {}
    for name in shards[0]:
        stem = name.split(".")[-2]
        if stem in _SHARD_DIM:
            merged[name] = torch.cat([shard[name] for shard in shards], dim=_SHARD_DIM[stem])
        else:
            merged[name] = shards[0][name]
    return merged


def read_meta(path: Path, args: ModelArgs | None = None) -> Checkpoint:
    """Meta's release layout: a directory with `consolidated.NN.pth` shards and `params.json`."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    shard_paths = sorted(directory.glob("consolidated.*.pth"))
    if not shard_paths:
        raise TorchatError(f"{directory}: no consolidated.*.pth files; pass the directory of a Meta checkpoint")
    state_dict = _merge_shards([_strip_prefixes(load_torch_file(p)) for p in shard_paths])
    params_path = directory / "params.json"
    if args is None:
        if not params_path.is_file():
            raise TorchatError(f"{params_path}: missing; a Meta checkpoint needs its params.json "
                               "(or pass --params-table/--params-path)")
        params = json.loads(params_path.read_text())
        base = {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "norm_eps", "rope_theta")
                if params.get(k) is not None}
        if params.get("use_scaled_rope"):
            base["rope_scaling"] = dict(factor=params.get("rope_scaling_factor", 8.0), low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)
        args = ModelArgs.from_dict(_args_from_state_dict(base, state_dict))
    return Checkpoint(meta_to_hf_layout(state_dict, args), args, {"format": "meta"})
