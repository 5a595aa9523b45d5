"""torchat::sdpa's ExecuTorch kernel (torchat/kernels/et_sdpa.cpp, run by the pybindings) against torch's
scaled_dot_product_attention over the same filled cache slots: prefill and decode, grouped heads, caches long
enough for the decode path to split the slots into chunks for the threads, fp16 caches (a quantized .pte's) under
fp32 queries, head sizes that take the kernel's vector paths (64: SmolLM2's and Llama's) and its plain loops
(16, and 80 = 64 columns and 16 more), and groups of query heads per kv head that take each of its tiles (heads
sharing a widened key: 4 as Llama-3's, 3 as SmolLM2's, 2, 1 and 7 = 4 + 3)."""

import pytest
import torch
from torch import nn
from torch.export import Dim

from torchat.exported import load_llm_ops
from torchat.lowering.et import sdpa

MAX_SEQ = 1024


class Attend(nn.Module):
    def forward(self, query, key, value, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + query.shape[1] <= key.shape[1])
        return torch.ops.torchat.sdpa(query, key, value, start)


def reference(query, key, value, start):
    """Plain softmax attention, in float64, position by position."""
    heads, kv_heads, dim = query.shape[2], key.shape[2], query.shape[3]
    out = torch.empty(query.shape, dtype=torch.float64)
    for i in range(query.shape[1]):
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            keys = key[0, :start + i + 1, kvh].double()
            weights = torch.softmax(keys @ query[0, i, h].double() / dim ** 0.5, dim=0)
            out[0, i, h] = weights @ value[0, :start + i + 1, kvh].double()
    return out


@pytest.fixture(scope="module", params=[(torch.float32, 64, 8, 2), (torch.float16, 64, 8, 2), (torch.float16, 16, 8, 2),
                                        (torch.float32, 80, 8, 2), (torch.float16, 64, 9, 3), (torch.float16, 64, 6, 3),
                                        (torch.float32, 64, 3, 3), (torch.float16, 80, 7, 1)],
                ids=lambda p: f"{str(p[0])[6:]}-cache-dim{p[1]}-heads{p[2]}-kv{p[3]}")
def program(request, tmp_path_factory):
    """Attend as an ExecuTorch program (no delegate: the op runs on the registered kernel) with caches of the
    param's dtype, head size and heads, loaded back: (program, cache dtype, head size, heads, kv heads)."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    load_llm_ops()
    seq = Dim("seq", min=1, max=MAX_SEQ)
    dtype, dim, heads, kv_heads = request.param
    cache = torch.zeros(1, MAX_SEQ, kv_heads, dim, dtype=dtype)
    example = (torch.zeros(1, 2, heads, dim), cache, cache.clone(), torch.tensor([0]))
    exported = torch.export.export(Attend(), example, dynamic_shapes=({1: seq}, None, None, None), strict=False)
    edge = to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    path = tmp_path_factory.mktemp("sdpa") / "sdpa.pte"
    path.write_bytes(edge.to_executorch().buffer)
    return _load_for_executorch(str(path)), dtype, dim, heads, kv_heads


@pytest.mark.parametrize("seq,start", [(5, 0), (7, 20), (1, 0), (1, 300), (1, MAX_SEQ - 1), (3, 700)])
def test_kernel_matches_softmax_attention(program, seq, start):
    program, cache_dtype, dim, heads, kv_heads = program
    generator = torch.Generator().manual_seed(seq * 1000 + start)
    query = torch.randn(1, seq, heads, dim, generator=generator) * 4 / dim ** 0.5
    key = (torch.randn(1, MAX_SEQ, kv_heads, dim, generator=generator) * 2).to(cache_dtype)
    value = torch.randn(1, MAX_SEQ, kv_heads, dim, generator=generator).to(cache_dtype)
    expected = reference(query, key, value, start)  # of the cache's values as stored
    got = program.forward((query, key, value, torch.tensor([start])))[0]
    assert got.shape == query.shape
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
    # the torch form the export records (eager and the op's CompositeExplicitAutograd impl) agrees as well
    torch.testing.assert_close(sdpa(query, key, value, start).double(), expected, atol=2e-5, rtol=1e-4)


def test_kernel_refuses_a_query_past_the_cache(program):
    program, cache_dtype, dim, heads, kv_heads = program
    query = torch.randn(1, 4, heads, dim)
    cache = torch.zeros(1, MAX_SEQ, kv_heads, dim, dtype=cache_dtype)
    with pytest.raises(RuntimeError):
        program.forward((query, cache, cache, torch.tensor([MAX_SEQ - 2])))


class Layer(nn.Module):
    """torchat::attention as a .pte layer calls it: caches of its own, written in place."""

    def __init__(self, dtype, dim, kv_heads=2):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, MAX_SEQ, kv_heads, dim, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(1, MAX_SEQ, kv_heads, dim, dtype=dtype))

    def forward(self, qkv, cos, sin, input_pos):
        start = input_pos[0].item()
        torch._check(start >= 0)
        torch._check(start + qkv.shape[1] <= self.k_cache.shape[1])
        return torch.ops.torchat.attention(qkv, cos, sin, self.k_cache, self.v_cache, start)


def turned(x, cos, sin):
    """RoPE (rotate-half) in float64, written out: x (seq, heads, dim), cos and sin (seq, dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16], ids=["f32-cache", "f16-cache"])
def test_attention_kernel_turns_writes_and_attends(tmp_path, cache_dtype):
    """torchat::attention (RoPE on q's and k's heads, k and v into the caches, sdpa) over a prompt and then decode
    steps, against RoPE and softmax attention in float64 over a cache of its own (its k and v rounded to the cache's
    dtype, as stored); the torch form agrees too."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    from torchat.model import ModelArgs, rope_frequencies

    load_llm_ops()
    heads, kv_heads, dim = 8, 2, 64
    width = (heads + 2 * kv_heads) * dim
    seq = Dim("seq", min=1, max=MAX_SEQ)
    example = (torch.zeros(1, 2, width), torch.zeros(2, dim), torch.zeros(2, dim), torch.tensor([0]))
    exported = torch.export.export(Layer(cache_dtype, dim), example,
                                   dynamic_shapes=({1: seq}, {0: seq}, {0: seq}, None), strict=False)
    edge = to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    (tmp_path / "attention.pte").write_bytes(edge.to_executorch().buffer)
    program = _load_for_executorch(str(tmp_path / "attention.pte"))
    eager = Layer(cache_dtype, dim)

    cos, sin = rope_frequencies(ModelArgs(dim=heads * dim, n_heads=heads, n_kv_heads=kv_heads), 64)
    keys = torch.zeros(1, MAX_SEQ, kv_heads, dim, dtype=cache_dtype)
    values = torch.zeros_like(keys)
    generator = torch.Generator().manual_seed(0)
    start = 0
    for length in (7, 1, 1, 3):
        qkv = torch.randn(1, length, width, generator=generator)
        c, s = cos[start:start + length], sin[start:start + length]
        x = qkv.view(length, heads + 2 * kv_heads, dim).double()
        q, k, v = x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]
        keys[0, start:start + length] = turned(k, c.double(), s.double()).to(cache_dtype)
        values[0, start:start + length] = v.to(cache_dtype)
        expected = reference(turned(q, c.double(), s.double())[None], keys, values, start).view(1, length, -1)
        got = program.forward((qkv, c, s, torch.tensor([start])))[0]
        assert got.shape == (1, length, heads * dim)
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(eager(qkv, c, s, torch.tensor([start])).double(), expected, atol=2e-5, rtol=1e-4)
        start += length
    # what the torch form wrote, as stored
    torch.testing.assert_close(eager.k_cache[:, :start], keys[:, :start], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(eager.v_cache[:, :start], values[:, :start], atol=0, rtol=0)
