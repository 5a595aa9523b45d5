"""Tiny GGUF files written the way llama.cpp's converter writes them, for the reader's tests.

`gguf.GGUFWriter` stores dimensions innermost first itself; what the converter adds, and this module
copies, is the llama.cpp tensor names and the q/k rows permuted into Meta's interleaved-pair rotary layout.
"""

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tiny_model import tiny_args

from torchat.checkpoint.base import permute_hf_to_meta
from torchat.model import ModelArgs

Q = GGMLQuantizationType
TINY = tiny_args()
# every in-feature a multiple of the K-quants' 256-value block
TINY_K = tiny_args(dim=256, n_layers=1, hidden_dim=512)

_LAYER_NAMES = {
    "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
    "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up",
}
_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}

# byte offsets of the fp16 scales inside one block (ggml's block_q4_K/q5_K start with d, dmin; block_q6_K
# ends with d); random bytes elsewhere are valid quants
_K_SCALE_OFFSETS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (GGML_QUANT_SIZES[Q.Q6_K][1] - 2,)}


def gguf_name(name: str) -> str:
    """Canonical tensor name -> llama.cpp's (`layers.0.attention.wq.weight` -> `blk.0.attn_q.weight`)."""
    stem = name.removesuffix(".weight")
    if stem.startswith("layers."):
        _, index, rest = stem.split(".", 2)
        return f"blk.{index}.{_LAYER_NAMES[rest]}.weight"
    return f"{_GLOBAL_NAMES[stem]}.weight"


def llama_cpp_tensors(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, np.ndarray]:
    """A canonical state dict as llama.cpp's converter stores it: its names, Meta-layout q/k, float32."""
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("attention.wq.weight"):
            tensor = permute_hf_to_meta(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_hf_to_meta(tensor, args.n_kv_heads)
        out[gguf_name(name)] = tensor.detach().float().numpy().copy()
    return out


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values (rows, cols) in the stored form of `qtype`: float arrays for F32/F16, else bytes."""
    return quantize(values.astype(np.float32), qtype)


def random_blocks(shape: tuple[int, int], qtype: GGMLQuantizationType, seed: int) -> np.ndarray:
    """Random valid K-quant data for a (rows, cols) tensor: bytes (rows, cols // block * type_size)."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, type_size), dtype=np.uint8)
    for offset in _K_SCALE_OFFSETS[qtype]:
        scales = rng.uniform(1e-3, 2e-2, size=blocks.shape[0]).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * type_size)


def write_gguf(path: Path, args: ModelArgs, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
               arch: str = "llama", extra_metadata: dict | None = None) -> Path:
    """A GGUF file with llama.cpp's metadata keys for `args` and the given stored tensors (name -> data, type)."""
    writer = GGUFWriter(path, arch)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_file_type(1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(args.vocab_size)])
    writer.add_chat_template("{{ messages }}")
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_model_gguf(path: Path, model_state: dict[str, torch.Tensor], args: ModelArgs,
                     qtype: GGMLQuantizationType = Q.F32) -> Path:
    """A model written as llama.cpp would: 2-D weights in `qtype`, norms in F32, no output.weight when tied."""
    tensors = {}
    for name, values in llama_cpp_tensors(model_state, args).items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        kind = qtype if values.ndim == 2 else Q.F32
        tensors[name] = (encode(values, kind), kind)
    return write_gguf(path, args, tensors)


def llama31_rope_freqs(args: ModelArgs, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight` (head_dim // 2,)."""
    out = []
    for i in range(args.head_dim // 2):
        wavelen = 2 * math.pi * args.rope_theta ** (2 * i / args.head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)
