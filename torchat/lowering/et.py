"""ExecuTorch: an exported forward lowered to XNNPACK and torchat's kernels, its metadata as constant methods.

XNNPACK runs fp32 and 8da4w on the symmetric grid plus int8/int4 embeddings; 8da4w on the asymmetric grid (GGUF's
Q4_1, the presets' choice) and 8da8w (the presets' 8-bit head too) run on torchat's own kernels, `torchat::linear_q4`
and `torchat::linear_q8` (torchat/kernels/et_linear.cpp, see torchat.quant.asym4 and .intx), with each layer's norms,
SiLU gate and residual adds fused into its four calls (KernelBlock); weight-only
linear quant lowers *silently wrong* there (the weight scales are dropped), which `torchat.quant.backend_support`
refuses before anything is lowered. The embedding quant needs `do_quant_fusion_and_const_prop` to become
`quantized_decomposed::embedding_byte/4bit`, run by executorch's quantized kernels.

A layer's attention after its q/k/v projection is one call, `torchat::attention` (defined here for the export; its
ExecuTorch kernel is torchat/kernels/et_sdpa.cpp): RoPE, the in-place cache writes and a causal attention over the
filled slots only. ExecuTorch's own `llama::custom_sdpa` makes two MKL sgemm calls per query head and took ~15 % of
a SmolLM2 decode step (torchat's sdpa: 8da8w .pte 148-169 tok/s against 127-144, Zen 4); RoPE in XNNPACK, slices,
casts and `llama::update_cache` around the attention made eleven calls a layer. Without such ops the exported
index_put copies each cache and the SDPA decomposition runs over the whole static cache under a mask (SmolLM2 8da4w:
6.7 tok/s at a 2048 cache). Programs exported before call `llama::update_cache` and `torchat::sdpa`, which the
Python loader (executorch's AOT library, torchat.kernels) and runner-et (runner/et_llm_ops.cpp) still provide.

Everything else in a layer is written so that XNNPACK takes it whole where no torchat kernel runs the linears (fp32,
symmetric 8da4w): one delegate call per layer between two attention ops; XNNPACK takes no reshape with a symbolic
size (so the views name the sequence -1) and no mean but of a 4D tensor's two inner dims (so RMSNorm's mean square
is a matmul with a constant 1/dim row). The plain model lowered to four delegate calls a layer with a non-delegated
mean, split and views between them (SmolLM2 8da4w .pte, AVX2: 2.0 ms of its 10 ms decode step went to the 122
calls' overhead).
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.export import ExportedProgram

from torchat.errors import TorchatError
from torchat.exported import PTE_METADATA_METHOD, ArtifactMetadata
from torchat.lowering.fusion import KernelBlock, fused_linear
from torchat.model import Attention, KVCache, RMSNorm, Transformer, apply_rope
from torchat.quant.base import QuantizedModule

_TORCHAT_OPS = torch.library.Library("torchat", "DEF")
_TORCHAT_OPS.define("sdpa(Tensor query, Tensor key, Tensor value, SymInt start_pos) -> Tensor")
_TORCHAT_OPS.define("sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, *, Tensor(a!) out) "
                    "-> Tensor(a!)")


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start_pos: int) -> torch.Tensor:
    """torchat::sdpa in torch: queries (1, seq, heads, head_dim) at start_pos.. attend causally over the caches'
    (1, max_seq, kv_heads, head_dim) slots 0..start_pos + seq - 1 (grouped heads share a kv head); the caches may
    be fp16 under fp32 queries (their values widened), the output is the query's dtype."""
    seq, end = query.shape[1], start_pos + query.shape[1]
    visible = torch.ones(seq, end, dtype=torch.bool, device=query.device).tril(start_pos)
    key, value = key[:, :end].to(query.dtype), value[:, :end].to(query.dtype)
    y = nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=visible, enable_gqa=True)
    return y.transpose(1, 2).contiguous()


def _sdpa_out(query, key, value, start_pos, *, out):
    return out.copy_(sdpa(query, key, value, start_pos))


_TORCHAT_OPS.impl("sdpa", sdpa, "CompositeExplicitAutograd")
_TORCHAT_OPS.impl("sdpa.out", _sdpa_out, "CompositeExplicitAutograd")
_TORCHAT_OPS.impl("sdpa", lambda query, key, value, start_pos: torch.empty_like(query), "Meta")

_ATTENTION_ARGS = "Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start_pos"
_TORCHAT_OPS.define(f"attention({_ATTENTION_ARGS}) -> Tensor")
_TORCHAT_OPS.define(f"attention.out({_ATTENTION_ARGS}, *, Tensor(c!) out) -> Tensor(c!)")


def attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              start_pos: int) -> torch.Tensor:
    """torchat::attention in torch: a layer's fused q/k/v projection (batch, seq, (heads + 2 kv_heads) · head_dim)
    at positions start_pos.. -> its attention output (batch, seq, heads · head_dim). RoPE turns q's and k's heads
    (cos, sin: (seq, head_dim), the tables at those positions), k and v go into the caches' slots (written in place;
    (batch, max_seq, kv_heads, head_dim), in the caches' dtype) and the queries attend over the filled slots (sdpa).
    Its ExecuTorch kernel is torchat/kernels/et_sdpa.cpp."""
    batch, seq, width = qkv.shape
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    heads = width // head_dim - 2 * kv_heads
    x = qkv.view(batch, seq, -1, head_dim)
    turned = apply_rope(x[:, :, :heads + kv_heads].float(), cos, sin)
    k_cache[:, start_pos:start_pos + seq] = turned[:, :, heads:].to(k_cache.dtype)
    v_cache[:, start_pos:start_pos + seq] = x[:, :, heads + kv_heads:].to(v_cache.dtype)
    y = sdpa(turned[:, :, :heads].to(qkv.dtype), k_cache, v_cache, start_pos)
    return y.reshape(batch, seq, heads * head_dim)


def _attention_out(qkv, cos, sin, k_cache, v_cache, start_pos, *, out):
    return out.copy_(attention(qkv, cos, sin, k_cache, v_cache, start_pos))


def _attention_meta(qkv, cos, sin, k_cache, v_cache, start_pos):
    heads = qkv.shape[-1] // k_cache.shape[3] - 2 * k_cache.shape[2]
    return qkv.new_empty(*qkv.shape[:-1], heads * k_cache.shape[3])


_TORCHAT_OPS.impl("attention", attention, "CompositeExplicitAutograd")
_TORCHAT_OPS.impl("attention.out", _attention_out, "CompositeExplicitAutograd")
_TORCHAT_OPS.impl("attention", _attention_meta, "Meta")


def kv_cache_dtype(dtype: torch.dtype, quantized: bool) -> torch.dtype:
    """The dtype of a .pte's KV cache: fp16 for a quantized model, whose quantization error dwarfs fp16's rounding of
    keys and values (llama.cpp's default cache type too), so a long-context step reads half the cache bytes; the
    model's own float dtype otherwise (an fp32 .pte stays within 1e-4 of eager)."""
    return torch.float16 if quantized else dtype


def cache_dtype(model: Transformer) -> torch.dtype:
    return kv_cache_dtype(model.layers[0].attention_norm.weight.dtype,
                          any(isinstance(module, QuantizedModule) for module in model.modules()))


class CachedAttention(nn.Module):
    """`attention`'s projections around torchat::attention: RoPE, the in-place cache writes and a causal SDPA over
    the filled slots in one call (torchat/kernels/et_sdpa.cpp; before, a delegated RoPE, three slices, two casts and
    llama::update_cache twice made eleven calls a layer).

    q, k and v come from one GEMM (wq, wk and wv concatenated: a third of the operators, and one quantization of the
    input instead of three), which the attention op takes whole. The caches are (batch, max_seq_len, kv_heads,
    head_dim); positions must be consecutive (a prompt, then one token at a time), which is how every caller drives
    the model.
    """

    def __init__(self, attention: Attention, cache: KVCache, dtype: torch.dtype):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        projections = [attention.wq, attention.wk, attention.wv]
        self.wqkv = fused_linear(projections)
        if self.wqkv is None:  # every kind ExecuTorch takes (fp32, 8da4w, 8da8w) has the form
            raise TorchatError(f"ExecuTorch: wq, wk and wv ({', '.join(type(p).__name__ for p in projections)}) "
                               "have no one-projection form; quantize them with one scheme it takes")
        self.wo = attention.wo
        # the model's cache (batch, kv_heads, max_seq_len, head_dim) with seq and heads swapped, in `dtype`
        like = cache.k_cache.transpose(1, 2)
        self.register_buffer("k_cache", torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros_like(like, dtype=dtype, memory_format=torch.contiguous_format),
                             persistent=False)

    def forward(self, x, cos, sin, input_pos, mask, attend=None):
        return self.wo(self.attend(self.wqkv(x), cos, sin, input_pos))

    def attend(self, qkv, cos, sin, input_pos, mask=None, attend=None):
        """The fused projection's output (batch, seq, (heads + 2 kv_heads) · head_dim) -> the heads' attention
        output (batch, seq, heads · head_dim), the caches written (over the filled slots: mask and attend, the
        model's, are not needed)."""
        start, seq = input_pos[0].item(), qkv.shape[1]
        torch._check(start >= 0)
        torch._check(start + seq <= self.k_cache.shape[1])
        return torch.ops.torchat.attention(qkv, cos, sin, self.k_cache, self.v_cache, start)


class MatmulRMSNorm(RMSNorm):
    """An RMSNorm (sharing `norm`'s weight) whose mean square is a matmul with a constant 1/dim row, which XNNPACK
    delegates (see above)."""

    def __init__(self, norm: RMSNorm):
        dim = norm.weight.shape[0]
        super().__init__(dim, norm.eps)
        self.weight = norm.weight
        self.register_buffer("mean_row", torch.full((1, dim), 1.0 / dim, device=norm.weight.device),
                             persistent=False)

    def mean_square(self, xf):
        return nn.functional.linear(xf * xf, self.mean_row)


@contextmanager
def llm_attention(model: Transformer):
    """While the forward is exported: every layer's attention on ExecuTorch's LLM ops, every RMSNorm in its
    matmul form, every linear that torchat's kernels take (8da4w on the asymmetric grid, 8da8w) on them, with the rest
    of its layer fused in where all of the layer's are (KernelBlock); then the model as it was."""
    originals = [layer.attention for layer in model.layers]
    caches = [attention.kv_cache for attention in originals]
    norms = {name: module for name, module in model.named_modules() if isinstance(module, RMSNorm)}
    model.filled_attention = False  # the wrappers bound their attention themselves
    dtype = cache_dtype(model)
    blocks, kernel_linears = list(model.layers), []
    try:
        for i, (block, attention, cache) in enumerate(zip(blocks, originals, caches)):
            attention.kv_cache = None  # the wrapper keeps its own caches; these would ship unused
            block.attention = CachedAttention(attention, cache, dtype)
            model.layers[i] = KernelBlock.of(block, block.attention) or block
        for name, norm in norms.items():
            model.set_submodule(name, MatmulRMSNorm(norm))
        kernel_linears = [m for m in model.modules() if getattr(m, "runs_on_kernel", False)]
        for linear in kernel_linears:
            linear.set_kernel(True)
        yield model
    finally:
        for linear in kernel_linears:
            linear.set_kernel(False)
        for name, norm in norms.items():
            model.set_submodule(name, norm)
        for i, (block, attention, cache) in enumerate(zip(blocks, originals, caches)):
            model.layers[i] = block
            attention.kv_cache = cache
            block.attention = attention
        model.filled_attention = True


def constant_methods(metadata: ArtifactMetadata) -> dict:
    """The methods a C++ runner calls for the metadata: ExecuTorch-llama's names plus the whole JSON."""
    methods = {PTE_METADATA_METHOD: metadata.to_json(), "get_max_seq_len": metadata.max_seq_len,
               "get_vocab_size": metadata.vocab_size, "get_max_batch_size": 1, "use_kv_cache": True,
               "enable_dynamic_shape": True}
    if metadata.bos_id is not None:
        methods["get_bos_id"] = metadata.bos_id
    if metadata.eos_id is not None:
        methods["get_eos_id"] = metadata.eos_id
    return methods


def lower_et(programs: dict[str, ExportedProgram], metadata: ArtifactMetadata, output: Path) -> None:
    """Lower the programs (method name -> program) to one XNNPACK-delegated ExecuTorch program `output` (.pte):
    their weights stored once (ExecuTorch's emitter shares equal constants), their KV caches shared (one buffer per
    name across the methods, which the runtime's Program API and runner-et's Module keep in one arena)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    with torch.no_grad():
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=constant_methods(metadata))
        config = ExecutorchBackendConfig(extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
                                         memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True))
        executorch_program = edge.to_executorch(config)
    Path(output).write_bytes(executorch_program.buffer)
