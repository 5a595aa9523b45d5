"""The GGUF reader against gguf's own dequantizer, a round trip through llama.cpp's layout, and the real file."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize
from gguf_fixtures import (TINY, TINY_K, Q, gguf_name, llama31_rope_freqs, llama_cpp_tensors,
                           random_blocks, write_gguf, write_model_gguf)
from tiny_model import tiny_args, tiny_transformer

from torchat.checkpoint.base import permute_meta_to_hf
from torchat.checkpoint.gguf import GGUF_TYPES, gguf_metadata, gguf_tensor_name, read_gguf
from torchat.configs import lookup_config
from torchat.errors import TorchatError
from torchat.model import ModelArgs, Transformer

# loose bounds against the float weights, only to catch a tensor read into the wrong place
_QUANT_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q5_0: 0.1, Q.Q5_1: 0.1,
                Q.Q4_0: 0.2, Q.Q4_1: 0.2}


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = tiny_transformer(args, seed=seed, std=None)
    with torch.no_grad():  # norms away from 1 so that a misplaced norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def load_model(checkpoint) -> Transformer:
    model = Transformer(checkpoint.args)
    state = dict(checkpoint.state_dict)
    if checkpoint.args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state)
    return model.eval()


def reference_tensors(path: Path, args: ModelArgs) -> dict[str, torch.Tensor]:
    """gguf's dequantization of every tensor, by llama.cpp name, permuted back to rotate-half."""
    out = {}
    for t in GGUFReader(path).tensors:
        values = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        tensor = torch.tensor(np.array(values, dtype=np.float32))
        if ".attn_q." in t.name:
            tensor = permute_meta_to_hf(tensor, args.n_heads)
        elif ".attn_k." in t.name:
            tensor = permute_meta_to_hf(tensor, args.n_kv_heads)
        out[t.name] = tensor
    return out


@pytest.mark.parametrize("qtype", sorted(_QUANT_ERROR, key=lambda q: q.name), ids=lambda q: q.name)
def test_quantized_tensors_dequantize_as_gguf_does(tmp_path, qtype):
    state = random_model(TINY).state_dict()
    path = write_model_gguf(tmp_path / "tiny.gguf", state, TINY, qtype)
    checkpoint = read_gguf(path)
    reference = reference_tensors(path, TINY)
    assert set(checkpoint.state_dict) == {n for n in state if n != "output.weight" or not TINY.tie_embeddings}
    for name, tensor in checkpoint.state_dict.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[gguf_name(name)]), name
        assert (tensor - state[name]).abs().max() <= _QUANT_ERROR[qtype] * state[name].abs().max(), name
    counts = {qtype.name: 7 * TINY.n_layers + 2, "F32": 2 * TINY.n_layers + 1}  # 2-D weights, norms
    if qtype == Q.F32:
        counts = {"F32": 9 * TINY.n_layers + 3}
    assert checkpoint.metadata["tensor_types"] == counts


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_blocks_dequantize_as_gguf_does(tmp_path, qtype):
    state = random_model(TINY_K).state_dict()
    tensors = {}
    for seed, (name, values) in enumerate(llama_cpp_tensors(state, TINY_K).items()):
        if name == "output.weight":
            continue
        tensors[name] = (random_blocks(values.shape, qtype, seed), qtype) if values.ndim == 2 else (values, Q.F32)
    path = write_gguf(tmp_path / "k.gguf", TINY_K, tensors)
    checkpoint = read_gguf(path)
    reference = reference_tensors(path, TINY_K)
    for name, tensor in checkpoint.state_dict.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, reference[gguf_name(name)]), name
    assert checkpoint.metadata["tensor_types"] == {qtype.name: 8, "F32": 3}


def test_shapes_are_reversed_and_dtype_is_given(tmp_path):
    path = write_model_gguf(tmp_path / "tiny.gguf", random_model(TINY).state_dict(), TINY, Q.Q8_0)
    stored = {t.name: [int(d) for d in t.shape] for t in GGUFReader(path).tensors}
    assert stored["blk.0.ffn_down.weight"] == [TINY.hidden_dim, TINY.dim]  # innermost first
    assert stored["token_embd.weight"] == [TINY.dim, TINY.vocab_size]
    checkpoint = read_gguf(path, dtype=torch.bfloat16)
    assert checkpoint.state_dict["layers.0.feed_forward.w2.weight"].shape == (TINY.dim, TINY.hidden_dim)
    assert checkpoint.state_dict["layers.0.feed_forward.w1.weight"].shape == (TINY.hidden_dim, TINY.dim)
    assert checkpoint.state_dict["layers.1.attention.wk.weight"].shape == (TINY.n_kv_heads * TINY.head_dim, TINY.dim)
    assert checkpoint.state_dict["tok_embeddings.weight"].shape == (TINY.vocab_size, TINY.dim)
    assert all(t.dtype == torch.bfloat16 for t in checkpoint.state_dict.values())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_round_trip_through_llama_cpp_layout_keeps_logits(tmp_path, tied):
    args = dataclasses.replace(TINY, tie_embeddings=tied)
    original = random_model(args)
    path = write_model_gguf(tmp_path / "tiny.gguf", original.state_dict(), args)
    checkpoint = read_gguf(path)
    assert checkpoint.args == args
    assert ("output.weight" in checkpoint.state_dict) is not tied
    tokens = torch.randint(0, args.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_model(checkpoint)(tokens), original(tokens))


def test_stored_q_rows_are_in_meta_layout(tmp_path):
    # the reader must undo the converter's permutation: the file's own rows differ from ours
    state = random_model(TINY).state_dict()
    path = write_model_gguf(tmp_path / "tiny.gguf", state, TINY)
    stored = {t.name: torch.tensor(np.array(t.data)) for t in GGUFReader(path).tensors}
    ours = state["layers.0.attention.wq.weight"]
    assert not torch.equal(stored["blk.0.attn_q.weight"], ours)
    assert torch.equal(read_gguf(path).state_dict["layers.0.attention.wq.weight"], ours)


def test_caller_args_override_the_file(tmp_path):
    path = write_model_gguf(tmp_path / "tiny.gguf", random_model(TINY).state_dict(), TINY)
    override = dataclasses.replace(TINY, max_seq_len=64, rope_theta=5e5)
    assert read_gguf(path, override).args == override
    tied = dataclasses.replace(TINY, tie_embeddings=True)
    path = write_model_gguf(tmp_path / "tied.gguf", random_model(tied).state_dict(), tied)
    with pytest.raises(TorchatError, match=r"tied\.gguf.*'output\.weight' is missing"):
        read_gguf(path, TINY)


@pytest.mark.parametrize("head_dim", [128, 16], ids=["fitted-ramp", "default-ramp"])
def test_llama31_rope_scaling_from_rope_freqs(tmp_path, head_dim):
    args = tiny_args(dim=2 * head_dim, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, rope_theta=500000.0,
                     max_seq_len=256)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    tensors = {name: (values, Q.F32) for name, values in
               llama_cpp_tensors(random_model(args).state_dict(), args).items()}
    tensors["rope_freqs.weight"] = (llama31_rope_freqs(args, 8.0, 1.0, 4.0, 8192), Q.F32)
    checkpoint = read_gguf(write_gguf(tmp_path / "l31.gguf", args, tensors))
    assert checkpoint.args == dataclasses.replace(args, rope_scaling=scaling)
    assert "rope_freqs.weight" not in checkpoint.state_dict


def test_rope_freqs_that_are_not_llama31_scaling_are_refused(tmp_path):
    args = dataclasses.replace(TINY, n_layers=1)
    tensors = {name: (values, Q.F32) for name, values in
               llama_cpp_tensors(random_model(args).state_dict(), args).items()}
    tensors["rope_freqs.weight"] = (np.linspace(1, 3, args.head_dim // 2, dtype=np.float32)[::-1].copy(), Q.F32)
    with pytest.raises(TorchatError, match=r"bad\.gguf.*rope_freqs"):
        read_gguf(write_gguf(tmp_path / "bad.gguf", args, tensors))


def test_metadata_only(tmp_path):
    path = write_model_gguf(tmp_path / "tiny.gguf", random_model(TINY).state_dict(), TINY)
    metadata = gguf_metadata(path)
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.attention.head_count_kv"] == TINY.n_kv_heads
    assert metadata["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]
    assert metadata["tokenizer.chat_template"] == "{{ messages }}"
    assert read_gguf(path).metadata == {"architecture": "llama", "file_type": "MOSTLY_F16",
                                        "tokenizer_model": "llama", "chat_template": "{{ messages }}",
                                        "tensor_types": {"F32": 9 * TINY.n_layers + 3}}


# --- bad input: a TorchatError naming the file, and nothing written ---

def _assert_refused(path: Path, match: str):
    before = sorted(os.listdir(path.parent))
    with pytest.raises(TorchatError, match=match) as caught:
        read_gguf(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert sorted(os.listdir(path.parent)) == before


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.02], ids=["half", "last-bytes", "header"])
def test_truncated_file_is_refused(tmp_path, keep):
    full = write_model_gguf(tmp_path / "full.gguf", random_model(TINY).state_dict(), TINY, Q.Q4_1).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:int(len(full) * keep)])
    _assert_refused(cut, r"cut\.gguf.*truncated")


_NOISE = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()


@pytest.mark.parametrize("content", [b"", b"GGU", b"\x00" * 4096, _NOISE, b"GGUF" + _NOISE],
                         ids=["empty", "short", "zeros", "random", "magic-then-random"])
def test_garbage_is_refused(tmp_path, content):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    _assert_refused(path, r"garbage\.gguf")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(TorchatError, match=r"absent\.gguf: no such file"):
        read_gguf(tmp_path / "absent.gguf")


def test_missing_tensor_is_named(tmp_path):
    tensors = {name: (values, Q.F32) for name, values in
               llama_cpp_tensors(random_model(TINY).state_dict(), TINY).items()}
    del tensors["blk.1.ffn_up.weight"]
    _assert_refused(write_gguf(tmp_path / "holey.gguf", TINY, tensors),
                    r"holey\.gguf.*'layers\.1\.feed_forward\.w3\.weight' is missing")


def test_unsupported_architecture_lists_supported(tmp_path):
    tensors = {name: (values, Q.F32) for name, values in
               llama_cpp_tensors(random_model(TINY).state_dict(), TINY).items()}
    _assert_refused(write_gguf(tmp_path / "qwen.gguf", TINY, tensors, arch="qwen2"),
                    r"qwen\.gguf: architecture 'qwen2' is not supported; supported: llama")


def test_unsupported_tensor_type_lists_supported(tmp_path):
    args = TINY_K
    tensors = {name: (values, Q.F32) for name, values in
               llama_cpp_tensors(random_model(args).state_dict(), args).items()}
    shape = tensors["blk.0.ffn_up.weight"][0].shape
    block, type_size = GGML_QUANT_SIZES[Q.Q2_K]
    tensors["blk.0.ffn_up.weight"] = (np.zeros((shape[0], shape[1] // block * type_size), dtype=np.uint8), Q.Q2_K)
    _assert_refused(write_gguf(tmp_path / "q2k.gguf", args, tensors),
                    r"q2k\.gguf: tensor 'blk\.0\.ffn_up\.weight' has type Q2_K.*supported: "
                    + ", ".join(sorted(GGUF_TYPES)))


# --- the real SmolLM2-135M-Instruct file ---

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return read_gguf(smollm2_gguf)


def test_smollm2_args_match_the_config_table(smollm2):
    assert smollm2.args == ModelArgs(**lookup_config("SmolLM2-135M"))


def test_smollm2_tensors_and_metadata(smollm2, smollm2_gguf):
    assert smollm2.metadata["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert len(smollm2.state_dict) == 272  # 30 layers x 9 + embedding + final norm; tied, so no output.weight
    assert smollm2.metadata["architecture"] == "llama"
    assert smollm2.metadata["tokenizer_model"] == "gpt2"
    assert smollm2.metadata["file_type"] == "MOSTLY_Q4_1"
    assert "<|im_start|>" in smollm2.metadata["chat_template"]
    reader = GGUFReader(smollm2_gguf)
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type == Q.Q8_0
    expected = dequantize(embedding.data, embedding.tensor_type)
    assert torch.equal(smollm2.state_dict["tok_embeddings.weight"], torch.from_numpy(expected))



def test_gguf_tensor_name_is_the_readers_inverse():
    """Every canonical tensor of a model gets llama.cpp's name, as the test fixtures' own table writes it."""
    names = tiny_transformer(tiny_args()).state_dict().keys()
    for name in names:
        assert gguf_tensor_name(name) == gguf_name(name), name
