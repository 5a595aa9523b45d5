// ExecuTorch kernel for torchat::sdpa.out: causal attention of a block of queries over the filled part of a static
// KV cache, the attention every torchat .pte calls (torchat/lowering/et.py). Written by hand: ExecuTorch's own
// llama::custom_sdpa (a tiled flash attention) took 32 us a layer for one SmolLM2 decode step at 150 positions
// (20 % of the step) where the arithmetic is ~4 us; a decode step's few queries need a different loop.
//
// query (1, seq, heads, head_dim), key/value caches (1, max_seq, kv_heads, head_dim), fp32, contiguous; the query
// at start_pos + i sees cache slots 0..start_pos + i; grouped-query heads share a key/value head, and the heads of
// a group are done together so that each key and value row is read once per group. One work item is (query,
// kv head, chunk of slots); a long cache with few queries (decode) is cut into chunks for the threads, each keeping
// a running max and sum that are merged at the end (flash-decoding).
//
// Built into runner-et, and for the Python loader into a shared library loaded next to ExecuTorch's pybindings
// (torchat/kernels/__init__.py).

#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_runtime_context.h>
#include <executorch/runtime/kernel/operator_registry.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>
#include <executorch/runtime/platform/log.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace torchat {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

constexpr int64_t kMinChunk = 64;    // slots: below this a chunk's work does not pay for a thread hand-off
constexpr int64_t kSerialWork = 1 << 16;  // multiply-adds: below this the whole op runs on the calling thread
// the max score of an empty chunk (no infinities: the file is compiled with -ffast-math for a vectorized exp)
constexpr float kLowest = std::numeric_limits<float>::lowest();

bool is_bshd_float(const Tensor& t) {
  return t.dim() == 4 && t.size(0) == 1 && t.scalar_type() == ScalarType::Float &&
         executorch::runtime::tensor_is_contiguous(t);
}

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  int64_t seq, heads, kv_heads, dim, start, chunks, chunk;
  float scale;
};

// Query `i`'s heads over slots [lo, hi): per head its max score, sum of exp(score - max) and the unnormalized
// weighted values (dim floats each). Each slot's keys and values (all kv heads: one contiguous row) are read once.
void attend(const Problem& p, int64_t i, int64_t lo, int64_t hi, float* max_out, float* sum_out, float* acc) {
  const int64_t group = p.heads / p.kv_heads, n = hi - lo, dim = p.dim, row = p.kv_heads * dim;
  std::vector<float> scores(static_cast<size_t>(p.heads * n));
  const float* q = p.q + i * p.heads * dim;
  for (int64_t j = 0; j < n; ++j) {
    const float* keys = p.k + (lo + j) * row;
    for (int64_t h = 0; h < p.heads; ++h) {
      const float* query = q + h * dim;
      const float* key = keys + (h / group) * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += query[d] * key[d];
      scores[h * n + j] = dot * p.scale;
    }
  }
  for (int64_t h = 0; h < p.heads; ++h) {
    float* s = scores.data() + h * n;
    float peak = s[0];
    for (int64_t j = 1; j < n; ++j) peak = std::max(peak, s[j]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      // a weight below e^-80 is 0: exp would return a denormal, and denormal arithmetic in the weighted sum is
      // ~100x slower (peaky attention underflows most weights); 0 is what a float sum makes of them anyway
      const float x = s[j] - peak;
      s[j] = x < -80.f ? 0.f : std::exp(x);
      total += s[j];
    }
    max_out[h] = peak;
    sum_out[h] = total;
  }
  std::fill(acc, acc + p.heads * dim, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* values = p.v + (lo + j) * row;
    for (int64_t h = 0; h < p.heads; ++h) {
      const float w = scores[h * n + j];
      const float* value = values + (h / group) * dim;
      float* a = acc + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) a[d] += w * value[d];
    }
  }
}

// sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, *, Tensor(a!) out) -> Tensor(a!)
void sdpa_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t start = stack[3]->toInt();
  Tensor& out = stack[4]->toTensor();
  const char* why = nullptr;
  if (!is_bshd_float(q) || !is_bshd_float(k) || !is_bshd_float(v))
    why = "query, key and value must be contiguous float32 (1, seq, heads, head_dim)";
  else if (k.size(3) != q.size(3) || v.size(3) != q.size(3) || v.size(2) != k.size(2) || k.size(2) == 0 ||
           q.size(2) % k.size(2) != 0 || v.size(1) != k.size(1))
    why = "head_dim or grouped heads do not match between query and cache";
  else if (start < 0 || start + q.size(1) > k.size(1))
    why = "start_pos + seq runs past the cache";
  else if (executorch::runtime::resize_tensor(out, q.sizes()) != Error::Ok)
    why = "cannot resize the output to the query's shape";
  if (why != nullptr) {
    ET_LOG(Error, "torchat::sdpa.out: %s", why);
    context.fail(Error::InvalidArgument);
    return;
  }
  Problem p{q.const_data_ptr<float>(), k.const_data_ptr<float>(), v.const_data_ptr<float>(), q.size(1), q.size(2),
            k.size(2), q.size(3), start, 1, 0, static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.size(3))))};
  const int64_t slots = start + p.seq;
  const int64_t threads = executorch::extension::get_thread_count();
  const int64_t work = p.seq * p.heads * slots * p.dim;
  if (work >= kSerialWork && p.seq < threads)  // fewer queries than threads (decode): the cache in chunks
    p.chunks = std::max<int64_t>(1, std::min(threads, slots / kMinChunk));
  p.chunk = (slots + p.chunks - 1) / p.chunks;
  float* o = out.mutable_data_ptr<float>();
  const int64_t items = p.seq * p.chunks;
  // per item and head: max, sum, then dim accumulated values
  const int64_t stride = p.heads * (2 + p.dim);
  std::vector<float> partial(static_cast<size_t>(items * stride));
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t c = item % p.chunks, i = item / p.chunks;
      const int64_t visible = start + i + 1, lo = c * p.chunk, hi = std::min(visible, lo + p.chunk);
      float* part = partial.data() + item * stride;
      if (lo >= hi) {  // this chunk lies past what query i sees
        std::fill(part, part + p.heads, kLowest);
        std::fill(part + p.heads, part + 2 * p.heads, 0.f);
        continue;
      }
      attend(p, i, lo, hi, part, part + p.heads, part + 2 * p.heads);
    }
  };
  if (work < kSerialWork || items == 1)
    run(0, items);
  else
    executorch::extension::parallel_for(0, items, 1, run);
  // merge each query head's chunks: out = sum_c acc_c e^(max_c - M) / sum_c sum_c e^(max_c - M)
  for (int64_t i = 0; i < p.seq; ++i) {
    const float* first = partial.data() + i * p.chunks * stride;
    for (int64_t h = 0; h < p.heads; ++h) {
      float peak = kLowest;
      for (int64_t c = 0; c < p.chunks; ++c) peak = std::max(peak, first[c * stride + h]);
      float total = 0.f;
      float* y = o + (i * p.heads + h) * p.dim;
      std::fill(y, y + p.dim, 0.f);
      for (int64_t c = 0; c < p.chunks; ++c) {
        const float* part = first + c * stride;
        if (part[p.heads + h] == 0.f) continue;  // an empty chunk
        const float w = part[h] - peak < -80.f ? 0.f : std::exp(part[h] - peak);
        total += part[p.heads + h] * w;
        const float* acc = part + 2 * p.heads + h * p.dim;
#pragma omp simd
        for (int64_t d = 0; d < p.dim; ++d) y[d] += w * acc[d];
      }
      const float inverse = 1.f / total;
#pragma omp simd
      for (int64_t d = 0; d < p.dim; ++d) y[d] *= inverse;
    }
  }
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("torchat::sdpa.out", sdpa_out),
};
const Error kRegistered = executorch::runtime::register_kernels({kKernels, 1});

}  // namespace
}  // namespace torchat
