// The ExecuTorch kernel for the LLM-extension op our .pte programs write their caches with: llama::update_cache.out
// (the new keys/values into the static cache in place). Written by hand because the executorch pip wheel ships it
// only inside its Python AOT library (libcustom_ops_aot_lib.so, which needs libtorch and libpython), not as a C++
// library for runners. Semantics follow that library: tensors are (batch, seq, heads, head_dim). The attention
// itself (torchat::sdpa.out) is torchat/kernels/et_sdpa.cpp, shared with the Python loader.
#ifndef TORCHAT_BACKEND_ET
#error "et_llm_ops.cpp is runner-et's; compile it with TORCHAT_BACKEND_ET"
#endif

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/platform/log.h>

#include <cstring>

namespace torchat {
namespace {

using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

bool fail(KernelRuntimeContext& context, const char* op, const char* why) {
  ET_LOG(Error, "%s: %s", op, why);
  context.fail(Error::InvalidArgument);
  return false;
}

// (batch 1, seq, heads, head_dim), contiguous
bool is_bshd(const Tensor& t) {
  return t.dim() == 4 && t.size(0) == 1 && executorch::runtime::tensor_is_contiguous(t);
}

// update_cache.out(Tensor value, Tensor(a!) cache, SymInt start_pos, *, Tensor(b!) out) -> Tensor(b!)
void update_cache_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const char* op = "llama::update_cache.out";
  const Tensor& value = stack[0]->toTensor();
  Tensor& cache = stack[1]->toTensor();
  const int64_t start = stack[2]->toInt();
  if (!is_bshd(value) || !is_bshd(cache) || value.scalar_type() != cache.scalar_type() ||
      value.size(2) != cache.size(2) || value.size(3) != cache.size(3))
    return void(fail(context, op, "value and cache must be contiguous (1, seq, heads, head_dim) of one dtype"));
  if (start < 0 || start + value.size(1) > cache.size(1))
    return void(fail(context, op, "start_pos + seq runs past the cache"));
  const size_t row = value.nbytes() / static_cast<size_t>(value.size(1));
  std::memcpy(static_cast<char*>(cache.mutable_data_ptr()) + static_cast<size_t>(start) * row,
              value.const_data_ptr(), value.nbytes());
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("llama::update_cache.out", update_cache_out),
};
const Error kRegistered = executorch::runtime::register_kernels({kKernels, 1});

}  // namespace
}  // namespace torchat
