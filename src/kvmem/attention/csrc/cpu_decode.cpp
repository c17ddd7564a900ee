// Attention on the CPU, straight from the KV cache, one query row at a time: each row has its own
// block table (paged: many blocks; virtual/static: one block that is the sequence's whole slot) and
// its own length. A decode row is a sequence's new token; the rows of a prompt chunk are queries
// whose lengths are their positions + 1, which is the causal mask, and their cached prefix is read
// where it lies. Nothing is gathered or copied, and no key past a row's length is touched, so a
// virtual slot's unmapped tail is never read.
//
// Work item = (row, KV head): the query heads of a GQA group share every key row they read.
// Scores and softmax in float32; values accumulated in float32; one cast at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_avx512.h"


namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// One row of D elements to float32. bfloat16 is the top half of a float32, so widening is a shift;
// written on raw bits so the compiler vectorizes it (c10's scalar conversion does not).
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = to_float(src[d]);
}
template <>
inline void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// A dot product of two float rows. With DIM known, 16 lane-wise partial sums (one vector register)
// and a tree at the end: a serial reduction of each dot product to one float cost more than its FMAs.
template <int DIM>
inline float dot(const float* a, const float* b, int64_t dim) {
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    float part[16] = {};
    for (int64_t d = 0; d < DIM; d += 16)
#pragma omp simd
      for (int l = 0; l < 16; ++l) part[l] += a[d + l] * b[d + l];
    for (int w = 8; w > 0; w /= 2)
#pragma omp simd
      for (int l = 0; l < w; ++l) part[l] += part[l + w];
    return part[0];
  } else {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < dim; ++d) s += a[d] * b[d];
    return s;
  }
}

// DIM > 0: the head dimension known at compile time (64 and 128 are common), so the per-row loops
// unroll into a few full vectors; DIM == 0: any head dimension, read from `dim`.
template <typename T, int DIM>
void decode(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
            int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t block_size,
            int64_t table_width, int64_t q_seq_stride, int64_t q_head_stride, int64_t cache_head_stride,
            int64_t cache_block_stride, int64_t cache_token_stride, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  if (DIM > 0) dim = DIM;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores, row(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t* table = tables + seq * table_width;
      for (int64_t g = 0; g < group; ++g) {
        const T* qh = q + seq * q_seq_stride + (kvh * group + g) * q_head_stride;
        for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = to_float(qh[d]) * scale;
      }
      scores.assign(group * len, 0.f);
      // Pass 1: scores, block by block.
      for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = std::min(block_size, len - start);
        const T* kb = k_cache + kvh * cache_head_stride + table[start / block_size] * cache_block_stride;
        for (int64_t i = 0; i < n; ++i) {
          const T* kr = kb + i * cache_token_stride;
          widen(kr, row.data(), DIM > 0 ? DIM : dim);
          for (int64_t g = 0; g < group; ++g) scores[g * len + start + i] = dot<DIM>(qf.data() + g * dim, row.data(), dim);
        }
      }
      // Softmax per query head.
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        // Vectorized (built with -fno-math-errno, so expf becomes glibc's vector expf): the exps
        // were most of the kernel's time when computed one by one.
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sg[t] = std::exp(sg[t] - m);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; ++t) total += sg[t];
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      // Pass 2: probabilities times values, one query head at a time so that its accumulator stays
      // in registers (storing it back after every token was the kernel's hottest instruction).
      for (int64_t g = 0; g < group; ++g) {
        const float* pg = scores.data() + g * len;
        float* ag = acc.data() + g * dim;
        // With DIM known the accumulator is a local array the compiler keeps in registers.
        constexpr int64_t kLocal = DIM > 0 ? DIM : 1;
        float local[kLocal] = {};
        float* a = DIM > 0 ? local : ag;
        const int64_t n_dim = DIM > 0 ? DIM : dim;
        std::fill(a, a + n_dim, 0.f);
        for (int64_t start = 0; start < len; start += block_size) {
          const int64_t n = std::min(block_size, len - start);
          const T* vb = v_cache + kvh * cache_head_stride + table[start / block_size] * cache_block_stride;
          for (int64_t i = 0; i < n; ++i) {
            widen(vb + i * cache_token_stride, row.data(), n_dim);
            const float p = pg[start + i];
#pragma omp simd
            for (int64_t d = 0; d < n_dim; ++d) a[d] += p * row[d];
          }
        }
        if (DIM > 0) std::copy(a, a + n_dim, ag);
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + seq * num_heads * dim + (kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[g * dim + d]);
      }
    }
  });
}


#if KVMEM_HAVE_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 path for head dimensions 64 and 128, float32 and (with AVX512-BF16) bfloat16 caches.
//
// The generic loops above spend their time on the two things a row-major cache makes awkward:
// reducing every q.k dot product across one vector's lanes, and widening each bfloat16 row through
// a buffer. Here scores come 16 tokens at a time: each token's dot product is left as 16 lane-wise
// partial sums (bfloat16: `vdpbf16ps` multiplies and adds pairs straight from the cache row), and
// one transposing tree turns 16 such vectors into a vector of 16 scores (45 instructions for 16
// tokens instead of ~8 per token). Values are widened in registers (a bfloat16 pair is one 32-bit
// lane: a shift gives the even element, a mask the odd one) and accumulated for a tile of query
// heads at once, so each value row is loaded once per tile.
// ---------------------------------------------------------------------------------------------

// out[i] = sum of the 16 lanes of v[i], for i in 0..15.
inline __m512 sum_lanes_16(__m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i, v2i+1, v2i, v2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: [v4i .. v4i+3]
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: [v8i..+3 (half), v8i..+3 (half), v8i+4..+7, v8i+4..+7]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// How one cache row enters registers, per element type. NV = DIM / 16 float vectors per row.
template <typename T, int DIM>
struct RowOps;

template <int DIM>
struct RowOps<float, DIM> {
  static constexpr int NV = DIM / 16;
  using Query = __m512;  // the query row, NV vectors
  static void load_query(const float* q, Query (&out)[NV]) {
    for (int c = 0; c < NV; ++c) out[c] = _mm512_loadu_ps(q + 16 * c);
  }
  static __m512 dot_partial(const Query (&q)[NV], const float* row) {
    __m512 s = _mm512_mul_ps(q[0], _mm512_loadu_ps(row));
    for (int c = 1; c < NV; ++c) s = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(row + 16 * c), s);
    return s;
  }
  // A row is read as 64-byte pieces of kPiece elements, each widened to kPieceVectors vectors.
  static constexpr int kPiece = 16, kPieceVectors = 1;
  static void widen_piece(const float* piece, __m512 (&out)[kPieceVectors]) { out[0] = _mm512_loadu_ps(piece); }
  // Where lane j of a piece's widened vector v lives within the piece.
  static int element(int v, int j) { return j; }
};

#if defined(__AVX512BF16__)
template <int DIM>
struct RowOps<c10::BFloat16, DIM> {
  static constexpr int NV = DIM / 16;
  using Query = __m512bh;  // NV / 2 vectors of 32 bfloat16
  static void load_query(const c10::BFloat16* q, Query (&out)[NV]) {
    for (int c = 0; c < NV / 2; ++c) out[c] = (__m512bh)_mm512_loadu_si512(q + 32 * c);
  }
  static __m512 dot_partial(const Query (&q)[NV], const c10::BFloat16* row) {
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < NV / 2; ++c) s = _mm512_dpbf16_ps(s, q[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
    return s;
  }
  // A piece of 32 elements widens to its even elements (vector 0) and its odd ones (vector 1).
  static constexpr int kPiece = 32, kPieceVectors = 2;
  static void widen_piece(const c10::BFloat16* piece, __m512 (&out)[kPieceVectors]) {
    const __m512i x = _mm512_loadu_si512(piece);
    out[0] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    out[1] = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static int element(int v, int j) { return 2 * j + v; }
};
#define KVMEM_AVX512_BF16 1
#endif

// The first n of 16 lanes (none for n <= 0).
inline __mmask16 live_lanes(int64_t n) {
  return n >= 16 ? 0xFFFF : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// In place over s[0, padded): s[t] = e^(s[t] - max) for t < len, 0 beyond; returns their sum.
inline float softmax_numerators(float* s, int64_t len, int64_t padded) {
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < padded; t += 16) {
    const __mmask16 live = live_lanes(len - t);
    m = _mm512_mask_max_ps(m, live, m, _mm512_loadu_ps(s + t));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < padded; t += 16) {
    const __mmask16 live = live_lanes(len - t);
    const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), top)));
    _mm512_storeu_ps(s + t, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// Probabilities times values for query heads [g0, g0 + GT) of one work item; writes unnormalized
// sums to acc (GT x DIM floats, in row order). Each value row is loaded once for the whole tile.
template <typename T, int DIM, int GT>
void accumulate_values(const T* v_cache, const int64_t* rows, int64_t len, const float* probs, int64_t probs_stride,
                       float* acc) {
  using Ops = RowOps<T, DIM>;
  constexpr int W = Ops::kPieceVectors, P = DIM / Ops::kPiece;  // vectors per piece, pieces per row
  __m512 sum[GT][P][W];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) sum[g][c][w] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const T* row = v_cache + rows[t];
    __m512 x[P][W];
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) Ops::widen_piece(row + c * Ops::kPiece, x[c]);
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * probs_stride + t]);
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
        for (int w = 0; w < W; ++w) sum[g][c][w] = _mm512_fmadd_ps(p, x[c][w], sum[g][c][w]);
    }
  }
  // Fully unrolled like the loops above: indexing `sum` with a run-time value would force the whole
  // array into memory, and every FMA above would store its result back to the stack.
  alignas(64) float lanes[16];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) {
        _mm512_store_ps(lanes, sum[g][c][w]);
        for (int j = 0; j < 16; ++j) acc[g * DIM + c * Ops::kPiece + Ops::element(w, j)] = lanes[j];
      }
}

#if defined(KVMEM_AVX512_BF16)
// Probabilities times bfloat16 values, two tokens per instruction: vdpbf16ps multiplies a pair of
// (value, probability) and adds both products into one float32 lane. The rows of tokens t and t+1
// are interleaved element by element (vpunpck{l,h}wd) and their probabilities are one 32-bit
// broadcast of the bfloat16 pair. `probs` is bfloat16, in token order, zero past len (so an odd
// last token pairs with itself at probability 0); like flash attention's bf16 P.V, the
// probabilities are rounded to bfloat16, and the caller normalizes by the sum of the rounded ones.
template <int DIM, int GT>
void accumulate_value_pairs(const c10::BFloat16* v_cache, const int64_t* rows, int64_t len, const uint16_t* probs,
                            int64_t probs_stride, float* acc) {
  constexpr int P = DIM / 32;  // 64-byte pieces per row
  __m512 sum[GT][P][2];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) sum[g][c][0] = sum[g][c][1] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; t += 2) {
    const c10::BFloat16* r0 = v_cache + rows[t];
    const c10::BFloat16* r1 = v_cache + rows[t + 1 < len ? t + 1 : t];
    __m512i lo[P], hi[P];
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) {
      const __m512i a = _mm512_loadu_si512(r0 + 32 * c), b = _mm512_loadu_si512(r1 + 32 * c);
      lo[c] = _mm512_unpacklo_epi16(a, b);
      hi[c] = _mm512_unpackhi_epi16(a, b);
    }
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g) {
      uint32_t pair;
      std::memcpy(&pair, probs + g * probs_stride + t, 4);
      const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c) {
        sum[g][c][0] = _mm512_dpbf16_ps(sum[g][c][0], (__m512bh)lo[c], p);
        sum[g][c][1] = _mm512_dpbf16_ps(sum[g][c][1], (__m512bh)hi[c], p);
      }
    }
  }
  // Lane L of the low (w = 0) or high (w = 1) sum of piece c is element 32c + 8(L/4) + 4w + L%4.
  alignas(64) float lanes[16];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < 2; ++w) {
        _mm512_store_ps(lanes, sum[g][c][w]);
        for (int L = 0; L < 16; ++L) acc[g * DIM + 32 * c + 8 * (L / 4) + 4 * w + L % 4] = lanes[L];
      }
}

// Scores s[0, padded) (padded a multiple of 32, zero past the live ones) to bfloat16 in order;
// returns the sum of the rounded values.
inline float round_probabilities(const float* s, uint16_t* out, int64_t padded) {
  __m512 total = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t t = 0; t < padded; t += 32) {
    const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + t + 16), _mm512_loadu_ps(s + t));
    _mm512_storeu_si512(out + t, b);
    total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
    total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_and_si512(b, high)));
  }
  return _mm512_reduce_add_ps(total);
}
#endif

template <typename T, int DIM>
void decode_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                   int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t table_width,
                   int64_t q_seq_stride, int64_t q_head_stride, int64_t cache_head_stride, int64_t cache_block_stride,
                   int64_t cache_token_stride, float scale) {
  using Ops = RowOps<T, DIM>;
  constexpr int NV = Ops::NV;
  // Query heads whose values accumulate together: their sums must fit in registers with a row.
  constexpr int kMaxTile = DIM == 64 ? 4 : 2;
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rows;  // element offset of each token's row, for this item's KV head
    std::vector<float> scores, acc(group * DIM), totals(group);
    std::vector<uint16_t> probs16;  // bfloat16 probabilities (the bfloat16 value path)
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[seq], padded = (len + 31) / 32 * 32;
      const int64_t* table = tables + seq * table_width;
      rows.resize(padded);
      for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
        const int64_t base = kvh * cache_head_stride + table[b] * cache_block_stride;
        for (int64_t t = start, end_t = std::min(len, start + block_size); t < end_t; ++t)
          rows[t] = base + (t - start) * cache_token_stride;
      }
      scores.resize(group * padded);
      // Scores, 16 tokens at a time.
      for (int64_t g = 0; g < group; ++g) {
        typename Ops::Query qv[NV];
        Ops::load_query(q + seq * q_seq_stride + (kvh * group + g) * q_head_stride, qv);
        float* sg = scores.data() + g * padded;
        for (int64_t start = 0; start < len; start += 16) {
          const int64_t n = std::min<int64_t>(16, len - start);
          __m512 part[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i)
            part[i] = i < n ? Ops::dot_partial(qv, k_cache + rows[start + i]) : _mm512_setzero_ps();
          _mm512_storeu_ps(sg + start, _mm512_mul_ps(sum_lanes_16(part), _mm512_set1_ps(scale)));
        }
        totals[g] = softmax_numerators(sg, len, padded);  // the division by the sum is applied to the output
      }
      bool accumulated = false;
#if defined(KVMEM_AVX512_BF16)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        probs16.resize(group * padded);
        for (int64_t g = 0; g < group; ++g)
          totals[g] = round_probabilities(scores.data() + g * padded, probs16.data() + g * padded, padded);
        for (int64_t g0 = 0; g0 < group; g0 += kMaxTile) {
          const uint16_t* p = probs16.data() + g0 * padded;
          float* a = acc.data() + g0 * DIM;
          switch (std::min<int64_t>(kMaxTile, group - g0)) {
            case 1: accumulate_value_pairs<DIM, 1>(v_cache, rows.data(), len, p, padded, a); break;
            case 2: accumulate_value_pairs<DIM, 2>(v_cache, rows.data(), len, p, padded, a); break;
            case 3: accumulate_value_pairs<DIM, 3>(v_cache, rows.data(), len, p, padded, a); break;
            default: accumulate_value_pairs<DIM, kMaxTile>(v_cache, rows.data(), len, p, padded, a); break;
          }
        }
        accumulated = true;
      }
#endif
      for (int64_t g0 = 0; g0 < group && !accumulated; g0 += kMaxTile) {
        const float* p = scores.data() + g0 * padded;
        float* a = acc.data() + g0 * DIM;
        switch (std::min<int64_t>(kMaxTile, group - g0)) {
          case 1: accumulate_values<T, DIM, 1>(v_cache, rows.data(), len, p, padded, a); break;
          case 2: accumulate_values<T, DIM, 2>(v_cache, rows.data(), len, p, padded, a); break;
          case 3: accumulate_values<T, DIM, 3>(v_cache, rows.data(), len, p, padded, a); break;
          default: accumulate_values<T, DIM, kMaxTile>(v_cache, rows.data(), len, p, padded, a); break;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / totals[g];
        T* o = out + seq * num_heads * DIM + (kvh * group + g) * DIM;
        for (int64_t d = 0; d < DIM; ++d) o[d] = static_cast<T>(acc[g * DIM + d] * inv);
      }
    }
  });
}
#endif  // KVMEM_HAVE_AVX512

// The AVX-512 kernel where it applies (returns false otherwise).
template <typename T>
bool try_decode_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                       int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size, int64_t table_width,
                       int64_t q_seq_stride, int64_t q_head_stride, int64_t cache_head_stride,
                       int64_t cache_block_stride, int64_t cache_token_stride, float scale) {
#if KVMEM_HAVE_AVX512
  constexpr bool supported = std::is_same_v<T, float>
#if defined(KVMEM_AVX512_BF16)
                             || std::is_same_v<T, c10::BFloat16>
#endif
      ;
  if constexpr (supported) {
    if (D == 64 || D == 128) {
      auto run = D == 64 ? decode_avx512<T, 64> : decode_avx512<T, 128>;
      run(q, k_cache, v_cache, tables, lens, out, B, H, KVH, block_size, table_width, q_seq_stride, q_head_stride,
          cache_head_stride, cache_block_stride, cache_token_stride, scale);
      return true;
    }
  }
#endif
  return false;
}

// ---------------------------------------------------------------------------------------------
// Cascade (shared-prefix) attention. Rows whose contexts start with the same KV (paged: the same
// physical blocks at the start of their tables; virtual: the same shared pages) form a group with a
// shared prefix of P tokens (P a multiple of 32, at most every member's length). A work item is a
// few rows of one group and one KV head: the prefix's keys and values are read once per 16-token
// (keys) or 64-token (values) tile for all those rows' query heads, from L1, instead of once per
// row from L2 or memory; each row's own tokens [P, len) follow as in decode_avx512.
//
// Batch invariance, bit for bit: every (query, key) score is the same dot_partial + sum_lanes_16
// over the same 16-token tiles (they start at multiples of 16 in both kernels), each row's softmax
// runs over its whole context exactly as decode_avx512's, and each output lane accumulates
// p * v over tokens 0, 1, ..., len - 1 in order with the same instructions: the accumulators are
// stored to float32 between spans and loaded back unchanged, and the bfloat16 path's token pairs
// (t, t + 1) start at even t in every span. So a row's result does not depend on whether, or with
// whom, it was grouped; the tests compare cascade_attention with decode_attention bit for bit.
// Everything else (no AVX-512, other head dimensions, float16) goes to decode_attention's loops.
// ---------------------------------------------------------------------------------------------
#if KVMEM_HAVE_AVX512
// accumulate_values over tokens [t0, t1) for GT query heads that may belong to different rows:
// head j's probabilities are probs[j][t], its sums acc[j][0, DIM) in row order. resume: the sums
// continue from acc (left there by a span over earlier tokens) instead of starting at zero.
template <typename T, int DIM, int GT>
void accumulate_values_span(const T* v_cache, const int64_t* rows, int64_t t0, int64_t t1, const float* const* probs,
                            float* const* acc, bool resume) {
  using Ops = RowOps<T, DIM>;
  constexpr int W = Ops::kPieceVectors, P = DIM / Ops::kPiece;
  __m512 sum[GT][P][W];
  alignas(64) float lanes[16];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) {
        if (resume) {
          for (int j = 0; j < 16; ++j) lanes[j] = acc[g][c * Ops::kPiece + Ops::element(w, j)];
          sum[g][c][w] = _mm512_load_ps(lanes);
        } else {
          sum[g][c][w] = _mm512_setzero_ps();
        }
      }
  for (int64_t t = t0; t < t1; ++t) {
    const T* row = v_cache + rows[t];
    __m512 x[P][W];
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) Ops::widen_piece(row + c * Ops::kPiece, x[c]);
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g][t]);
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
        for (int w = 0; w < W; ++w) sum[g][c][w] = _mm512_fmadd_ps(p, x[c][w], sum[g][c][w]);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < W; ++w) {
        _mm512_store_ps(lanes, sum[g][c][w]);
        for (int j = 0; j < 16; ++j) acc[g][c * Ops::kPiece + Ops::element(w, j)] = lanes[j];
      }
}

#if defined(KVMEM_AVX512_BF16)
// accumulate_value_pairs over tokens [t0, t1) (t0 even) for GT heads of possibly different rows;
// probs[j] bfloat16 in token order, zero past the row's length; resume as above.
template <int DIM, int GT>
void accumulate_value_pairs_span(const c10::BFloat16* v_cache, const int64_t* rows, int64_t t0, int64_t t1,
                                 const uint16_t* const* probs, float* const* acc, bool resume) {
  constexpr int P = DIM / 32;
  __m512 sum[GT][P][2];
  alignas(64) float lanes[16];
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < 2; ++w) {
        if (resume) {
          for (int L = 0; L < 16; ++L) lanes[L] = acc[g][32 * c + 8 * (L / 4) + 4 * w + L % 4];
          sum[g][c][w] = _mm512_load_ps(lanes);
        } else {
          sum[g][c][w] = _mm512_setzero_ps();
        }
      }
  for (int64_t t = t0; t < t1; t += 2) {
    const c10::BFloat16* r0 = v_cache + rows[t];
    const c10::BFloat16* r1 = v_cache + rows[t + 1 < t1 ? t + 1 : t];
    __m512i lo[P], hi[P];
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c) {
      const __m512i a = _mm512_loadu_si512(r0 + 32 * c), b = _mm512_loadu_si512(r1 + 32 * c);
      lo[c] = _mm512_unpacklo_epi16(a, b);
      hi[c] = _mm512_unpackhi_epi16(a, b);
    }
#pragma GCC unroll 8
    for (int g = 0; g < GT; ++g) {
      uint32_t pair;
      std::memcpy(&pair, probs[g] + t, 4);
      const __m512bh p = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 8
      for (int c = 0; c < P; ++c) {
        sum[g][c][0] = _mm512_dpbf16_ps(sum[g][c][0], (__m512bh)lo[c], p);
        sum[g][c][1] = _mm512_dpbf16_ps(sum[g][c][1], (__m512bh)hi[c], p);
      }
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < GT; ++g)
#pragma GCC unroll 8
    for (int c = 0; c < P; ++c)
#pragma GCC unroll 2
      for (int w = 0; w < 2; ++w) {
        _mm512_store_ps(lanes, sum[g][c][w]);
        for (int L = 0; L < 16; ++L) acc[g][32 * c + 8 * (L / 4) + 4 * w + L % 4] = lanes[L];
      }
}
#endif

// One span of values for up to kMaxTile heads at once (n heads: the first n of probs / acc).
template <typename T, int DIM, int kMaxTile, typename Prob>
void value_span(const T* v_cache, const int64_t* rows, int64_t t0, int64_t t1, const Prob* const* probs,
                float* const* acc, int64_t n, bool resume) {
#if defined(KVMEM_AVX512_BF16)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    switch (n) {
      case 1: accumulate_value_pairs_span<DIM, 1>(v_cache, rows, t0, t1, probs, acc, resume); return;
      case 2: accumulate_value_pairs_span<DIM, 2>(v_cache, rows, t0, t1, probs, acc, resume); return;
      case 3: accumulate_value_pairs_span<DIM, 3>(v_cache, rows, t0, t1, probs, acc, resume); return;
      default: accumulate_value_pairs_span<DIM, kMaxTile>(v_cache, rows, t0, t1, probs, acc, resume); return;
    }
  }
#endif
  if constexpr (std::is_same_v<Prob, float>) {
    switch (n) {
      case 1: accumulate_values_span<T, DIM, 1>(v_cache, rows, t0, t1, probs, acc, resume); return;
      case 2: accumulate_values_span<T, DIM, 2>(v_cache, rows, t0, t1, probs, acc, resume); return;
      case 3: accumulate_values_span<T, DIM, 3>(v_cache, rows, t0, t1, probs, acc, resume); return;
      default: accumulate_values_span<T, DIM, kMaxTile>(v_cache, rows, t0, t1, probs, acc, resume); return;
    }
  }
}

// A work item's rows: rows[i] of the batch, the first `prefix` tokens read through rows[0]'s table.
struct CascadeUnit {
  int64_t first, count;  // into the flat list of unit rows
  int64_t prefix;
};

template <typename T, int DIM>
void cascade_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens, T* out,
                    int64_t num_heads, int64_t num_kv_heads, int64_t block_size, int64_t table_width,
                    int64_t q_seq_stride, int64_t q_head_stride, int64_t cache_head_stride,
                    int64_t cache_block_stride, int64_t cache_token_stride, float scale,
                    const std::vector<CascadeUnit>& units, const std::vector<int64_t>& unit_rows) {
  using Ops = RowOps<T, DIM>;
  constexpr int NV = Ops::NV;
  constexpr int kMaxTile = DIM == 64 ? 4 : 2;
  constexpr int64_t kValueTile = 64;  // prefix tokens whose values stay in L1 while every head takes them
#if defined(KVMEM_AVX512_BF16)
  using Prob = std::conditional_t<std::is_same_v<T, c10::BFloat16>, uint16_t, float>;
#else
  using Prob = float;
#endif
  const int64_t group = num_heads / num_kv_heads;
  const int64_t num_units = static_cast<int64_t>(units.size());
  at::parallel_for(0, num_units * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> prefix_rows, rows, row_base, score_base;
    std::vector<float> scores, acc, totals;
    std::vector<uint16_t> probs16;
    std::vector<const Prob*> head_probs;
    std::vector<float*> head_acc;
    for (int64_t item = begin; item < end; ++item) {
      const CascadeUnit& u = units[item / num_kv_heads];
      const int64_t kvh = item % num_kv_heads, P = u.prefix, n_rows = u.count;
      const int64_t* members = unit_rows.data() + u.first;
      auto offsets = [&](const int64_t* table, int64_t t0, int64_t t1, int64_t* dst) {
        for (int64_t b = t0 / block_size; b * block_size < t1; ++b) {
          const int64_t base = kvh * cache_head_stride + table[b] * cache_block_stride;
          for (int64_t t = std::max(t0, b * block_size), e = std::min(t1, (b + 1) * block_size); t < e; ++t)
            dst[t] = base + (t - b * block_size) * cache_token_stride;
        }
      };
      prefix_rows.resize(P);
      if (P > 0) offsets(tables + members[0] * table_width, 0, P, prefix_rows.data());
      row_base.resize(n_rows + 1);
      score_base.resize(n_rows + 1);
      row_base[0] = score_base[0] = 0;
      for (int64_t i = 0; i < n_rows; ++i) {
        const int64_t padded = (lens[members[i]] + 31) / 32 * 32;
        row_base[i + 1] = row_base[i] + padded;
        score_base[i + 1] = score_base[i] + group * padded;
      }
      rows.resize(row_base[n_rows]);
      scores.resize(score_base[n_rows]);
      acc.resize(n_rows * group * DIM);
      totals.resize(n_rows * group);
      for (int64_t i = 0; i < n_rows; ++i)
        offsets(tables + members[i] * table_width, P, lens[members[i]], rows.data() + row_base[i]);
      auto query = [&](int64_t i, int64_t g) { return q + members[i] * q_seq_stride + (kvh * group + g) * q_head_stride; };
      // Scores of the shared prefix: each 16-key tile once, for every query head of every row.
      for (int64_t start = 0; start < P; start += 16) {
        for (int64_t i = 0; i < n_rows; ++i) {
          const int64_t padded = row_base[i + 1] - row_base[i];
          for (int64_t g = 0; g < group; ++g) {
            typename Ops::Query qv[NV];
            Ops::load_query(query(i, g), qv);
            __m512 part[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; ++j) part[j] = Ops::dot_partial(qv, k_cache + prefix_rows[start + j]);
            _mm512_storeu_ps(scores.data() + score_base[i] + g * padded + start,
                             _mm512_mul_ps(sum_lanes_16(part), _mm512_set1_ps(scale)));
          }
        }
      }
      // Each row's own tokens, then its softmax over the whole context.
      for (int64_t i = 0; i < n_rows; ++i) {
        const int64_t len = lens[members[i]], padded = row_base[i + 1] - row_base[i];
        const int64_t* own = rows.data() + row_base[i];
        for (int64_t g = 0; g < group; ++g) {
          typename Ops::Query qv[NV];
          Ops::load_query(query(i, g), qv);
          float* sg = scores.data() + score_base[i] + g * padded;
          for (int64_t start = P; start < len; start += 16) {
            const int64_t n = std::min<int64_t>(16, len - start);
            __m512 part[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; ++j) part[j] = j < n ? Ops::dot_partial(qv, k_cache + own[start + j]) : _mm512_setzero_ps();
            _mm512_storeu_ps(sg + start, _mm512_mul_ps(sum_lanes_16(part), _mm512_set1_ps(scale)));
          }
          totals[i * group + g] = softmax_numerators(sg, len, padded);
        }
      }
      // The probabilities the values are weighed by, one pointer per (row, query head).
      head_probs.resize(n_rows * group);
      head_acc.resize(n_rows * group);
#if defined(KVMEM_AVX512_BF16)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        probs16.resize(score_base[n_rows]);
        for (int64_t i = 0; i < n_rows; ++i) {
          const int64_t padded = row_base[i + 1] - row_base[i];
          for (int64_t g = 0; g < group; ++g) {
            const int64_t at = score_base[i] + g * padded;
            totals[i * group + g] = round_probabilities(scores.data() + at, probs16.data() + at, padded);
            head_probs[i * group + g] = reinterpret_cast<const Prob*>(probs16.data() + at);
          }
        }
      } else
#endif
      {
        for (int64_t i = 0; i < n_rows; ++i)
          for (int64_t g = 0; g < group; ++g)
            head_probs[i * group + g] =
                reinterpret_cast<const Prob*>(scores.data() + score_base[i] + g * (row_base[i + 1] - row_base[i]));
      }
      for (int64_t h = 0; h < n_rows * group; ++h) head_acc[h] = acc.data() + h * DIM;
      // Values of the shared prefix: a tile of tokens at a time for all heads (every head's sums
      // go on from the last tile's), then each row's own tokens.
      const int64_t heads = n_rows * group;
      for (int64_t t0 = 0; t0 < P; t0 += kValueTile) {
        const int64_t t1 = std::min(P, t0 + kValueTile);
        for (int64_t h0 = 0; h0 < heads; h0 += kMaxTile)
          value_span<T, DIM, kMaxTile, Prob>(v_cache, prefix_rows.data(), t0, t1, head_probs.data() + h0,
                                             head_acc.data() + h0, std::min<int64_t>(kMaxTile, heads - h0), t0 > 0);
      }
      for (int64_t i = 0; i < n_rows; ++i) {
        const int64_t len = lens[members[i]];
        for (int64_t g0 = 0; g0 < group; g0 += kMaxTile)
          value_span<T, DIM, kMaxTile, Prob>(v_cache, rows.data() + row_base[i], P, len,
                                             head_probs.data() + i * group + g0, head_acc.data() + i * group + g0,
                                             std::min<int64_t>(kMaxTile, group - g0), P > 0);
      }
      for (int64_t i = 0; i < n_rows; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const float inv = 1.f / totals[i * group + g];
          const float* a = acc.data() + (i * group + g) * DIM;
          T* o = out + members[i] * num_heads * DIM + (kvh * group + g) * DIM;
          for (int64_t d = 0; d < DIM; ++d) o[d] = static_cast<T>(a[d] * inv);
        }
    }
  });
}
#endif  // KVMEM_HAVE_AVX512

// Rows per cascade work item: enough to reuse each prefix tile many times, few enough that a
// group of 128 rows still makes work for every thread.
constexpr int64_t kCascadeRowsPerUnit = 8;

// cascade_avx512 where it applies (returns false otherwise). groups: rows group_rows[starts[j],
// starts[j + 1]) share prefix_lens[j] tokens; rows in no group are units of their own (prefix 0).
template <typename T>
bool try_cascade_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables, const int64_t* lens,
                        T* out, int64_t B, int64_t H, int64_t KVH, int64_t D, int64_t block_size, int64_t table_width,
                        int64_t q_seq_stride, int64_t q_head_stride, int64_t cache_head_stride,
                        int64_t cache_block_stride, int64_t cache_token_stride, float scale,
                        const int64_t* group_rows, const int64_t* group_starts, const int64_t* prefix_lens,
                        int64_t num_groups) {
#if KVMEM_HAVE_AVX512
  constexpr bool supported = std::is_same_v<T, float>
#if defined(KVMEM_AVX512_BF16)
                             || std::is_same_v<T, c10::BFloat16>
#endif
      ;
  if constexpr (supported) {
    if (D == 64 || D == 128) {
      std::vector<CascadeUnit> units;
      std::vector<int64_t> unit_rows;
      std::vector<char> grouped(B, 0);
      for (int64_t j = 0; j < num_groups; ++j) {
        for (int64_t s = group_starts[j]; s < group_starts[j + 1]; s += kCascadeRowsPerUnit) {
          const int64_t count = std::min(kCascadeRowsPerUnit, group_starts[j + 1] - s);
          units.push_back({static_cast<int64_t>(unit_rows.size()), count, prefix_lens[j]});
          for (int64_t i = s; i < s + count; ++i) {
            unit_rows.push_back(group_rows[i]);
            grouped[group_rows[i]] = 1;
          }
        }
      }
      for (int64_t r = 0; r < B; ++r)
        if (!grouped[r]) {
          units.push_back({static_cast<int64_t>(unit_rows.size()), 1, 0});
          unit_rows.push_back(r);
        }
      auto run = D == 64 ? cascade_avx512<T, 64> : cascade_avx512<T, 128>;
      run(q, k_cache, v_cache, tables, lens, out, H, KVH, block_size, table_width, q_seq_stride, q_head_stride,
          cache_head_stride, cache_block_stride, cache_token_stride, scale, units, unit_rows);
      return true;
    }
  }
#endif
  return false;
}

// ---------------------------------------------------------------------------------------------
// Quantized caches (kv_cache_dtype int8 / fp8; kvmem/attention/kv_quant.py): each stored row is
// widened to float32 as it is read, never outside the loop that uses it. int8: sign-extend and
// convert, times the (token, head) scale. float8: no table; in the portable loops the byte's
// exponent and mantissa bits are moved to their float32 places (e4m3: << 20, e5m2: << 21) and the
// sign to bit 31, which gives the value times 2^-(127 - bias) for normals and subnormals alike (a
// float8 subnormal lands on a float32 subnormal of the same mantissa), and the multiplication by
// the row's factor (2^(127 - bias) times the per-tensor scale) follows at once. Two paths: plain
// loops that -march=native vectorizes (any head dimension, any CPU), and with AVX-512 the vector
// kernel above with these rows (head dimensions 64 and 128; float8 through float16 there).
// ---------------------------------------------------------------------------------------------

// The storage formats, one byte each.
struct Fp8E4M3 { uint8_t bits; };
struct Fp8E5M2 { uint8_t bits; };
enum class KVFormat { kInt8, kFp8E4M3, kFp8E5M2 };

// Float32 bits of a float8 byte's magnitude, off by 2^(127 - bias) (see above); sign in bit 31.
template <int SHIFT>
inline uint32_t fp8_bits(uint8_t b) {
  return (static_cast<uint32_t>(b & 0x7F) << SHIFT) | (static_cast<uint32_t>(b & 0x80) << 24);
}

// What multiplies a row's widened elements besides its own scale: 2^(127 - bias) for float8.
inline float format_factor(KVFormat f) {
  return f == KVFormat::kFp8E4M3 ? std::ldexp(1.f, 120) : f == KVFormat::kFp8E5M2 ? std::ldexp(1.f, 112) : 1.f;
}

// One stored row of n elements to float32, times row_scale (which includes format_factor).
inline void widen_stored(const uint8_t* src, KVFormat format, float row_scale, float* dst, int64_t n) {
  if (format == KVFormat::kInt8) {
    const int8_t* s = reinterpret_cast<const int8_t*>(src);
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(s[d]) * row_scale;
    return;
  }
  // Bit casts through memcpy (the compiler turns them into register moves): writing the bits
  // through a uint32_t* and reading them back as float would break the aliasing rules.
  if (format == KVFormat::kFp8E4M3) {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const uint32_t bits = fp8_bits<20>(src[d]);
      float value;
      std::memcpy(&value, &bits, sizeof value);
      dst[d] = value * row_scale;
    }
  } else {
#pragma omp simd
    for (int64_t d = 0; d < n; ++d) {
      const uint32_t bits = fp8_bits<21>(src[d]);
      float value;
      std::memcpy(&value, &bits, sizeof value);
      dst[d] = value * row_scale;
    }
  }
}

struct QuantizedCache {
  const uint8_t* k;
  const uint8_t* v;
  const float* k_scales;  // int8: [KVH, blocks, block_size] with the strides below; fp8: nullptr
  const float* v_scales;
  KVFormat format;
  float tensor_scale;  // fp8: the per-tensor scale times format_factor; int8: unused
  int64_t head_stride, block_stride, token_stride;  // of k and v (element = byte)
  int64_t scale_head_stride, scale_block_stride, scale_token_stride;

  inline float row_scale(const float* scales, int64_t kvh, int64_t block, int64_t i) const {
    return scales == nullptr ? tensor_scale
                             : scales[kvh * scale_head_stride + block * scale_block_stride + i * scale_token_stride];
  }
};

template <typename T, int DIM>
void decode_quantized(const T* q, const QuantizedCache& c, const int64_t* tables, const int64_t* lens, T* out,
                      int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t block_size,
                      int64_t table_width, int64_t q_seq_stride, int64_t q_head_stride, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  if (DIM > 0) dim = DIM;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores, row(dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[seq];
      const int64_t* table = tables + seq * table_width;
      for (int64_t g = 0; g < group; ++g) {
        const T* qh = q + seq * q_seq_stride + (kvh * group + g) * q_head_stride;
        for (int64_t d = 0; d < dim; ++d) qf[g * dim + d] = to_float(qh[d]) * scale;
      }
      scores.assign(group * len, 0.f);
      for (int64_t start = 0; start < len; start += block_size) {
        const int64_t n = std::min(block_size, len - start), block = table[start / block_size];
        const uint8_t* kb = c.k + kvh * c.head_stride + block * c.block_stride;
        for (int64_t i = 0; i < n; ++i) {
          widen_stored(kb + i * c.token_stride, c.format, c.row_scale(c.k_scales, kvh, block, i), row.data(),
                       DIM > 0 ? DIM : dim);
          for (int64_t g = 0; g < group; ++g) scores[g * len + start + i] = dot<DIM>(qf.data() + g * dim, row.data(), dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sg[t]);
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sg[t] = std::exp(sg[t] - m);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < len; ++t) total += sg[t];
        const float inv = 1.f / total;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      for (int64_t g = 0; g < group; ++g) {
        const float* pg = scores.data() + g * len;
        float* ag = acc.data() + g * dim;
        constexpr int64_t kLocal = DIM > 0 ? DIM : 1;
        float local[kLocal] = {};
        float* a = DIM > 0 ? local : ag;
        const int64_t n_dim = DIM > 0 ? DIM : dim;
        std::fill(a, a + n_dim, 0.f);
        for (int64_t start = 0; start < len; start += block_size) {
          const int64_t n = std::min(block_size, len - start), block = table[start / block_size];
          const uint8_t* vb = c.v + kvh * c.head_stride + block * c.block_stride;
          for (int64_t i = 0; i < n; ++i) {
            widen_stored(vb + i * c.token_stride, c.format, c.row_scale(c.v_scales, kvh, block, i), row.data(), n_dim);
            const float p = pg[start + i];
#pragma omp simd
            for (int64_t d = 0; d < n_dim; ++d) a[d] += p * row[d];
          }
        }
        if (DIM > 0) std::copy(a, a + n_dim, ag);
      }
      for (int64_t g = 0; g < group; ++g) {
        T* o = out + seq * num_heads * dim + (kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[g * dim + d]);
      }
    }
  });
}

#if KVMEM_HAVE_AVX512
// 16 stored elements to 16 floats (before the row's factor).
inline __m512 widen16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// float8 through float16, whose conversion instruction takes subnormals in its stride: e5m2 is
// float16's top byte; e4m3's exponent and mantissa move to float16's places (<< 7), which reads
// as its value times 2^-8 (see kAvx512Fp8Factor). Widening straight to float32 bits instead
// (as the portable loops do) would make every element a tiny float32 and the products subnormal,
// which this CPU computes many times slower and less exactly.
inline __m512 widen16(const Fp8E5M2* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtph_ps(_mm256_slli_epi16(b, 8));
}
inline __m512 widen16(const Fp8E4M3* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
  return _mm512_cvtph_ps(_mm256_or_si256(magnitude, sign));
}
// 32 stored elements to two vectors of 16 floats (elements 0-15, 16-31): the same values as two
// widen16 calls, with the float16 bits of all 32 made by 512-bit integer instructions (float8 only;
// int8 has no cheaper way than widen16's two instructions per 16).
inline void widen32(const Fp8E5M2* p, __m512 (&out)[2]) {
  const __m512i h = _mm512_slli_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 8);
  out[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  out[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
inline void widen32(const Fp8E4M3* p, __m512 (&out)[2]) {
  // Sign-extended to 16 bits and shifted by 7, a byte s.eeee.mmm becomes s s.eeee.mmm 0000000 with
  // the sign in bits 15 and 14: clearing bit 14 leaves float16's sign and the << 7 of widen16.
  const __m512i w = _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 7);
  const __m512i h = _mm512_and_si512(w, _mm512_set1_epi16(static_cast<short>(0xBFFF)));
  out[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  out[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}
inline void widen32(const int8_t* p, __m512 (&out)[2]) {
  out[0] = widen16(p);
  out[1] = widen16(p + 16);
}
// What the vector path's float8 rows are off by (the role format_factor plays for the loops).
inline float avx512_format_factor(KVFormat f) { return f == KVFormat::kFp8E4M3 ? 256.f : 1.f; }

// Quantized rows for the value loop (accumulate_values): 32 elements per piece, widened once per
// tile of query heads. The row factors (scales) are applied outside: to the 16 scores of a tile at
// once, and to the probabilities before the values are accumulated.
template <typename S, int DIM>
struct QuantizedRowOps {
  static constexpr int kPiece = 32, kPieceVectors = 2;
  static void widen_piece(const S* piece, __m512 (&out)[kPieceVectors]) { widen32(piece, out); }
  static int element(int v, int j) { return 16 * v + j; }
};
template <int DIM>
struct RowOps<int8_t, DIM> : QuantizedRowOps<int8_t, DIM> {};
template <int DIM>
struct RowOps<Fp8E4M3, DIM> : QuantizedRowOps<Fp8E4M3, DIM> {};
template <int DIM>
struct RowOps<Fp8E5M2, DIM> : QuantizedRowOps<Fp8E5M2, DIM> {};

// The per-thread buffers of decode_avx512_quantized, kept across calls (every layer of every step
// calls it): they only grow, so a step allocates nothing once the longest row has been seen.
struct QuantizedScratch {
  std::vector<int64_t> rows;
  std::vector<float> scores, acc, totals, k_factor, v_factor, query;
};
inline QuantizedScratch& quantized_scratch() {
  thread_local QuantizedScratch scratch;
  return scratch;
}
template <typename V>
inline void grow(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Attention over a quantized cache for head dimensions 64 and 128: q and out in the model's dtype
// T (float32, bfloat16 or float16), read and written where they lie (no float32 copy of q, no
// output to cast back: one layer of one step used to make both). Key rows are widened in registers,
// 32 elements per step (float8: 512-bit integer instructions make the float16 bits of 32 elements
// at once; see widen32), values once per tile of query heads. Widening each key row once into a
// float32 tile shared by the GQA group was tried and measured slower (the tile's stores and loads
// cost more than widening again). The arithmetic is that of a float32 query times widened rows:
// the query is widened exactly (bfloat16 and float16 are float32 subsets), scores are 16 lane-wise
// partial sums reduced by sum_lanes_16 and times the rows' factors, so the result does not depend
// on the batch and is bit-identical to the earlier version that took a float32 copy of q.
template <typename T, typename S, int DIM>
void decode_avx512_quantized(const T* q, const QuantizedCache& c, const int64_t* tables, const int64_t* lens, T* out,
                             int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                             int64_t table_width, int64_t q_seq_stride, int64_t q_head_stride, float scale) {
  constexpr int NV = DIM / 16;
  constexpr int kMaxTile = DIM == 64 ? 4 : 2;
  const int64_t group = num_heads / num_kv_heads;
  const S* k_cache = reinterpret_cast<const S*>(c.k);
  const S* v_cache = reinterpret_cast<const S*>(c.v);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    QuantizedScratch& s = quantized_scratch();
    grow(s.acc, group * DIM);
    grow(s.totals, group);
    grow(s.query, group * DIM);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[seq], padded = (len + 31) / 32 * 32;
      const int64_t* table = tables + seq * table_width;
      grow(s.rows, padded);
      grow(s.k_factor, padded);
      grow(s.v_factor, padded);
      grow(s.scores, group * padded);
      int64_t* rows = s.rows.data();
      float* k_factor = s.k_factor.data();
      float* v_factor = s.v_factor.data();
      std::fill(k_factor + len, k_factor + padded, 0.f);
      std::fill(v_factor + len, v_factor + padded, 0.f);
      for (int64_t start = 0, b = 0; start < len; start += block_size, ++b) {
        const int64_t base = kvh * c.head_stride + table[b] * c.block_stride;
        for (int64_t t = start, end_t = std::min(len, start + block_size); t < end_t; ++t) {
          rows[t] = base + (t - start) * c.token_stride;
          k_factor[t] = c.row_scale(c.k_scales, kvh, table[b], t - start) * scale;
          v_factor[t] = c.row_scale(c.v_scales, kvh, table[b], t - start);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const T* qh = q + seq * q_seq_stride + (kvh * group + g) * q_head_stride;
        for (int64_t d = 0; d < DIM; ++d) s.query[g * DIM + d] = to_float(qh[d]);
      }
      float* scores = s.scores.data();
      for (int64_t start = 0; start < len; start += 16) {
        const int64_t n = std::min<int64_t>(16, len - start);
        const __m512 factor = _mm512_loadu_ps(k_factor + start);
        for (int64_t g = 0; g < group; ++g) {
          __m512 qv[NV];
#pragma GCC unroll 8
          for (int c2 = 0; c2 < NV; ++c2) qv[c2] = _mm512_loadu_ps(s.query.data() + g * DIM + 16 * c2);
          __m512 part[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) {
            if (i < n) {
              const S* row = k_cache + rows[start + i];
              __m512 x[2];
              widen32(row, x);
              __m512 sum = _mm512_fmadd_ps(qv[1], x[1], _mm512_mul_ps(qv[0], x[0]));
#pragma GCC unroll 4
              for (int c2 = 1; c2 < NV / 2; ++c2) {
                widen32(row + 32 * c2, x);
                sum = _mm512_fmadd_ps(qv[2 * c2], x[0], sum);
                sum = _mm512_fmadd_ps(qv[2 * c2 + 1], x[1], sum);
              }
              part[i] = sum;
            } else {
              part[i] = _mm512_setzero_ps();
            }
          }
          _mm512_storeu_ps(scores + g * padded + start, _mm512_mul_ps(sum_lanes_16(part), factor));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores + g * padded;
        s.totals[g] = softmax_numerators(sg, len, padded);
        for (int64_t t = 0; t < padded; t += 16)  // each value row's factor goes with its probability
          _mm512_storeu_ps(sg + t, _mm512_mul_ps(_mm512_loadu_ps(sg + t), _mm512_loadu_ps(v_factor + t)));
      }
      for (int64_t g0 = 0; g0 < group; g0 += kMaxTile) {
        const float* p = scores + g0 * padded;
        float* a = s.acc.data() + g0 * DIM;
        switch (std::min<int64_t>(kMaxTile, group - g0)) {
          case 1: accumulate_values<S, DIM, 1>(v_cache, rows, len, p, padded, a); break;
          case 2: accumulate_values<S, DIM, 2>(v_cache, rows, len, p, padded, a); break;
          case 3: accumulate_values<S, DIM, 3>(v_cache, rows, len, p, padded, a); break;
          default: accumulate_values<S, DIM, kMaxTile>(v_cache, rows, len, p, padded, a); break;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.f / s.totals[g];
        T* o = out + (seq * num_heads + kvh * group + g) * DIM;
        for (int64_t d = 0; d < DIM; ++d) o[d] = static_cast<T>(s.acc[g * DIM + d] * inv);
      }
    }
  });
}

template <typename T, int DIM>
void run_avx512_quantized(const T* q, const QuantizedCache& c, const int64_t* tables, const int64_t* lens, T* out,
                          int64_t B, int64_t H, int64_t KVH, int64_t block_size, int64_t width, int64_t q_seq_stride,
                          int64_t q_head_stride, float scale) {
  switch (c.format) {
    case KVFormat::kInt8:
      decode_avx512_quantized<T, int8_t, DIM>(q, c, tables, lens, out, B, H, KVH, block_size, width, q_seq_stride,
                                              q_head_stride, scale);
      break;
    case KVFormat::kFp8E4M3:
      decode_avx512_quantized<T, Fp8E4M3, DIM>(q, c, tables, lens, out, B, H, KVH, block_size, width, q_seq_stride,
                                               q_head_stride, scale);
      break;
    case KVFormat::kFp8E5M2:
      decode_avx512_quantized<T, Fp8E5M2, DIM>(q, c, tables, lens, out, B, H, KVH, block_size, width, q_seq_stride,
                                               q_head_stride, scale);
      break;
  }
}
#endif  // KVMEM_HAVE_AVX512

}  // namespace

// Attention over a quantized cache: k_cache / v_cache int8, float8_e4m3fn or float8_e5m2
// [KVH, blocks, block_size, D] (D contiguous); int8 takes scales [KVH, blocks, block_size] float32
// (any strides, the same for K and V), fp8 takes none and multiplies by fp8_scale. The rest as
// decode_attention. Returns [B, H, D] in q's dtype.
torch::Tensor quantized_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                  c10::optional<torch::Tensor> k_scales, c10::optional<torch::Tensor> v_scales,
                                  torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                  double fp8_scale, bool use_vector_kernel) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "the head dimension must be contiguous");
  const auto kind = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kind, "K and V caches must share a dtype");
  const bool is_int8 = kind == at::kChar;
  TORCH_CHECK(is_int8 || kind == at::kFloat8_e4m3fn || kind == at::kFloat8_e5m2,
              "kv_cache_dtype: the cache must be int8, float8_e4m3fn or float8_e5m2");
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D && tables.size(0) == B && lens.size(0) == B, "bad shapes");
  QuantizedCache c{};
  c.k = reinterpret_cast<const uint8_t*>(k_cache.data_ptr());
  c.v = reinterpret_cast<const uint8_t*>(v_cache.data_ptr());
  c.format = is_int8 ? KVFormat::kInt8 : kind == at::kFloat8_e5m2 ? KVFormat::kFp8E5M2 : KVFormat::kFp8E4M3;
  c.tensor_scale = static_cast<float>(fp8_scale) * format_factor(c.format);
  c.head_stride = k_cache.stride(0);
  c.block_stride = k_cache.stride(1);
  c.token_stride = k_cache.stride(2);
  if (is_int8) {
    TORCH_CHECK(k_scales.has_value() && v_scales.has_value(), "an int8 cache needs its scales");
    const auto& ks = *k_scales;
    const auto& vs = *v_scales;
    TORCH_CHECK(ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.dim() == 3 &&
                    ks.size(0) == KVH && ks.size(1) == k_cache.size(1) && ks.size(2) == k_cache.size(2) &&
                    vs.sizes() == ks.sizes() && vs.strides() == ks.strides(),
                "scales must be float32 [kv_heads, blocks, block_size], the same layout for K and V");
    c.k_scales = ks.data_ptr<float>();
    c.v_scales = vs.data_ptr<float>();
    c.scale_head_stride = ks.stride(0);
    c.scale_block_stride = ks.stride(1);
    c.scale_token_stride = ks.stride(2);
  }
#if KVMEM_HAVE_AVX512
  if (use_vector_kernel && (D == 64 || D == 128)) {
    c.tensor_scale = static_cast<float>(fp8_scale) * avx512_format_factor(c.format);
    auto out = torch::empty({B, H, D}, q.options());  // q read where it lies, out written in its dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "kvmem_quantized_attention_avx512", [&] {
      auto run = D == 64 ? run_avx512_quantized<scalar_t, 64> : run_avx512_quantized<scalar_t, 128>;
      run(q.data_ptr<scalar_t>(), c, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          B, H, KVH, k_cache.size(2), tables.size(1), q.stride(0), q.stride(1), static_cast<float>(scale));
    });
    return out;
  }
#endif
  auto out = torch::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "kvmem_quantized_attention", [&] {
    auto run = D == 64 ? decode_quantized<scalar_t, 64> : D == 128 ? decode_quantized<scalar_t, 128>
                                                                   : decode_quantized<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), c, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
        B, H, KVH, D, k_cache.size(2), tables.size(1), q.stride(0), q.stride(1), static_cast<float>(scale));
  });
  return out;
}

// q [B, H, D] (D contiguous); caches [KVH, blocks, block_size, D] (D contiguous, any other strides);
// block_tables [B, W] int64; context_lens [B] int64 (each >= 1). Returns [B, H, D] in q's dtype.
// use_vector_kernel=false forces the portable loops (tests compare the two).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                               bool use_vector_kernel) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "the head dimension must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the cache must share a dtype");
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D && tables.size(0) == B && lens.size(0) == B, "bad shapes");
  auto out = torch::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "kvmem_decode_attention", [&] {
    if (use_vector_kernel &&
        try_decode_avx512<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                                    tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H,
                                    KVH, D, k_cache.size(2), tables.size(1), q.stride(0), q.stride(1),
                                    k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), static_cast<float>(scale)))
      return;
    auto run = D == 64 ? decode<scalar_t, 64> : D == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D,
        k_cache.size(2), tables.size(1), q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), static_cast<float>(scale));
  });
  return out;
}

// decode_attention with shared prefixes read once per group (see "Cascade" above): rows
// group_rows[group_starts[j], group_starts[j + 1]) (int64) all start with the same KV for
// prefix_lens[j] tokens (a multiple of 32, at most each member's length), and read it through the
// first member's table; rows in no group are computed alone. The caller guarantees the KV is the
// same (same blocks, or pages shared between slots). Results equal decode_attention's bit for bit.
torch::Tensor cascade_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                torch::Tensor block_tables, torch::Tensor context_lens, double scale,
                                torch::Tensor group_rows, torch::Tensor group_starts, torch::Tensor prefix_lens,
                                bool use_vector_kernel) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.strides() == k_cache.strides(),
              "the head dimension must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and the cache must share a dtype");
  auto tables = block_tables.to(torch::kInt64).contiguous();
  auto lens = context_lens.to(torch::kInt64).contiguous();
  auto members = group_rows.to(torch::kInt64).contiguous();
  auto starts = group_starts.to(torch::kInt64).contiguous();
  auto prefixes = prefix_lens.to(torch::kInt64).contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(3) == D && tables.size(0) == B && lens.size(0) == B, "bad shapes");
  const int64_t G = prefixes.size(0);
  TORCH_CHECK(starts.size(0) == G + 1, "group_starts must have one entry more than prefix_lens");
  const int64_t* m = members.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* pl = prefixes.data_ptr<int64_t>();
  const int64_t* ln = lens.data_ptr<int64_t>();
  const int64_t block_size = k_cache.size(2);
  std::vector<char> seen(B, 0);
  TORCH_CHECK(G == 0 || (st[0] == 0 && st[G] == members.size(0)), "group_starts must span group_rows");
  for (int64_t j = 0; j < G; ++j) {
    TORCH_CHECK(st[j] <= st[j + 1], "group_starts must not decrease");
    TORCH_CHECK(pl[j] >= 0 && pl[j] % 32 == 0, "a shared prefix must be a multiple of 32 tokens");
    TORCH_CHECK(pl[j] <= tables.size(1) * block_size, "a shared prefix must lie within the tables");
    for (int64_t i = st[j]; i < st[j + 1]; ++i) {
      TORCH_CHECK(m[i] >= 0 && m[i] < B && !seen[m[i]], "group_rows must be distinct rows of the batch");
      TORCH_CHECK(ln[m[i]] >= pl[j], "a shared prefix must not be longer than a member's context");
      seen[m[i]] = 1;
    }
  }
  auto out = torch::empty({B, H, D}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "kvmem_cascade_attention", [&] {
    if (use_vector_kernel &&
        try_cascade_avx512<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                                     v_cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(), ln,
                                     out.data_ptr<scalar_t>(), B, H, KVH, D, block_size, tables.size(1), q.stride(0),
                                     q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                                     static_cast<float>(scale), m, st, pl, G))
      return;
    // No vector kernel here: every row alone, which is what a group computes anyway.
    auto run = D == 64 ? decode<scalar_t, 64> : D == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        tables.data_ptr<int64_t>(), ln, out.data_ptr<scalar_t>(), B, H, KVH, D, block_size, tables.size(1),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        static_cast<float>(scale));
  });
  return out;
}

void register_fused(pybind11::module& m);  // cpu_fused.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_fused(m);
  m.def("decode_attention", &decode_attention, "decode attention over a block-addressed KV cache (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"),
        py::arg("scale"), py::arg("use_vector_kernel") = true);
  m.def("quantized_attention", &quantized_attention,
        "attention over an int8 / float8 KV cache, widened row by row (CPU)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("k_scales"), py::arg("v_scales"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("scale"), py::arg("fp8_scale") = 1.0, py::arg("use_vector_kernel") = true);
  m.def("cascade_attention", &cascade_attention,
        "decode_attention with shared prefixes read once per group of rows (CPU)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("scale"),
        py::arg("group_rows"), py::arg("group_starts"), py::arg("prefix_lens"), py::arg("use_vector_kernel") = true);
  m.def("has_vector_kernel", [] {
#if KVMEM_HAVE_AVX512
    return true;
#else
    return false;
#endif
  });
}
