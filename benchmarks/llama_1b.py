"""The random Llama-3.2-1B-shaped model the 1B benchmarks run: torchat's canonical checkpoint (tp_bench.py) and
the same weights as llama-architecture GGUFs for llama.cpp (scaling.py).

    write_checkpoint(directory)           # fp32 safetensors + model_args.json + Llama-3's tiktoken file
    write_gguf(checkpoint, output, "Q4_1")  # its weights quantized by the gguf package: Q4_0, Q4_1 or Q8_0

Random weights (seed 0, N(0, 0.02), norms 1): the speed is the shape's, not the weights'.
"""

import json
import math
import shutil
from pathlib import Path

# Llama-3.2-1B's config.json, in ModelArgs' terms
LLAMA_32_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                   norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, tie_embeddings=True,
                   rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))

# the head (the tied embedding) stays 8-bit in the 4-bit files, as in the shipped SmolLM2 Q4_1 GGUF and as
# torchat's 8da4w preset keeps it
HEAD_TYPE = "Q8_0"
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0"}


def write_checkpoint(directory: Path, config: dict = LLAMA_32_1B) -> Path:
    """The random checkpoint in torchat's canonical form, written once (fp32, ~4.9 GB at 1B)."""
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    from safetensors.torch import save_file

    from torchat.assets import fetch_asset
    from torchat.checkpoint.base import expected_shapes
    from torchat.model import ModelArgs

    args = ModelArgs(**config)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    state_dict = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
                  for name, shape in expected_shapes(args).items()}
    save_file(state_dict, tmp / "model.safetensors")
    (tmp / "model_args.json").write_text(json.dumps(args.to_dict(), indent=2) + "\n")
    shutil.copyfile(fetch_asset("llama3-tiktoken"), tmp / "tokenizer.model")
    tmp.rename(directory)
    return directory


def rope_factors(args: dict) -> list[float]:
    """llama.cpp's rope_freqs tensor for Llama-3.1-style scaling: the divisor of each rotary frequency
    (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors)."""
    scaling, head_dim = args["rope_scaling"], args["dim"] // args["n_heads"]
    original = scaling["original_max_position_embeddings"]
    low_wavelen = original / scaling["low_freq_factor"]
    high_wavelen = original / scaling["high_freq_factor"]
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * args["rope_theta"] ** (i / head_dim)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (original / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return factors


def write_gguf(checkpoint: Path, output: Path, type_name: str, tokenizer_gguf: Path) -> Path:
    """The checkpoint's weights as a llama GGUF: matrices in `type_name` (the head/embedding in Q8_0), norms in
    F32, q/k rows in the interleaved rotary layout llama.cpp's converter writes (torchat's reader undoes it).

    The tokenizer is `tokenizer_gguf`'s (a gpt2-style BPE: SmolLM2's), its token list padded with unused tokens
    to the embedding's rows, since llama.cpp requires one token per row. Written once."""
    if output.is_file():
        return output
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize
    from safetensors import safe_open

    from torchat.checkpoint.base import permute_hf_to_meta
    from torchat.checkpoint.gguf import gguf_tensor_name

    args = json.loads((checkpoint / "model_args.json").read_text())
    tmp = output.with_name(output.name + ".part")
    writer = GGUFWriter(str(tmp), "llama")
    writer.add_name(f"Llama-3.2-1B-shaped random ({type_name})")
    writer.add_block_count(args["n_layers"])
    writer.add_context_length(args["max_seq_len"])
    writer.add_embedding_length(args["dim"])
    writer.add_feed_forward_length(args["hidden_dim"])
    writer.add_head_count(args["n_heads"])
    writer.add_head_count_kv(args["n_kv_heads"])
    writer.add_rope_freq_base(args["rope_theta"])
    writer.add_layer_norm_rms_eps(args["norm_eps"])
    writer.add_rope_dimension_count(args["dim"] // args["n_heads"])
    writer.add_vocab_size(args["vocab_size"])
    writer.add_file_type(LlamaFileType[FILE_TYPES[type_name]])
    reader = GGUFReader(str(tokenizer_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or key == "tokenizer.chat_template":
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = value + [f"<|unused_{i}|>" for i in range(len(value), args["vocab_size"])]
        elif key == "tokenizer.ggml.token_type":
            value = value + [5] * (args["vocab_size"] - len(value))  # 5: UNUSED
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    writer.add_quantization_version(2)

    if args.get("rope_scaling"):
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_factors(args), dtype=np.float32))
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name).float()
            if name.endswith("attention.wq.weight"):
                tensor = permute_hf_to_meta(tensor, args["n_heads"])
            elif name.endswith("attention.wk.weight"):
                tensor = permute_hf_to_meta(tensor, args["n_kv_heads"])
            values = tensor.numpy()
            if values.ndim == 1:
                writer.add_tensor(gguf_tensor_name(name), values)
                continue
            kind = GGMLQuantizationType[HEAD_TYPE if name == "tok_embeddings.weight" else type_name]
            packed = quantize(values, kind)
            writer.add_tensor(gguf_tensor_name(name), packed, raw_shape=packed.shape, raw_dtype=kind)
            del tensor, values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(output)
    return output
