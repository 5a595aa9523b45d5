// ExecuTorch kernels for torchat's quantized linears, the input quantized to int8 per block of 32 on the fly:
// torchat::linear_q4 (below) and torchat::linear_q8 (8-bit weights, see there), which share the activations'
// quantization, the fused norm, gate and residual, the tiling and the argument checks.
//
// torchat::linear_q4.out: a linear on 4-bit weights with a scale and an offset per block of 32
// (GGUF's Q4_1 grid), its input quantized to int8 per block of 32 on the fly; what torchat's 8da4w layers on the
// asymmetric grid lower to (torchat/quant/asym4.py, which also holds the layout and the op's reference in torch).
// Written by hand: XNNPACK's blockwise 4-bit GEMM has a symmetric grid (an asymmetric one cost a second, fp32 GEMM
// for the offsets' term) and on AVX2 it is bound by its arithmetic (SmolLM2 decode step, AVX2-emulated Ice Lake:
// its feed-forward GEMMs ran at ~14 GB/s of weight bytes where 24.7 were available). Here the codes (unsigned, 0..15)
// multiply the int8 activations with vpmaddubsw (or VNNI's vpdpbusd), as llama.cpp's Q4_1 x Q8_1 dot does.
//
//   y[t, n] = sum over blocks j of  scale[n, j] * a[t, j] * sum_e code[n, j, e] * q[t, j, e]  +  offset[n, j] * X[t, j]
//
// where the input block x[t, j, :] has a = max|x| / 127, q = round(x * 127 / max|x|) and X = sum(x) (exact: the
// offsets' term uses the float sums). x (..., K) float32; codes (N, Kp / 2) uint8 with Kp a multiple of 64 and
// K <= Kp (the input is zero-padded to Kp); scales and offsets (N, Kp / 32) float16; out (..., N) float32.
// Codes come in pairs of blocks, 32 bytes each: byte b holds, in its low nibble, element (b / 8) * 4 + b % 4 of
// block (b / 4) % 2 of the pair, in its high nibble element 16 more; so one 32-byte load gives both blocks' codes,
// each 4-byte lane of a vpmaddubsw/vpmaddwd sum belongs to one block, alternating, and the pair's two scales (one
// 4-byte load, widened) line up with the lanes without a shuffle. Codes, scales and offsets are tiled: rows in tiles
// of 4, a tile's rows interleaved pair by pair (slot() below, torchat.quant.asym4.tile_rows), so that each thread
// reads its rows' weights as one run of memory (and the scales and offsets as two), which the prefetch 2 KB ahead
// and the hardware's prefetchers follow: on the AVX2 EPYC (Zen 3) two threads streamed codes at 22-26 GB/s where
// four rows apart they had 12-16 (read bandwidth 29).
//
// For a transformer layer (torchat.lowering.et.KernelBlock) the op also takes the RMSNorm before it (`norm`, `eps`: x
// is normalized before it is quantized), a SiLU gate after it (`gated`: the outputs' first half gates the second,
// silu(gate) * up, so w1 and w3 run as one) and a residual added last; a decode step then makes four calls a layer.
// Tiles are split over ExecuTorch's thread pool (a prefill takes 2 tokens a tile, so each pair of blocks is unpacked
// once for both). Without the prefetch one thread read 8.4 GB/s of weights, with it 16 (AVX2-emulated Ice Lake,
// rows apart; two threads 19 -> 25, the machine's bandwidth).
//
// torchat::linear_q8.out: the same on int8 weights with one float scale per output row (8da8w's per-channel grid,
// the 8-bit head of the 8da4w presets; torchat/quant/intx.py), in the activations' byte order (64 a pair of blocks,
// position() below) so that one quantization serves both ops, tiled as linear_q4's codes (the row scales are not):
//
//   y[t, n] = scale[n] * sum over blocks j of  a[t, j] * sum_e w[n, j, e] * q[t, j, e]
//
// signed times signed: |w| times q with w's sign (vpsignb), as llama.cpp's Q8_0 dot does. XNNPACK's qd8-f32-qc8w GEMM
// ran those linears before (per-token activations), one delegate call each with the norms and gate in between.
//
// This header is the ops' arithmetic, shared by their two front ends, each compiled on its own (the functions have
// internal linkage): et_linear.cpp, the ExecuTorch kernels (a .pte; runner-et and the Python loader's library), and
// torch_linear.cpp, the same ops for torch on CPU (eager, and the .pt2 files AOT Inductor compiles, which call them
// through torch's dispatcher; runner-aoti and the Python loader's second library). torchat/kernels/__init__.py
// builds both.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TORCHAT_LINEAR_AVX2 1
#endif

namespace torchat {
namespace {

constexpr int64_t kBlock = 32;           // elements per scale
constexpr int64_t kPair = 2 * kBlock;    // elements per 32 bytes of codes
constexpr int64_t kAhead = 2048;          // bytes of codes prefetched ahead (1024: 23.2 GB/s, 2048: 25.2)
constexpr int64_t kSerialWork = 1 << 15;  // weight bytes x tokens: below this the op runs on the calling thread

// q4: linear_q4's 4-bit codes against the input quantized to int8; q8: linear_q8's int8 weights against the same;
// w4: linear_q4's codes, scales and offsets against the input quantized to 16 bits (torchat::linear_w4, int4
// weight-only: the input's error below 2^-16 of its block's largest value, where bf16 would round each value to
// 2^-9 of itself), as two byte planes that the int8 dot products take one after the other
enum class Format { q4, q8, w4 };

// One token's input as the kernels read it: per pair of blocks 64 int8 (the low nibbles' partners, then the high
// ones', in the codes' byte order), per block a = max|x| / 127 and X = sum(x). For w4 the 16-bit values
// v = round(x / a), a = max|x| / 32767, as q = v >> 8 (signed) and low = v & 255 (unsigned): v = 256 q + low.
struct Activations {
  std::vector<int8_t> q;
  std::vector<uint8_t> low;
  std::vector<float> a, sums, y;  // y: the linear's outputs where a gate combines them before `out`
};

// byte position, within its pair's 64, of element e of block parity g
inline int64_t position(int64_t g, int64_t e) {
  const int64_t half = e / 16, r = e % 16;
  return half * 32 + (r / 4) * 8 + g * 4 + r % 4;
}

#ifdef TORCHAT_LINEAR_AVX2
// the sum of v's 8 lanes
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 32 floats (zero-padded, normalized) -> 32 int8 in order, for a = max|x| / 127; the block's a and float sum
inline __m256i quantize_block(const float* x, float& a, float& sum) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], peak = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, v[i]));
    total = _mm256_add_ps(total, v[i]);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  const float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  sum = hsum(total);
  a = top / 127.f;
  const __m256 inverse = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i)  // round to nearest even, as nearbyint
    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT |
                                                                                _MM_FROUND_NO_EXC));
  // packs work within 128-bit lanes: the permute puts the 32 bytes back in order
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

// tokens [begin, end) of x (tokens, k), RMS-normalized first where `norm` (k weights) is given, as format F reads
// them (quantized, or for w4 reordered)
template <Format F>
void prepare_rows(const float* x, int64_t k, int64_t kp, const float* norm, float eps, int64_t begin, int64_t end,
                  Activations& act) {
  const int64_t blocks = kp / kBlock;
  float pair[kPair];
  for (int64_t t = begin; t < end; ++t) {
    const float* row = x + t * k;
    int8_t* q = act.q.data() + t * kp;
    float inverse_rms = 1.f;
    if (norm != nullptr) {
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t e = 0; e < k; ++e) squares += row[e] * row[e];
      inverse_rms = 1.f / std::sqrt(squares / static_cast<float>(k) + eps);
    }
    for (int64_t j = 0; j < blocks; j += 2) {  // a pair of blocks
      const int64_t start = j * kBlock, n = std::clamp<int64_t>(k - start, 0, kPair);
      std::fill(pair + n, pair + kPair, 0.f);
      if (norm != nullptr)
#pragma omp simd
        for (int64_t e = 0; e < n; ++e) pair[e] = row[start + e] * inverse_rms * norm[start + e];
      else
        std::memcpy(pair, row + start, n * sizeof(float));
      float* a = act.a.data() + t * blocks + j;
      float* sums = act.sums.data() + t * blocks + j;
      int8_t* out = q + (j / 2) * kPair;
      if constexpr (F == Format::w4) {
        uint8_t* low = act.low.data() + t * kp + (j / 2) * kPair;
        for (int64_t g = 0; g < 2; ++g) {
          const float* block = pair + g * kBlock;
          float peak = 0.f, sum = 0.f;
          for (int64_t e = 0; e < kBlock; ++e) peak = std::max(peak, std::fabs(block[e]));
          for (int64_t e = 0; e < kBlock; ++e) sum += block[e];
          const float inverse = peak > 0.f ? 32767.f / peak : 0.f;
          for (int64_t e = 0; e < kBlock; ++e) {
            const int32_t v = static_cast<int32_t>(std::nearbyint(block[e] * inverse));
            out[position(g, e)] = static_cast<int8_t>(v >> 8);
            low[position(g, e)] = static_cast<uint8_t>(v & 255);
          }
          a[g] = peak / 32767.f;
          sums[g] = sum;
        }
        continue;
      }
#ifdef TORCHAT_LINEAR_AVX2
      // each block's 16 low-nibble partners, then its 16 high ones, interleaved 4 bytes at a time (position())
      const __m256i b0 = quantize_block(pair, a[0], sums[0]), b1 = quantize_block(pair + kBlock, a[1], sums[1]);
      const __m128i l0 = _mm256_castsi256_si128(b0), l1 = _mm256_castsi256_si128(b1);
      const __m128i h0 = _mm256_extracti128_si256(b0, 1), h1 = _mm256_extracti128_si256(b1, 1);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                          _mm256_setr_m128i(_mm_unpacklo_epi32(l0, l1), _mm_unpackhi_epi32(l0, l1)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32),
                          _mm256_setr_m128i(_mm_unpacklo_epi32(h0, h1), _mm_unpackhi_epi32(h0, h1)));
#else
      for (int64_t g = 0; g < 2; ++g) {
        const float* block = pair + g * kBlock;
        float peak = 0.f, sum = 0.f;
        for (int64_t e = 0; e < kBlock; ++e) peak = std::max(peak, std::fabs(block[e]));
        for (int64_t e = 0; e < kBlock; ++e) sum += block[e];
        const float inverse = peak > 0.f ? 127.f / peak : 0.f;
        for (int64_t e = 0; e < kBlock; ++e)
          out[position(g, e)] = static_cast<int8_t>(std::nearbyint(block[e] * inverse));
        a[g] = peak / 127.f;
        sums[g] = sum;
      }
#endif
    }
  }
}

inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof(v));
  return static_cast<float>(v);
}

constexpr int64_t kTile = 4;    // rows a tile
constexpr int64_t kTokens = 2;  // tokens a tile of a prefill

// The weights of one call: linear_q4's codes (n, kp / 2) with fp16 scales and offsets (n, kp / 32) (q4, w4), or
// linear_q8's int8 weights (n, kp) with float32 row scales (n); all but the row scales tiled (slot())
struct Problem {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* offsets;
  const float* row_scales;
  int64_t n, kp, tokens;
  const Activations* act;
  float* out;             // (tokens, n)
  const float* residual;  // added to out where given, (tokens, n)
};

// where row r's pair of blocks j lies, counted in pairs (of codes, 32 or 64 bytes; of scales or offsets, 2): rows
// in tiles of kTile (the last one shorter where n does not divide), a tile's rows interleaved pair by pair, so that
// a tile's weights are one run of memory (torchat.quant.asym4.tile_rows)
inline int64_t slot(int64_t n, int64_t pairs, int64_t r, int64_t j) {
  const int64_t r0 = r - r % kTile;
  return r0 * pairs + j * std::min(kTile, n - r0) + (r - r0);
}

inline void store(const Problem& p, int64_t t, int64_t r, float value) {
  const int64_t at = t * p.n + r;
  p.out[at] = p.residual == nullptr ? value : value + p.residual[at];
}

#ifdef TORCHAT_LINEAR_AVX2
// unsigned u times signed s, 32 bytes each, added into the 8 int32 lane sums acc (4 adjacent products a lane); the
// pairs' int16 sums must not saturate: u <= 15 (4-bit codes) or u <= 128 with |s| <= 127
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// u0 · s0 + u1 · s1 (unsigned times signed, 32 bytes each) as 8 int32 lane sums (4 adjacent products a lane, of
// each side); without VNNI the two sides' int16 pair sums add before widening, so 2 * 2 * |u| * |s| must fit int16
inline __m256i dot2(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
  return dot_add(dot_add(_mm256_setzero_si256(), u0, s0), u1, s1);
#else
  const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

inline __m256i load32(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// the 8 int32 lane sums of one pair's codes (lo / hi nibbles) times its activations: 4 * 15 * 128 fits int16
inline __m256i pair_dot_q4(__m256i lo, __m256i hi, const int8_t* q) { return dot2(lo, load32(q), hi, load32(q + 32)); }

// the same for w4's low byte plane (unsigned, 0..255) against the codes (as signed: 0..15): 4 * 255 * 15 fits int16
inline __m256i pair_dot_low(__m256i lo, __m256i hi, const uint8_t* low) {
  return dot2(load32(low), lo, load32(low + 32), hi);
}

// the same for one pair of int8 weights (64 bytes in the activations' order): |w| against q signed as w
// (each side widened on its own: 2 * 128 * 127 fits int16 once, not twice)
inline __m256i pair_dot_q8(__m256i w0, __m256i w1, const int8_t* q) {
  const __m256i sum = dot_add(_mm256_setzero_si256(), _mm256_abs_epi8(w0), _mm256_sign_epi8(load32(q), w0));
  return dot_add(sum, _mm256_abs_epi8(w1), _mm256_sign_epi8(load32(q + 32), w1));
}

// R rows' two fp16 values each (a tile's scales or offsets for one pair) as floats: row i's in lanes 2i and 2i + 1
template <int R>
inline __m256 load_pairs(const uint16_t* h) {
  __m128i v = _mm_setzero_si128();
  if constexpr (R == kTile)
    v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h));
  else
    std::memcpy(&v, h, R * 2 * sizeof(uint16_t));
  return _mm256_cvtph_ps(v);
}

// a float's lane pair (2i, 2i + 1) repeated over the 8 lanes
inline __m256 lane_pair(__m256 v, int i) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i, 2 * i + 1, 2 * i,
                                                       2 * i + 1));
}

// the R rows of the tile at row r0 (R = kTile but in the last tile) for tokens [t, t + T): R x T accumulators; each
// pair's weights are loaded (and unpacked) once for the T tokens (prefill) and each token's activations loaded once
// for the R rows. The tile's weights stream as one run (slot()), its scales and offsets as two more.
template <Format F, int R, int T>
void rows_avx2(const Problem& p, int64_t r0, int64_t t) {
  const int64_t pairs = p.kp / kPair, blocks = p.kp / kBlock;
  constexpr int64_t pair_bytes = F == Format::q8 ? 64 : 32;
  const uint8_t* tile = p.codes + r0 * pairs * pair_bytes;
  const int8_t* q = p.act->q.data() + t * p.kp;
  const uint8_t* low = F == Format::w4 ? p.act->low.data() + t * p.kp : nullptr;
  const float* a = p.act->a.data() + t * blocks;
  const float* sums = p.act->sums.data() + t * blocks;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256 acc[R][T], offsets[T];  // offsets: q4's (and w4's) offsets term, row i's in lanes 2i and 2i + 1
  for (int u = 0; u < T; ++u) {
    offsets[u] = _mm256_setzero_ps();
    for (int i = 0; i < R; ++i) acc[i][u] = _mm256_setzero_ps();
  }
  for (int64_t j = 0; j < pairs; ++j) {
    const uint8_t* codes = tile + j * R * pair_bytes;
    for (int64_t line = 0; line < R * pair_bytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(codes) + kAhead + line, _MM_HINT_T0);
    // per token, a (and for q4 and w4 the float sums) of the pair's two blocks, alternating as the lanes do
    __m256 scale_a[T];
    for (int u = 0; u < T; ++u) {
      double a2;
      std::memcpy(&a2, a + u * blocks + 2 * j, sizeof(a2));
      scale_a[u] = _mm256_castpd_ps(_mm256_set1_pd(a2));
    }
    if constexpr (F != Format::q8) {
      const __m256 scales = load_pairs<R>(p.scales + (r0 * pairs + j * R) * 2);
      const __m256 offs = load_pairs<R>(p.offsets + (r0 * pairs + j * R) * 2);
      for (int u = 0; u < T; ++u) {
        double x2;
        std::memcpy(&x2, sums + u * blocks + 2 * j, sizeof(x2));
        offsets[u] = _mm256_fmadd_ps(offs, _mm256_castpd_ps(_mm256_set1_pd(x2)), offsets[u]);
      }
      for (int i = 0; i < R; ++i) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * pair_bytes));
        const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        const __m256 scale = lane_pair(scales, i);
        for (int u = 0; u < T; ++u) {
          __m256i dot = pair_dot_q4(lo, hi, q + u * p.kp + j * kPair);
          if constexpr (F == Format::w4)  // 256 q + low
            dot = _mm256_add_epi32(_mm256_slli_epi32(dot, 8), pair_dot_low(lo, hi, low + u * p.kp + j * kPair));
          acc[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scale, scale_a[u]), acc[i][u]);
        }
      }
    } else {
      for (int i = 0; i < R; ++i) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * pair_bytes));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * pair_bytes + 32));
        for (int u = 0; u < T; ++u) {
          const __m256 dot = _mm256_cvtepi32_ps(pair_dot_q8(v0, v1, q + u * p.kp + j * kPair));
          acc[i][u] = _mm256_fmadd_ps(dot, scale_a[u], acc[i][u]);
        }
      }
    }
  }
  for (int u = 0; u < T; ++u) {
    float offset[8];
    _mm256_storeu_ps(offset, offsets[u]);
    for (int i = 0; i < R; ++i) {
      if constexpr (F == Format::q8)
        store(p, t + u, r0 + i, hsum(acc[i][u]) * p.row_scales[r0 + i]);
      else
        store(p, t + u, r0 + i, hsum(acc[i][u]) + offset[2 * i] + offset[2 * i + 1]);
    }
  }
}

// the tile of R rows at r0, for every token
template <Format F, int R>
void tile_avx2(const Problem& p, int64_t r0) {
  int64_t t = 0;
  for (; t + kTokens <= p.tokens; t += kTokens) rows_avx2<F, R, kTokens>(p, r0, t);
  for (; t < p.tokens; ++t) rows_avx2<F, R, 1>(p, r0, t);
}

#else
// portable: one row for one token
template <Format F>
void row_portable(const Problem& p, int64_t r, int64_t t) {
  const int64_t blocks = p.kp / kBlock, pairs = p.kp / kPair;
  const float* sums = p.act->sums.data() + t * blocks;
  float total = 0.f;
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t g = j % 2, at_pair = slot(p.n, pairs, r, j / 2), first = t * p.kp + (j / 2) * kPair;
    int32_t dot = 0;
    for (int64_t e = 0; e < kBlock; ++e) {
      const int64_t at = position(g, e);
      int32_t w;
      if constexpr (F == Format::q8) {
        w = static_cast<int8_t>(p.codes[at_pair * kPair + at]);
      } else {
        const uint8_t byte = p.codes[at_pair * 32 + at % 32];
        w = e < 16 ? (byte & 0x0F) : (byte >> 4);
      }
      dot += w * (F == Format::w4 ? 256 * p.act->q[first + at] + p.act->low[first + at] : p.act->q[first + at]);
    }
    const float a = p.act->a[t * blocks + j];
    if constexpr (F == Format::q8)
      total += a * static_cast<float>(dot);
    else
      total += half_to_float(p.scales[at_pair * 2 + g]) * a * static_cast<float>(dot) +
               half_to_float(p.offsets[at_pair * 2 + g]) * sums[j];
  }
  store(p, t, r, F == Format::q8 ? total * p.row_scales[r] : total);
}
#endif

template <Format F>
void run_rows(const Problem& p, int64_t tile_begin, int64_t tile_end) {
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t r0 = tile * kTile, r1 = std::min(p.n, r0 + kTile);
#ifdef TORCHAT_LINEAR_AVX2
    switch (r1 - r0) {
      case 4: tile_avx2<F, 4>(p, r0); break;
      case 3: tile_avx2<F, 3>(p, r0); break;
      case 2: tile_avx2<F, 2>(p, r0); break;
      default: tile_avx2<F, 1>(p, r0); break;
    }
#else
    for (int64_t t = 0; t < p.tokens; ++t)
      for (int64_t r = r0; r < r1; ++r) row_portable<F>(p, r, t);
#endif
  }
}

// out = silu(y[:width]) * y[width:] (+ residual); exp's argument held below its overflow (-ffast-math: no infinities)
void gate(const float* y, int64_t width, float* out, const float* residual) {
#pragma omp simd
  for (int64_t c = 0; c < width; ++c) {
    const float g = y[c];
    out[c] = g / (1.f + expf(fminf(-g, 80.f))) * y[width + c];
  }
  if (residual != nullptr)
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) out[c] += residual[c];
}


// The linear itself, its arguments checked by the caller: x (tokens, k) float32, RMS-normalized first where `norm`
// (k) is given, times the weights in `p` (codes..., n and kp set) into `result` (tokens, gated ? n / 2 : n), the
// `residual` (shaped as result) added last. `parallel_for(begin, end, fn)` splits [begin, end) over the caller's
// thread pool (ExecuTorch's in et_linear.cpp, torch's intra-op threads in torch_linear.cpp), fn(b, e) a chunk.
template <Format F, class ParallelFor>
void linear(Problem p, const float* x, int64_t k, int64_t tokens, const float* norm, float eps, const float* residual,
            bool gated, float* result, const ParallelFor& parallel_for) {
  const int64_t n = p.n, kp = p.kp, blocks = kp / kBlock, width = gated ? n / 2 : n;
  static thread_local Activations buffers;  // reused: a decode step calls the ops 4 times a layer
  Activations& act = buffers;  // what the workers see (a thread_local named in a lambda would be theirs)
  act.q.resize(tokens * kp);
  act.a.resize(tokens * blocks);
  if (F == Format::w4) act.low.resize(tokens * kp);
  act.sums.resize(tokens * blocks);
  if (gated) act.y.resize(tokens * n);
  const int64_t weight_bytes = F == Format::q8 ? n * kp : n * kp / 2;
  const bool serial = weight_bytes * tokens < kSerialWork;
  const auto quantize = [&](int64_t b, int64_t e) { prepare_rows<F>(x, k, kp, norm, eps, b, e, act); };
  if (serial || tokens == 1)
    quantize(0, tokens);
  else
    parallel_for(0, tokens, quantize);
  p.tokens = tokens;
  p.act = &act;
  p.out = gated ? act.y.data() : result;
  p.residual = gated ? nullptr : residual;
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (serial)
    run_rows<F>(p, 0, tiles);
  else
    parallel_for(0, tiles, [&](int64_t b, int64_t e) { run_rows<F>(p, b, e); });
  if (gated)  // silu(gate) * up, the first half of the outputs the gate
    for (int64_t t = 0; t < tokens; ++t)
      gate(act.y.data() + t * n, width, result + t * width, residual == nullptr ? nullptr : residual + t * width);
}

}  // namespace
}  // namespace torchat
