// ExecuTorch kernels for torchat::sdpa.out: causal attention of a block of queries over the filled part of a
// static KV cache, and torchat::attention.out: RoPE, the cache writes and that attention in one call, what every
// torchat .pte's layer calls after its q/k/v projection (torchat/lowering/et.py; earlier ones call sdpa alone).
// Written by hand: ExecuTorch's own llama::custom_sdpa (a tiled flash attention) took 32 us a layer for one SmolLM2
// decode step at 150 positions (20 % of the step) where the arithmetic is ~4 us; a decode step's few queries need a
// different loop.
//
// query (1, seq, heads, head_dim) fp32, key/value caches (1, max_seq, kv_heads, head_dim) fp32 or fp16 (a quantized
// .pte keeps its cache in fp16: half the bytes a long-context step reads), contiguous; the query at start_pos + i
// sees cache slots 0..start_pos + i; grouped-query heads share a key/value head, and the heads of a group are done
// together so that each key and value row is read once per group. One work item is (query,
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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

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

bool is_bshd(const Tensor& t, ScalarType dtype) {
  return t.dim() == 4 && t.size(0) == 1 && t.scalar_type() == dtype && executorch::runtime::tensor_is_contiguous(t);
}

// KV: the caches' element type, float or _Float16 (the compiler's IEEE half).
template <typename KV>
struct Problem {
  const float* q;
  const KV* k;
  const KV* v;
  int64_t seq, heads, kv_heads, dim, start, chunks, chunk;
  float scale;
};

// The two products, written twice: portable loops, and for x86 with AVX2, FMA and F16C (every AVX2 CPU) a form
// with 8-float registers where each loop was bound by something other than its arithmetic (perf annotate, SmolLM2
// decode at 2000 positions, where attention was half the step): a dot product's horizontal sum per (slot, head) —
// now eight slots' sums share one transposing reduction — and the weighted-value accumulator's store per (slot,
// head) — now a head's 64 accumulators stay in registers over a block of slots. GCC 12 also leaves a loop that converts
// _Float16 scalar; F16C's conversion is one instruction per 8 values.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TORCHAT_SDPA_AVX2 1
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const _Float16* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }

// the 8 lanes' sums of a[0..7], in order
inline __m256 sums8(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

// Slots are walked in blocks of kBlock: a block of one kv head's keys or values (8 KB in fp16 at head size 64)
// stays in L1 while every query head of its group reads it. Walking all slots once per query head instead read a
// long cache from memory `group` times over (a Llama-3.2-1B-shaped model at 8192 positions: 4 heads a group).
constexpr int64_t kBlock = 64;

// f(rows, b0, b1, h) for every kv head (outermost), block [b0, b1) of the slots lo .. lo + n - 1 and query head h
// of the kv head's group; rows: the cache at slot lo and that kv head (a slot's rows are `kv_heads * dim` apart)
template <typename KV, typename F>
void by_blocks(const Problem<KV>& p, const KV* cache, int64_t lo, int64_t n, F&& f) {
  const int64_t group = p.heads / p.kv_heads, row = p.kv_heads * p.dim;
  for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh)
    for (int64_t b0 = 0; b0 < n; b0 += kBlock)
      for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
        f(cache + lo * row + kvh * p.dim, b0, std::min(n, b0 + kBlock), h);
}

// scores[h * n + j] = scale · q_h · k_j for slots lo .. lo + n - 1, each head against its group's kv head
template <typename KV>
void dot_products(const Problem<KV>& p, const float* q, int64_t lo, int64_t n, float* scores) {
  const int64_t dim = p.dim, row = p.kv_heads * dim;
  by_blocks(p, p.k, lo, n, [&](const KV* keys, int64_t b0, int64_t b1, int64_t h) {
    const float* query = q + h * dim;
    float* out = scores + h * n;
    int64_t j = b0;
#ifdef TORCHAT_SDPA_AVX2
    if (dim % 8 == 0) {
      for (; j + 8 <= b1; j += 8) {
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t d = 0; d < dim; d += 8) {
          const __m256 qd = _mm256_loadu_ps(query + d);
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(qd, load8(keys + (j + r) * row + d), acc[r]);
        }
        _mm256_storeu_ps(out + j, _mm256_mul_ps(sums8(acc), _mm256_set1_ps(p.scale)));
      }
    }
#endif
    for (; j < b1; ++j) {
      const KV* key = keys + j * row;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += query[d] * static_cast<float>(key[d]);
      out[j] = dot * p.scale;
    }
  });
}

// acc[h * dim + d] = Σ_j weights[h * n + j] · v_j[d] over slots lo .. lo + n - 1
template <typename KV>
void weighted_values(const Problem<KV>& p, const float* weights, int64_t lo, int64_t n, float* acc) {
  const int64_t dim = p.dim, row = p.kv_heads * dim;
  std::fill(acc, acc + p.heads * dim, 0.f);
  by_blocks(p, p.v, lo, n, [&](const KV* values, int64_t b0, int64_t b1, int64_t h) {
    const float* w = weights + h * n;
    float* a = acc + h * dim;
    int64_t d0 = 0;
#ifdef TORCHAT_SDPA_AVX2
    for (; d0 + 64 <= dim; d0 += 64) {  // 64 of the head's columns in 8 registers over the block's slots
      __m256 sum[8];
      for (int c = 0; c < 8; ++c) sum[c] = _mm256_loadu_ps(a + d0 + 8 * c);
      for (int64_t j = b0; j < b1; ++j) {
        const __m256 wj = _mm256_set1_ps(w[j]);
        const KV* value = values + j * row + d0;
        for (int c = 0; c < 8; ++c) sum[c] = _mm256_fmadd_ps(wj, load8(value + 8 * c), sum[c]);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(a + d0 + 8 * c, sum[c]);
    }
#endif
    for (int64_t j = b0; j < b1 && d0 < dim; ++j) {
      const KV* value = values + j * row;
      const float wj = w[j];
#pragma omp simd
      for (int64_t d = d0; d < dim; ++d) a[d] += wj * static_cast<float>(value[d]);
    }
  });
}

// Query `i`'s heads over slots [lo, hi): per head its max score, sum of exp(score - max) and the unnormalized
// weighted values (dim floats each).
template <typename KV>
void attend(const Problem<KV>& p, int64_t i, int64_t lo, int64_t hi, float* max_out, float* sum_out, float* acc) {
  const int64_t n = hi - lo;
  std::vector<float> scores(static_cast<size_t>(p.heads * n));
  dot_products(p, p.q + i * p.heads * p.dim, lo, n, scores.data());
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
  weighted_values(p, scores.data(), lo, n, acc);
}

// queries q (seq, heads, dim) at start.. over the caches' (max_seq, kv_heads, dim) slots 0..start + seq - 1 -> o
// (seq, heads, dim)
template <typename KV>
void run_sdpa(const float* q, const KV* k, const KV* v, int64_t seq, int64_t heads, int64_t kv_heads, int64_t dim,
              int64_t start, float* o) {
  Problem<KV> p{q, k, v, seq, heads, kv_heads, dim, start, 1, 0,
                static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)))};
  const int64_t slots = start + p.seq;
  const int64_t threads = executorch::extension::get_thread_count();
  const int64_t work = p.seq * p.heads * slots * p.dim;
  if (work >= kSerialWork && p.seq < threads)  // fewer queries than threads (decode): the cache in chunks
    p.chunks = std::max<int64_t>(1, std::min(threads, slots / kMinChunk));
  p.chunk = (slots + p.chunks - 1) / p.chunks;
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

// fn(KV{}) with KV the caches' element type, _Float16 or float: each op dispatches once
template <typename Fn>
void on_cache_type(ScalarType cache, Fn&& fn) {
  if (cache == ScalarType::Half)
    fn(_Float16{});
  else
    fn(float{});
}

// sdpa.out(Tensor query, Tensor key, Tensor value, SymInt start_pos, *, Tensor(a!) out) -> Tensor(a!)
void sdpa_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const Tensor& q = stack[0]->toTensor();
  const Tensor& k = stack[1]->toTensor();
  const Tensor& v = stack[2]->toTensor();
  const int64_t start = stack[3]->toInt();
  Tensor& out = stack[4]->toTensor();
  const ScalarType cache = k.scalar_type();
  const char* why = nullptr;
  if (!is_bshd(q, ScalarType::Float) || !is_bshd(out, ScalarType::Float))
    why = "query and output must be contiguous float32 (1, seq, heads, head_dim)";
  else if ((cache != ScalarType::Float && cache != ScalarType::Half) || !is_bshd(k, cache) || !is_bshd(v, cache))
    why = "key and value caches must be contiguous float32 or float16 (1, max_seq, kv_heads, head_dim), alike";
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
  on_cache_type(cache, [&](auto element) {
    using KV = decltype(element);
    run_sdpa(q.const_data_ptr<float>(), reinterpret_cast<const KV*>(k.const_data_ptr()),
             reinterpret_cast<const KV*>(v.const_data_ptr()), q.size(1), q.size(2), k.size(2), k.size(3), start,
             out.mutable_data_ptr<float>());
  });
}

// RoPE (rotate-half) of one head's x into y: y[i] = x[i] cos[i] - x[i + half] sin[i],
// y[i + half] = x[i + half] cos[i + half] + x[i] sin[i + half]
template <typename T>
void rope(const float* x, const float* cos, const float* sin, int64_t dim, T* y) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    y[i] = static_cast<T>(x[i] * cos[i] - x[i + half] * sin[i]);
    y[i + half] = static_cast<T>(x[i + half] * cos[i + half] + x[i] * sin[i + half]);
  }
}

// the fused projection's rows for seq tokens (seq, heads + 2 kv_heads, dim): q's heads turned into q, k's turned and
// v's copied into the caches' slots start..start + seq - 1
template <typename KV>
void place(const float* qkv, const float* cos, const float* sin, int64_t seq, int64_t heads, int64_t kv_heads,
           int64_t dim, int64_t start, float* q, KV* k, KV* v) {
  const int64_t width = (heads + 2 * kv_heads) * dim;
  for (int64_t t = 0; t < seq; ++t) {
    const float* row = qkv + t * width;
    const float *c = cos + t * dim, *s = sin + t * dim;
    for (int64_t h = 0; h < heads; ++h) rope(row + h * dim, c, s, dim, q + (t * heads + h) * dim);
    KV* k_slot = k + (start + t) * kv_heads * dim;
    KV* v_slot = v + (start + t) * kv_heads * dim;
    for (int64_t h = 0; h < kv_heads; ++h) rope(row + (heads + h) * dim, c, s, dim, k_slot + h * dim);
    const float* values = row + (heads + kv_heads) * dim;
#pragma omp simd
    for (int64_t e = 0; e < kv_heads * dim; ++e) v_slot[e] = static_cast<KV>(values[e]);
  }
}

// attention.out(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt start_pos, *,
//               Tensor(c!) out) -> Tensor(c!)
// A layer's attention after its fused q/k/v projection, in one call: RoPE on q's and k's heads (cos and sin the
// tables at the tokens' positions, (seq, head_dim)), k and v written into the caches at start_pos.., then sdpa as
// above; out (1, seq, heads * head_dim). In the graph it replaced a delegated RoPE, three slices, two casts, two
// llama::update_cache calls and torchat::sdpa (per layer, eleven calls).
void attention_out(KernelRuntimeContext& context, Span<EValue*> stack) {
  const Tensor& qkv = stack[0]->toTensor();
  const Tensor& cos = stack[1]->toTensor();
  const Tensor& sin = stack[2]->toTensor();
  Tensor& k = stack[3]->toTensor();
  Tensor& v = stack[4]->toTensor();
  const int64_t start = stack[5]->toInt();
  Tensor& out = stack[6]->toTensor();
  const ScalarType cache = k.scalar_type();
  const char* why = nullptr;
  const bool qkv_ok = qkv.dim() == 3 && qkv.size(0) == 1 && qkv.scalar_type() == ScalarType::Float &&
                      executorch::runtime::tensor_is_contiguous(qkv);
  const int64_t seq = qkv_ok ? qkv.size(1) : 0, kv_heads = k.dim() == 4 ? k.size(2) : 0;
  const int64_t dim = k.dim() == 4 ? k.size(3) : 0;
  const int64_t heads = qkv_ok && dim > 0 ? qkv.size(2) / dim - 2 * kv_heads : 0;
  if ((cache != ScalarType::Float && cache != ScalarType::Half) || !is_bshd(k, cache) || !is_bshd(v, cache) ||
      v.size(1) != k.size(1) || v.size(2) != kv_heads || v.size(3) != dim || kv_heads == 0 || dim % 2 != 0)
    why = "key and value caches must be contiguous float32 or float16 (1, max_seq, kv_heads, head_dim), alike";
  else if (!qkv_ok || qkv.size(2) % dim != 0 || heads <= 0 || heads % kv_heads != 0)
    why = "qkv must be contiguous float32 (1, seq, (heads + 2 kv_heads) * head_dim), heads a multiple of kv_heads";
  else if (cos.scalar_type() != ScalarType::Float || sin.scalar_type() != ScalarType::Float || cos.dim() != 2 ||
           sin.dim() != 2 || cos.size(0) != seq || sin.size(0) != seq || cos.size(1) != dim ||
           sin.size(1) != dim || !executorch::runtime::tensor_is_contiguous(cos) ||
           !executorch::runtime::tensor_is_contiguous(sin))
    why = "cos and sin must be contiguous float32 (seq, head_dim)";
  else if (start < 0 || start + seq > k.size(1))
    why = "start_pos + seq runs past the cache";
  else {
    const executorch::aten::SizesType sizes[] = {1, static_cast<executorch::aten::SizesType>(seq),
                                                 static_cast<executorch::aten::SizesType>(heads * dim)};
    if (executorch::runtime::resize_tensor(out, {sizes, 3}) != Error::Ok || out.scalar_type() != ScalarType::Float)
      why = "cannot resize the output to (1, seq, heads * head_dim) float32";
  }
  if (why != nullptr) {
    ET_LOG(Error, "torchat::attention.out: %s", why);
    context.fail(Error::InvalidArgument);
    return;
  }
  static thread_local std::vector<float> queries;  // the turned queries, (seq, heads, dim)
  queries.resize(static_cast<size_t>(seq * heads * dim));
  on_cache_type(cache, [&](auto element) {
    using KV = decltype(element);
    KV* keys = reinterpret_cast<KV*>(k.mutable_data_ptr());
    KV* values = reinterpret_cast<KV*>(v.mutable_data_ptr());
    place(qkv.const_data_ptr<float>(), cos.const_data_ptr<float>(), sin.const_data_ptr<float>(), seq, heads,
          kv_heads, dim, start, queries.data(), keys, values);
    run_sdpa<KV>(queries.data(), keys, values, seq, heads, kv_heads, dim, start, out.mutable_data_ptr<float>());
  });
}

const executorch::runtime::Kernel kKernels[] = {
    executorch::runtime::Kernel("torchat::sdpa.out", sdpa_out),
    executorch::runtime::Kernel("torchat::attention.out", attention_out),
};
const Error kRegistered = executorch::runtime::register_kernels({kKernels, 2});

}  // namespace
}  // namespace torchat
