"""Hugging Face checkpoints: safetensors or pytorch_model.bin, single or sharded, with config.json.

Hugging Face already stores q/k in the rotate-half layout the model uses, so only names change.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from torchat.checkpoint.base import Checkpoint
from torchat.checkpoint.torchfile import load_torch_file
from torchat.errors import TorchatError
from torchat.model import ModelArgs

_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def canonical_name(hf_name: str) -> str | None:
    """The model's name for a Hugging Face tensor, or None for tensors the model does not use."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"
    return None


def args_from_hf_config(config: dict) -> ModelArgs:
    n_heads = config["num_attention_heads"]
    if config.get("head_dim") not in (None, config["hidden_size"] // n_heads):
        raise TorchatError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads; "
                           "torchat's llama model does not support decoupled head sizes")
    scaling = config.get("rope_scaling") or None
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise TorchatError(f"rope_scaling {scaling} is not supported (only Llama-3.1's 'llama3' scaling)")
    rope_scaling = None if not scaling else {
        k: scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
        hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        rope_scaling=rope_scaling, max_seq_len=config.get("max_position_embeddings", 2048),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _weight_files(directory: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise TorchatError(f"{index}: shard {missing[0]} is missing; download every shard")
            return [directory / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (directory / single).is_file():
            return [directory / single]
    raise TorchatError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise TorchatError(f"{path}: unreadable safetensors ({error}); download it again") from None
    return load_torch_file(path)


def read_hf(path: Path, args: ModelArgs | None = None) -> Checkpoint:
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if args is None:
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise TorchatError(f"{config_path}: missing; a Hugging Face checkpoint needs its config.json "
                               "(or pass --params-table/--params-path)")
        config = json.loads(config_path.read_text())
        if config.get("model_type", "llama") not in ("llama", "mistral"):
            raise TorchatError(f"{config_path}: model_type {config['model_type']!r} is not supported "
                               "(llama, mistral)")
        args = args_from_hf_config(config)
    state_dict = {}
    for file in _weight_files(directory):
        for hf_name, tensor in _load_weights(file).items():
            name = canonical_name(hf_name)
            if name is not None:
                state_dict[name] = tensor
    return Checkpoint(state_dict, args, {"format": "hf"})
