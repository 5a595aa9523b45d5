// ExecuTorch kernels for the two LLM-extension ops our .pte programs call: llama::update_cache.out (write the new
// keys/values into the static cache in place) and llama::custom_sdpa.out (causal attention over the filled part
// of the cache only). Written by hand because the executorch pip wheel ships these kernels only inside its Python
// AOT library (libcustom_ops_aot_lib.so, which needs libtorch and libpython), not as a C++ library for runners.
// Semantics follow that library: tensors are (batch, seq, heads, head_dim), the query at start_pos + i sees cache
// slots 0..start_pos + i, grouped-query heads share a key/value head. The Python loader runs ExecuTorch's own
// kernels; the runner-vs-loader tests compare the two.
#ifndef TORCHAT_BACKEND_ET
#error "et_llm_ops.cpp is runner-et's; compile it with TORCHAT_BACKEND_ET"
#endif

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/log.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace torchat {
namespace {

using executorch::aten::ScalarType;
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

float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// custom_sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, Tensor? attn_mask=None,
//                 float drpout_p=0., bool is_causal=False, float? scale=None, *, Tensor(a!) out) -> Tensor(a!)
void custom_sdpa_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const char* op = "llama::custom_sdpa.out";
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t start = stack[3]->toInt();
  Tensor& out = stack[8]->toTensor();
  if (!stack[4]->isNone()) return void(fail(context, op, "an explicit attn_mask is not supported (causal only)"));
  if (!stack[6]->toBool()) return void(fail(context, op, "only is_causal=True is supported"));
  if (!is_bshd(q) || !is_bshd(k) || !is_bshd(v) || q.scalar_type() != ScalarType::Float ||
      k.scalar_type() != ScalarType::Float || v.scalar_type() != ScalarType::Float)
    return void(fail(context, op, "query, key and value must be contiguous float32 (1, seq, heads, head_dim)"));
  const int64_t seq = q.size(1), heads = q.size(2), dim = q.size(3), kv_heads = k.size(2);
  if (k.size(3) != dim || v.size(3) != dim || v.size(2) != kv_heads || kv_heads == 0 || heads % kv_heads != 0)
    return void(fail(context, op, "head_dim or grouped heads do not match between query and cache"));
  if (start < 0 || start + seq > k.size(1)) return void(fail(context, op, "start_pos + seq runs past the cache"));
  if (executorch::runtime::resize_tensor(out, q.sizes()) != Error::Ok)
    return void(fail(context, op, "cannot resize the output to the query's shape"));
  const double scale = stack[7]->isNone() ? 1.0 / std::sqrt(static_cast<double>(dim)) : stack[7]->toDouble();
  const float* qd = q.const_data_ptr<float>();
  const float* kd = k.const_data_ptr<float>();
  const float* vd = v.const_data_ptr<float>();
  float* od = out.mutable_data_ptr<float>();
  const int64_t group = heads / kv_heads;
  // one work item per (query, head): its scores over the attended slots, softmax, then the weighted values
  executorch::extension::parallel_for(0, seq * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(start + seq));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / heads, h = item % heads, kvh = h / group, slots = start + i + 1;
      const float* query = qd + (i * heads + h) * dim;
      float peak = -INFINITY;
      for (int64_t j = 0; j < slots; ++j) {
        scores[j] = static_cast<float>(dot(query, kd + (j * kv_heads + kvh) * dim, dim) * scale);
        peak = std::max(peak, scores[j]);
      }
      float total = 0.f;
      for (int64_t j = 0; j < slots; ++j) total += scores[j] = std::exp(scores[j] - peak);
      float* o = od + (i * heads + h) * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t j = 0; j < slots; ++j) {
        const float p = scores[j] / total;
        const float* value = vd + (j * kv_heads + kvh) * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] += p * value[d];
      }
    }
  });
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("llama::update_cache.out", update_cache_out),
    executorch::runtime::Kernel("llama::custom_sdpa.out", custom_sdpa_out),
};
const Error kRegistered = executorch::runtime::register_kernels({kKernels, 2});

}  // namespace
}  // namespace torchat
