"""Known model configurations (the `--params-table` names), as plain data: no torch here.

Each entry holds the `ModelArgs` fields that differ from the defaults. `hidden_dim` is the SwiGLU width,
stated outright instead of derived from Meta's `multiple_of`/`ffn_dim_multiplier` rounding.
"""

import re

from torchat.errors import TorchatError, unknown_key_error

_LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, hidden_dim=11008, max_seq_len=4096)
_LLAMA2_13B = dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824, max_seq_len=4096)
_LLAMA2_70B = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000, hidden_dim=28672,
                   max_seq_len=4096)
_MISTRAL_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000, hidden_dim=14336,
                   max_seq_len=32768)
_LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                  rope_theta=500000.0, max_seq_len=8192)
_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_SCALING = dict(_LLAMA31_SCALING, factor=32.0)

KNOWN_CONFIGS: dict[str, dict] = {
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, hidden_dim=768, max_seq_len=256,
                       tie_embeddings=True),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, vocab_size=32000, hidden_dim=1376, max_seq_len=1024,
                       tie_embeddings=True),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048,
                        max_seq_len=1024, tie_embeddings=True),
    "open_llama_7b": dict(_LLAMA2_7B, norm_eps=1e-6, max_seq_len=2048),
    "Llama-2-7b": _LLAMA2_7B,
    "Llama-2-7b-chat": _LLAMA2_7B,
    "Llama-2-13b": _LLAMA2_13B,
    "Llama-2-13b-chat": _LLAMA2_13B,
    "Llama-2-70b": _LLAMA2_70B,
    "Llama-2-70b-chat": _LLAMA2_70B,
    "CodeLlama-7b-Python": dict(_LLAMA2_7B, vocab_size=32000, rope_theta=1e6, max_seq_len=16384),
    "CodeLlama-34b-Python": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000,
                                 hidden_dim=22016, rope_theta=1e6, max_seq_len=16384),
    "Mistral-7B-v0.1": _MISTRAL_7B,
    "Mistral-7B-Instruct-v0.1": _MISTRAL_7B,
    "Mistral-7B-Instruct-v0.2": dict(_MISTRAL_7B, rope_theta=1e6),
    "Llama-3-8B": _LLAMA3_8B,
    "Llama-3-8B-Instruct": _LLAMA3_8B,
    "Llama-3.1-8B": dict(_LLAMA3_8B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "Llama-3.1-8B-Instruct": dict(_LLAMA3_8B, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "Llama-3.2-1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         rope_theta=500000.0, rope_scaling=_LLAMA32_SCALING, max_seq_len=131072,
                         tie_embeddings=True),
    "Llama-3.2-3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                         rope_theta=500000.0, rope_scaling=_LLAMA32_SCALING, max_seq_len=131072,
                         tie_embeddings=True),
    "SmolLM2-135M": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                         rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def lookup_config(name: str) -> dict:
    """The exact `--params-table` entry `name`; an unknown name lists the table."""
    if name not in KNOWN_CONFIGS:
        raise unknown_key_error("--params-table", name, KNOWN_CONFIGS)
    return dict(KNOWN_CONFIGS[name])


def match_config_name(path_component: str) -> str:
    """The seed's convention: pick the config whose name is the longest match inside a directory name.

    Fuzzy by design (`checkpoints/Llama-2-7b-chat-hf` -> `Llama-2-7b-chat`); callers say which one was picked.
    """
    squashed = _squash(path_component)
    hits = [key for key in KNOWN_CONFIGS if _squash(key) in squashed]
    if not hits:
        raise TorchatError(
            f"no known config matches {path_component!r}; pass --params-table (one of: "
            f"{', '.join(sorted(KNOWN_CONFIGS))}) or --params-path FILE.json")
    return max(hits, key=lambda key: len(_squash(key)))
