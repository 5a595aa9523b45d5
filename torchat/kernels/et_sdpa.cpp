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
// together so that each key and value row is read once per group. One work item is (query, chunk of slots); a long
// cache with few queries (decode) is cut into chunks for the threads, each keeping a running max and sum per head
// that are merged at the end (flash-decoding).
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
#include <type_traits>
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

// The two products, written twice: portable loops, and for x86 with AVX2, FMA and F16C (every AVX2 CPU) a form in
// 8-float registers where each key and value vector is widened (fp16 -> fp32) once for up to four query heads of its
// kv head's group (a tile), a dot product's horizontal sum is shared by eight (head, slot) pairs in one transposing
// reduction, and the weighted values' accumulators stay in registers over a step of slots. GCC 12 leaves a loop that
// converts _Float16 scalar; F16C's conversion is one instruction per 8 values. One head at a time (each vector
// widened once per head, as before the tiles) a 1B-shaped decode step's attention at 8192 positions took 1.3 ms a
// layer with the cache in L3, 1.8-2.0 out of it, where the tiles and the walk in attend() take 0.8 and 1.1 (AVX2
// EPYC, 2 threads); a 512-token prefill's 27 ms, 19-22.
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

constexpr int kTile = 4;  // query heads sharing one widened key or value vector
// slots ahead of the one being read whose lines are asked for (a slot's keys or values for one kv head are 128
// bytes in fp16 at head size 64): a step's kv heads read rows 1 KB apart, which the hardware's prefetchers did not
// run ahead of (a 1B-shaped decode step's attention at 8192 positions, the cache out of cache: 1.9 ms a layer
// without, 1.0 with)
constexpr int64_t kAhead = 16;

// the cache lines of one head's row (dim elements) kAhead slots after `row_start` (rows `row` apart)
template <typename KV>
inline void prefetch_ahead(const KV* row_start, int64_t row, int64_t dim) {
  const char* at = reinterpret_cast<const char*>(row_start + kAhead * row);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(KV)); b += 64) __builtin_prefetch(at + b);
}

// Scores of H heads (queries q, dim apart) against n keys (`row` elements apart) of their kv head:
// scores[j * heads + h] = scale · q_h · k_j, the scores of a block slot-major (each slot's heads together, for the
// softmax's vectors across heads).
template <int H, typename KV>
void tile_dots(const float* q, const KV* keys, int64_t row, int64_t n, int64_t dim, float scale, float* scores,
               int64_t heads) {
  int64_t j = 0;
#ifdef TORCHAT_SDPA_AVX2
  constexpr int S = 8 / H;  // slots a step: H * S (head, slot) sums share one reduction
  if (dim % 8 == 0) {
    for (; j + S <= n; j += S) {
      __m256 acc[8];
      for (int a = 0; a < 8; ++a) acc[a] = _mm256_setzero_ps();
      for (int r = 0; r < S; ++r) prefetch_ahead(keys + (j + r) * row, row, dim);
      for (int64_t d = 0; d < dim; d += 8) {
        for (int r = 0; r < S; ++r) {
          const __m256 key = load8(keys + (j + r) * row + d);
          for (int h = 0; h < H; ++h) acc[r * H + h] = _mm256_fmadd_ps(_mm256_loadu_ps(q + h * dim + d), key, acc[r * H + h]);
        }
      }
      const __m256 sums = _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale));  // lane r * H + h
      if constexpr (H == 4) {  // a slot's four heads in one store each
        _mm_storeu_ps(scores + j * heads, _mm256_castps256_ps128(sums));
        _mm_storeu_ps(scores + (j + 1) * heads, _mm256_extractf128_ps(sums, 1));
      } else {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, sums);
        for (int r = 0; r < S; ++r)
          for (int h = 0; h < H; ++h) scores[(j + r) * heads + h] = lanes[r * H + h];
      }
    }
  }
#endif
  for (; j < n; ++j)
    for (int h = 0; h < H; ++h) {
      const KV* key = keys + j * row;
      const float* query = q + h * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += query[d] * static_cast<float>(key[d]);
      scores[j * heads + h] = dot * scale;
    }
}

// acc_h[d] += Σ_j w[j * heads + h] · v_j[d] for H heads (accumulators acc, dim apart) over n values (`row` apart)
template <int H, typename KV>
void tile_values(const float* w, int64_t heads, const KV* values, int64_t row, int64_t n, int64_t dim, float* acc) {
  int64_t d0 = 0;
#ifdef TORCHAT_SDPA_AVX2
  constexpr int C = 8 / H;  // 8-column chunks a pass: H * C accumulators in registers over the n slots
  for (; d0 + 8 * C <= dim; d0 += 8 * C) {
    __m256 sum[H][C];
    for (int h = 0; h < H; ++h)
      for (int c = 0; c < C; ++c) sum[h][c] = _mm256_loadu_ps(acc + h * dim + d0 + 8 * c);
    for (int64_t j = 0; j < n; ++j) {
      if (d0 == 0) prefetch_ahead(values + j * row, row, dim);
      __m256 value[C];
      for (int c = 0; c < C; ++c) value[c] = load8(values + j * row + d0 + 8 * c);
      for (int h = 0; h < H; ++h) {
        const __m256 wj = _mm256_broadcast_ss(w + j * heads + h);
        for (int c = 0; c < C; ++c) sum[h][c] = _mm256_fmadd_ps(wj, value[c], sum[h][c]);
      }
    }
    for (int h = 0; h < H; ++h)
      for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc + h * dim + d0 + 8 * c, sum[h][c]);
  }
#endif
  if (d0 == dim) return;
  for (int64_t j = 0; j < n; ++j) {
    const KV* value = values + j * row;
    for (int h = 0; h < H; ++h) {
      const float wj = w[j * heads + h];
      float* a = acc + h * dim;
#pragma omp simd
      for (int64_t d = d0; d < dim; ++d) a[d] += wj * static_cast<float>(value[d]);
    }
  }
}

// f.template operator()<H>(h0) for the group's heads h0.. in tiles of up to kTile
template <typename F>
void by_tiles(int64_t first, int64_t group, F&& f) {
  for (int64_t h0 = first; h0 < first + group; h0 += kTile) {
    switch (std::min<int64_t>(kTile, first + group - h0)) {
      case 1: f(std::integral_constant<int, 1>{}, h0); break;
      case 2: f(std::integral_constant<int, 2>{}, h0); break;
      case 3: f(std::integral_constant<int, 3>{}, h0); break;
      default: f(std::integral_constant<int, 4>{}, h0); break;
    }
  }
}

// Slots are walked in blocks of kBlock, and one pass does both products with a running max per head (online
// softmax); each product walks its block kStep slots at a time, every kv head of those slots (one run of memory)
// before the next ones. A kv head's slots at a time instead over the whole range (rows of 128 bytes 1 KB apart,
// eight strided passes over a long cache) ran at 7 GB/s of an fp16 cache on the AVX2 EPYC, half of a 1B-shaped
// decode step at 8192 positions.
constexpr int64_t kBlock = 32;
constexpr int64_t kStep = 8;

// a softmax weight e^x for x <= 0; below e^-80 it is 0: exp would return a denormal, and denormal arithmetic in the
// weighted sum is ~100x slower (peaky attention underflows most weights); 0 is what a float sum makes of them anyway
inline float weight(float x) { return x < -80.f ? 0.f : std::exp(x); }

// Query `i`'s heads over slots [lo, hi): per head its max score, sum of exp(score - max) and the unnormalized
// weighted values (dim floats each), block by block: a block's scores, then each head's running max raised to the
// block's (what it had summed scaled down by e^(old - new)), then the block's weights times its values.
template <typename KV>
void attend(const Problem<KV>& p, int64_t i, int64_t lo, int64_t hi, float* max_out, float* sum_out, float* acc) {
  const int64_t dim = p.dim, row = p.kv_heads * dim, group = p.heads / p.kv_heads, heads = p.heads;
  const float* q = p.q + i * heads * dim;
  std::fill(max_out, max_out + heads, kLowest);
  std::fill(sum_out, sum_out + heads, 0.f);
  std::fill(acc, acc + heads * dim, 0.f);
  static thread_local std::vector<float> scores, peaks;  // a block's (kBlock, heads) scores; its per-head maxima
  scores.resize(static_cast<size_t>(kBlock * heads));
  peaks.resize(static_cast<size_t>(heads));
  float* s = scores.data();
  float* peak = peaks.data();
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - b0);
    for (int64_t j0 = 0; j0 < n; j0 += kStep)
      for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh)
        by_tiles(kvh * group, group, [&](auto tile, int64_t h0) {
          tile_dots<decltype(tile)::value>(q + h0 * dim, p.k + (b0 + j0) * row + kvh * dim, row,
                                           std::min(kStep, n - j0), dim, p.scale, s + j0 * heads + h0, heads);
        });
    std::copy(max_out, max_out + heads, peak);
    for (int64_t j = 0; j < n; ++j)
#pragma omp simd
      for (int64_t h = 0; h < heads; ++h) peak[h] = std::max(peak[h], s[j * heads + h]);
    for (int64_t h = 0; h < heads; ++h)
      if (peak[h] > max_out[h]) {  // what the earlier blocks summed, scaled to the new max
        const float shrink = weight(max_out[h] - peak[h]);
        sum_out[h] *= shrink;
        float* a = acc + h * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) a[d] *= shrink;
        max_out[h] = peak[h];
      }
    for (int64_t j = 0; j < n; ++j)
#pragma omp simd
      for (int64_t h = 0; h < heads; ++h) {
        const float w = weight(s[j * heads + h] - peak[h]);
        s[j * heads + h] = w;
        sum_out[h] += w;
      }
    for (int64_t j0 = 0; j0 < n; j0 += kStep)
      for (int64_t kvh = 0; kvh < p.kv_heads; ++kvh)
        by_tiles(kvh * group, group, [&](auto tile, int64_t h0) {
          tile_values<decltype(tile)::value>(s + j0 * heads + h0, heads, p.v + (b0 + j0) * row + kvh * dim, row,
                                             std::min(kStep, n - j0), dim, acc + h0 * dim);
        });
  }
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
        const float w = weight(part[h] - peak);
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
