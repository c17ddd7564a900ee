// Linear layers over GGUF-quantized weights, read in their blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
// Q4_K, Q5_K, Q6_K), never dequantized into a full-width copy.
//
// Each weight row is K / 32 blocks (K-quants: K / 256 super-blocks) of llama.cpp's layout:
//   Q8_0: fp16 d, int8 q[32]                       w = q * d
//   Q4_0: fp16 d, uint8 qs[16] (two nibbles each)  w = (q - 8) * d
//   Q4_1: fp16 d, fp16 m, uint8 qs[16]             w = q * d + m
//   Q5_0: fp16 d, uint32 qh, uint8 qs[16]          w = (q - 16) * d
//   Q5_1: fp16 d, fp16 m, uint32 qh, uint8 qs[16]  w = q * d + m
// where element j < 16 is the low nibble of qs[j] and element j + 16 its high nibble (Q5: bit j of
// qh is element j's fifth bit), and, per 256 values in sub-blocks (ggml-common.h's block_q*_K):
//   Q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit sc/m for 8 sub-blocks of 32, qs[128]
//         w = (d * sc) * q - (dmin * m)
//   Q5_K: as Q4_K, with qh[32] (bit j of qh[i]: sub-block j's element i's fifth bit) before qs
//   Q6_K: ql[128], qh[64], int8 sc[16] (sub-blocks of 16), fp16 d    w = (d * sc) * (q - 32)
//
// The kernels walk every row in chunks of 32 values (a legacy block, or a 32-value slice of a
// super-block), so all types share the same dot-product loops and the same order of additions.
// A chunk's weights are dequantized in registers exactly as the gguf package does it
// (a multiply, then an add: built with -ffp-contract=off so the compiler fuses nothing), then
// multiplied into float32 accumulators with FMAs. So y = x W^T differs from "dequantize, then a
// float32 matmul" only in the order of its additions. Activations are float32 (bfloat16 ones are
// widened first, exactly); outputs are rounded once to the activations' dtype.
//
// Batch invariance: every output element is computed by the same sequence of operations whatever
// the number of rows N and whichever tile a row falls in (a row's accumulators are its own), so a
// greedy answer does not depend on what runs beside it.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KVMEM_QUANT_AVX512 1
#else
#define KVMEM_QUANT_AVX512 0
#endif

namespace {

constexpr int kBlock = 32;  // values per chunk: what every dot-product loop steps by
// GGML's type ids (gguf.GGMLQuantizationType)
constexpr int64_t kQ4_0 = 2;
constexpr int64_t kQ4_1 = 3;
constexpr int64_t kQ5_0 = 6;
constexpr int64_t kQ5_1 = 7;
constexpr int64_t kQ8_0 = 8;
constexpr int64_t kQ4_K = 12;
constexpr int64_t kQ5_K = 13;
constexpr int64_t kQ6_K = 14;

template <int64_t Q>
constexpr int64_t kBytes = Q == kQ4_0 ? 18 : Q == kQ4_1 ? 20 : Q == kQ5_0 ? 22 : Q == kQ5_1 ? 24
                         : Q == kQ8_0 ? 34 : Q == kQ4_K ? 144 : Q == kQ5_K ? 176 : 210;
template <int64_t Q>
constexpr int64_t kValues = Q == kQ4_K || Q == kQ5_K || Q == kQ6_K ? 256 : 32;

// Calls f(std::integral_constant<int64_t, Q>) for the runtime type id `qtype`.
template <typename F>
void with_type(int64_t qtype, F&& f) {
  switch (qtype) {
    case kQ4_0: return f(std::integral_constant<int64_t, kQ4_0>{});
    case kQ4_1: return f(std::integral_constant<int64_t, kQ4_1>{});
    case kQ5_0: return f(std::integral_constant<int64_t, kQ5_0>{});
    case kQ5_1: return f(std::integral_constant<int64_t, kQ5_1>{});
    case kQ8_0: return f(std::integral_constant<int64_t, kQ8_0>{});
    case kQ4_K: return f(std::integral_constant<int64_t, kQ4_K>{});
    case kQ5_K: return f(std::integral_constant<int64_t, kQ5_K>{});
    case kQ6_K: return f(std::integral_constant<int64_t, kQ6_K>{});
    default: TORCH_CHECK(false, "quantized type ", qtype, " has no native kernel");
  }
}

int64_t block_bytes(int64_t qtype) {
  int64_t bytes = 0;
  with_type(qtype, [&](auto q) { bytes = kBytes<decltype(q)::value>; });
  return bytes;
}

int64_t block_values(int64_t qtype) {
  int64_t values = 0;
  with_type(qtype, [&](auto q) { values = kValues<decltype(q)::value>; });
  return values;
}

// Chunk c (values 32 c .. 32 c + 31) of a row: the block holding it, and which 32 of the block.
template <int64_t Q>
inline const uint8_t* block_of(const uint8_t* row, int64_t c) {
  return row + c / (kValues<Q> / kBlock) * kBytes<Q>;
}
template <int64_t Q>
inline int sub_of(int64_t c) {
  return static_cast<int>(c % (kValues<Q> / kBlock));
}

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(bits);  // one instruction; fp16 -> fp32 is exact either way (same value as below)
#else
  return c10::detail::fp16_ieee_to_fp32_value(bits);
#endif
}

// Q4_K/Q5_K sub-block s's scale d * sc and offset dmin * m (llama.cpp's get_scale_min_k4: 6-bit sc
// and m, sub-blocks 0-3 in the low bits of bytes 0-3 / 4-7, 4-7 split over bytes 8-11 and the top
// two bits of bytes 0-7). Both products are exact in float32 (11-bit mantissa times 6 bits).
inline void scale_min_k4(const uint8_t* b, int s, float& dl, float& ml) {
  const uint8_t* q = b + 4;
  int sc, m;
  if (s < 4) {
    sc = q[s] & 63;
    m = q[s + 4] & 63;
  } else {
    sc = (q[s + 4] & 0xF) | ((q[s - 4] >> 6) << 4);
    m = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
  }
  dl = half_at(b) * static_cast<float>(sc);
  ml = half_at(b + 2) * static_cast<float>(m);
}

// Q6_K chunk s (of 8): its 32 values are elements 128 h + 32 k + i (h = s / 4, k = s % 4) of the
// super-block: low 4 bits in ql[64 h + 32 (k % 2) + i] >> 4 (k / 2), high 2 in qh[32 h + i] >> 2 k;
// values i < 16 have scale sc[2 s], the others sc[2 s + 1].
struct Q6Chunk {
  const uint8_t* ql;
  int ql_shift;
  const uint8_t* qh;
  int qh_shift;
  float dl0, dl1;
};
inline Q6Chunk q6_chunk(const uint8_t* b, int s) {
  const int h = s / 4, k = s % 4;
  const float d = half_at(b + 208);
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 2 * s;
  return {b + 64 * h + 32 * (k % 2), 4 * (k / 2), b + 128 + 32 * h, 2 * k,
          d * static_cast<float>(sc[0]), d * static_cast<float>(sc[1])};
}

// --- scalar dequantization of one chunk of 32 values (portable path and the dequantize op) ---
template <int64_t Q>
inline void dequant_chunk_scalar(const uint8_t* row, int64_t c, float* out) {
  const uint8_t* b = block_of<Q>(row, c);
  const int s = sub_of<Q>(c);
  if constexpr (Q == kQ6_K) {
    const Q6Chunk k = q6_chunk(b, s);
    for (int i = 0; i < 32; ++i) {
      const int q = ((k.ql[i] >> k.ql_shift) & 0xF) | (((k.qh[i] >> k.qh_shift) & 3) << 4);
      out[i] = static_cast<float>(q - 32) * (i < 16 ? k.dl0 : k.dl1);
    }
    return;
  }
  if constexpr (Q == kQ4_K || Q == kQ5_K) {
    float dl, ml;
    scale_min_k4(b, s, dl, ml);
    const uint8_t* qs = b + (Q == kQ4_K ? 16 : 48) + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int i = 0; i < 32; ++i) {
      int q = (qs[i] >> shift) & 0xF;
      if constexpr (Q == kQ5_K) q |= ((b[16 + i] >> s) & 1) << 4;
      out[i] = static_cast<float>(q) * dl - ml;
    }
    return;
  }
  const float d = half_at(b);
  if constexpr (Q == kQ5_0 || Q == kQ5_1) {
    uint32_t qh;
    std::memcpy(&qh, b + (Q == kQ5_0 ? 2 : 4), 4);
    const uint8_t* qs = b + (Q == kQ5_0 ? 6 : 8);
    for (int j = 0; j < 16; ++j) {
      const int lo = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
      const int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      if constexpr (Q == kQ5_0) {
        out[j] = static_cast<float>(lo - 16) * d;
        out[j + 16] = static_cast<float>(hi - 16) * d;
      } else {
        const float m = half_at(b + 2);
        out[j] = static_cast<float>(lo) * d + m;
        out[j + 16] = static_cast<float>(hi) * d + m;
      }
    }
  } else if constexpr (Q == kQ8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(q[j]) * d;
  } else if constexpr (Q == kQ4_0) {
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(static_cast<int>(qs[j] & 0xF) - 8) * d;
      out[j + 16] = static_cast<float>(static_cast<int>(qs[j] >> 4) - 8) * d;
    }
  } else {
    const float m = half_at(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      float lo = static_cast<float>(qs[j] & 0xF) * d;
      float hi = static_cast<float>(qs[j] >> 4) * d;
      out[j] = lo + m;
      out[j + 16] = hi + m;
    }
  }
}

#if KVMEM_QUANT_AVX512
inline __m256i shift_right_bytes(__m256i v, int count) {  // per byte, for count < 8, then masked
  return _mm256_srl_epi16(v, _mm_cvtsi32_si128(count));
}

// 16 bytes of packed nibbles (value j < 16 the low nibble of byte j, value j + 16 its high nibble) as
// 32 16-bit lanes in value order: the 4-bit part of a Q4_0/Q4_1/Q5_0/Q5_1 block.
inline __m512i nibble_words(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m256i nibbles = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(packed, mask)),
                                                  _mm_and_si128(_mm_srli_epi16(packed, 4), mask), 1);
  return _mm512_cvtepu8_epi16(nibbles);
}

// A Q5_0/Q5_1/K-quant chunk's 32 quantized values, unsigned (Q4_K 0..15, Q5 0..31, Q6_K 0..63),
// as 16-bit lanes in element order.
template <int64_t Q>
inline __m512i chunk_words(const uint8_t* b, int s) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (Q == kQ5_0 || Q == kQ5_1) {
    const __m512i words = nibble_words(b + (Q == kQ5_0 ? 6 : 8));
    uint32_t qh;
    std::memcpy(&qh, b + (Q == kQ5_0 ? 2 : 4), 4);
    return _mm512_mask_add_epi16(words, static_cast<__mmask32>(qh), words, _mm512_set1_epi16(16));
  } else if constexpr (Q == kQ4_K || Q == kQ5_K) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (Q == kQ4_K ? 16 : 48) + 32 * (s / 2)));
    __m256i q = _mm256_and_si256(shift_right_bytes(packed, 4 * (s % 2)), low4);
    if constexpr (Q == kQ5_K) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
      q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(shift_right_bytes(qh, s), _mm256_set1_epi8(1)), 4));
    }
    return _mm512_cvtepu8_epi16(q);
  } else {
    static_assert(Q == kQ6_K);
    const Q6Chunk k = q6_chunk(b, s);
    const __m256i ql = _mm256_and_si256(
        shift_right_bytes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k.ql)), k.ql_shift), low4);
    const __m256i qh = _mm256_and_si256(
        shift_right_bytes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k.qh)), k.qh_shift), _mm256_set1_epi8(3));
    return _mm512_cvtepu8_epi16(_mm256_or_si256(ql, _mm256_slli_epi16(qh, 4)));
  }
}

// 16-bit lanes 0..15 and 16..31 as float32.
inline void words_to_ps(__m512i w, __m512& lo, __m512& hi) {
  lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)));
  hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)));
}

// The affine map of a Q5_0/Q5_1/Q4_K/Q5_K chunk (q -> weight), applied to float32 q values.
template <int64_t Q>
struct ChunkMap {
  __m512 scale, offset;  // Q5_0: offset = 16, subtracted first; Q5_1: added; K-quants: subtracted
  ChunkMap(const uint8_t* b, int s) {
    if constexpr (Q == kQ4_K || Q == kQ5_K) {
      float dl, ml;
      scale_min_k4(b, s, dl, ml);
      scale = _mm512_set1_ps(dl);
      offset = _mm512_set1_ps(ml);
    } else {
      scale = _mm512_set1_ps(half_at(b));
      offset = _mm512_set1_ps(Q == kQ5_0 ? 16.f : half_at(b + 2));
    }
  }
  __m512 operator()(__m512 q) const {
    if constexpr (Q == kQ5_0) return _mm512_mul_ps(_mm512_sub_ps(q, offset), scale);
    else if constexpr (Q == kQ5_1) return _mm512_add_ps(_mm512_mul_ps(q, scale), offset);
    else return _mm512_sub_ps(_mm512_mul_ps(q, scale), offset);
  }
};

// Chunk c of a row: its weights 0..15 in `lo`, 16..31 in `hi`, as float32.
template <int64_t Q>
inline void dequant_chunk(const uint8_t* row, int64_t c, __m512& lo, __m512& hi) {
  const uint8_t* b = block_of<Q>(row, c);
  if constexpr (Q == kQ5_0 || Q == kQ5_1 || Q == kQ4_K || Q == kQ5_K || Q == kQ6_K) {
    const int s = sub_of<Q>(c);
    words_to_ps(chunk_words<Q>(b, s), lo, hi);
    if constexpr (Q == kQ6_K) {
      const Q6Chunk k = q6_chunk(b, s);
      const __m512 bias = _mm512_set1_ps(32.f);
      lo = _mm512_mul_ps(_mm512_sub_ps(lo, bias), _mm512_set1_ps(k.dl0));
      hi = _mm512_mul_ps(_mm512_sub_ps(hi, bias), _mm512_set1_ps(k.dl1));
    } else {
      const ChunkMap<Q> map(b, s);
      lo = map(lo);
      hi = map(hi);
    }
    return;
  }
  const __m512 d = _mm512_set1_ps(half_at(b));
  if constexpr (Q == kQ8_0) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18));
    lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
    hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
  } else {
    const uint8_t* qs = b + (Q == kQ4_1 ? 4 : 2);
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m512i ql = _mm512_cvtepu8_epi32(_mm_and_si128(packed, mask));
    __m512i qh = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), mask));
    if constexpr (Q == kQ4_0) {
      const __m512i eight = _mm512_set1_epi32(8);
      lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(ql, eight)), d);
      hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qh, eight)), d);
    } else {
      const __m512 m = _mm512_set1_ps(half_at(b + 2));
      lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ql), d), m);
      hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(qh), d), m);
    }
  }
}

// R rows of x (row stride ldx) times one weight row of `nblocks` blocks -> R dot products.
template <int64_t Q, int R>
inline void dot_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t nblocks, float* out) {
  __m512 acc_lo[R], acc_hi[R];
  for (int r = 0; r < R; ++r) {
    acc_lo[r] = _mm512_setzero_ps();
    acc_hi[r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < nblocks; ++b) {
    __m512 lo, hi;
    dequant_chunk<Q>(w, b, lo, hi);
    const float* xb = x + b * kBlock;
    for (int r = 0; r < R; ++r) {
      acc_lo[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * ldx), lo, acc_lo[r]);
      acc_hi[r] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + r * ldx + 16), hi, acc_hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc_lo[r], acc_hi[r]));
}
#else
template <int64_t Q, int R>
inline void dot_rows(const float* x, int64_t ldx, const uint8_t* w, int64_t nblocks, float* out) {
  float acc[R][kBlock] = {};
  float wb[kBlock];
  for (int64_t b = 0; b < nblocks; ++b) {
    dequant_chunk_scalar<Q>(w, b, wb);
    const float* xb = x + b * kBlock;
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kBlock; ++j) acc[r][j] += xb[r * ldx + j] * wb[j];
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int j = 0; j < kBlock; ++j) s += acc[r][j];
    out[r] = s;
  }
}
#endif


// --- bfloat16 activations: AVX512-BF16 dot products over weights rounded to bfloat16 ---------
// The weights are dequantized exactly (as above), then rounded to bfloat16 (round to nearest even,
// as torch's .to(torch.bfloat16)): exactly the weights that dequantizing at load into a bfloat16
// model gives. Each output (row n, output o) is one chain: acc = 0; for each block of 32 in order,
// acc = dpbf16(acc, w_block, x_block); y = hsum(acc) in a fixed tree. The small-batch path reads
// the blocks directly; the large-batch path first dequantizes a tile of 16 weight rows into a
// bfloat16 scratch buffer (once per call, shared by every row of x), then runs a 4x4 register
// tile. Both compute each output by the same operations, so results do not depend on N.
#if KVMEM_QUANT_AVX512 && defined(__AVX512BF16__)
#define KVMEM_QUANT_BF16 1

inline float hsum(__m512 v) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

template <int64_t Q>
inline __m512bh dequant_chunk_bf16(const uint8_t* row, int64_t c) {
  if constexpr (Q == kQ8_0 || Q == kQ6_K) {
    __m512 lo, hi;
    dequant_chunk<Q>(row, c, lo, hi);
    return _mm512_cvtne2ps_pbh(hi, lo);  // [lo (values 0..15), hi (16..31)]
  } else if constexpr (Q == kQ5_0 || Q == kQ5_1 || Q == kQ4_K || Q == kQ5_K) {
    // As the 4-bit blocks below: the chunk's 16 (Q4_K) or 32 (5-bit) possible weights, computed by
    // the same operations as dequant_chunk and rounded to bfloat16, then looked up per value.
    const uint8_t* b = block_of<Q>(row, c);
    const int s = sub_of<Q>(c);
    const ChunkMap<Q> map(b, s);
    const __m512 q0 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 low = map(q0);
    const __m512 high = Q == kQ4_K ? low : map(_mm512_add_ps(q0, _mm512_set1_ps(16.f)));
    const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    return (__m512bh)_mm512_permutexvar_epi16(chunk_words<Q>(b, s), table);
  } else {
    const uint8_t* b = block_of<Q>(row, c);
    // A 4-bit block has 16 possible weights: compute them once (q * d (+ m) for q = 0..15, the same
    // multiply and add as above, rounded to bfloat16 the same way), then look each nibble up
    // (vpermw): the same bits as dequantizing all 32 values, with 3 float operations instead of 7.
    const __m512 q = Q == kQ4_0 ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
                                : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 values = _mm512_mul_ps(q, _mm512_set1_ps(half_at(b)));
    if constexpr (Q == kQ4_1) values = _mm512_add_ps(values, _mm512_set1_ps(half_at(b + 2)));
    const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(values));
    return (__m512bh)_mm512_permutexvar_epi16(nibble_words(b + (Q == kQ4_1 ? 4 : 2)), table);
  }
}

inline __m512bh load_bf16(const at::BFloat16* p) {
  return (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(p));
}

// --- K-quants a super-block at a time: the same values as dequant_chunk_bf16, faster -----------
// Per chunk, dequant_chunk_bf16 unpacks its sub-block's scale and finds its bytes at run time,
// which at batch 1 costs more than the dot product itself. Here a super-block's 8 scale pairs are
// unpacked once and its 8 chunks are produced with compile-time offsets and shifts; every weight is
// still the same multiply (and subtract) of the same float32 operands, so the bits do not change.
template <int64_t Q>
constexpr bool kSuper = kValues<Q> == 256;

template <typename F, int... S>
inline void each_chunk(F&& f, std::integer_sequence<int, S...>) {
  (f(std::integral_constant<int, S>{}), ...);
}

// A K-quant super-block's 8 chunks as bfloat16, in order, passed to f(chunk index, values).
template <int64_t Q, typename F>
inline void super_block_bf16(const uint8_t* b, F&& f) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (Q == kQ6_K) {
    const float d = half_at(b + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const __m512 bias = _mm512_set1_ps(32.f);
    each_chunk([&](auto S) {
      constexpr int s = decltype(S)::value, h = s / 4, k = s % 4;
      const __m256i ql = _mm256_and_si256(
          _mm256_srli_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * h + 32 * (k % 2))),
                            4 * (k / 2)), low4);
      const __m256i qh = _mm256_and_si256(
          _mm256_srli_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * h)), 2 * k),
          _mm256_set1_epi8(3));
      __m512 lo, hi;
      words_to_ps(_mm512_cvtepu8_epi16(_mm256_or_si256(ql, _mm256_slli_epi16(qh, 4))), lo, hi);
      lo = _mm512_mul_ps(_mm512_sub_ps(lo, bias), _mm512_set1_ps(d * static_cast<float>(sc[2 * s])));
      hi = _mm512_mul_ps(_mm512_sub_ps(hi, bias), _mm512_set1_ps(d * static_cast<float>(sc[2 * s + 1])));
      f(s, _mm512_cvtne2ps_pbh(hi, lo));
    }, std::make_integer_sequence<int, 8>{});
  } else {
    static_assert(Q == kQ4_K || Q == kQ5_K);
    const __m512 q0 = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 q16 = _mm512_add_ps(q0, _mm512_set1_ps(16.f));
    const __m256i qh = Q == kQ5_K ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16)) : _mm256_setzero_si256();
    each_chunk([&](auto S) {
      constexpr int s = decltype(S)::value;
      float dl, ml;
      scale_min_k4(b, s, dl, ml);
      const __m512 scale = _mm512_set1_ps(dl), offset = _mm512_set1_ps(ml);
      const __m512 low = _mm512_sub_ps(_mm512_mul_ps(q0, scale), offset);
      const __m512 high = Q == kQ4_K ? low : _mm512_sub_ps(_mm512_mul_ps(q16, scale), offset);
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(high, low);
      const __m256i packed =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (Q == kQ4_K ? 16 : 48) + 32 * (s / 2)));
      __m256i q = _mm256_and_si256(_mm256_srli_epi16(packed, 4 * (s % 2)), low4);
      if constexpr (Q == kQ5_K)
        q = _mm256_or_si256(q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1)), 4));
      f(s, (__m512bh)_mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(q), table));
    }, std::make_integer_sequence<int, 8>{});
  }
}

template <int64_t Q, int R>
inline void dot_rows_bf16(const at::BFloat16* x, int64_t ldx, const uint8_t* w, int64_t nblocks, float* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  if constexpr (kSuper<Q>) {
    for (int64_t sb = 0; sb < nblocks / 8; ++sb) {
      const at::BFloat16* xs = x + sb * 8 * kBlock;
      super_block_bf16<Q>(w + sb * kBytes<Q>, [&](int s, __m512bh wb) {
        for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wb, load_bf16(xs + r * ldx + s * kBlock));
      });
    }
  } else {
    for (int64_t b = 0; b < nblocks; ++b) {
      const __m512bh wb = dequant_chunk_bf16<Q>(w, b);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], wb, load_bf16(x + r * ldx + b * kBlock));
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
}

// R rows of x times T dequantized bfloat16 weight rows (row stride K) -> out[r * ldo + t].
template <int R, int T>
inline void tile_bf16(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* out,
                      int64_t ldo) {
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock) {
    __m512bh wt[T];
    for (int t = 0; t < T; ++t) wt[t] = load_bf16(w + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = load_bf16(x + r * ldx + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wt[t], xr);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) out[r * ldo + t] = hsum(acc[r][t]);
}

// The 16 sums of a 4 x 4 tile (v[4 r + t]: row r, output t) in one vector, lane 4 r + t, each
// reduced by the tree `hsum` uses (lane i + lane i+8, then + i+4, + i+2, + i+1): the tree is applied
// to all 16 accumulators at once, two of them per shuffle pair (15 adds instead of 16 x 4), so every
// output gets the same bits as from hsum. IEEE addition is commutative, so which operand comes first
// does not matter.
inline __m512 reduce_4x4(const __m512 (&v)[16]) {
  __m512 l1[8], l2[4], l3[2];
  for (int p = 0; p < 8; ++p)  // [a_i + a_{i+8} | b_i + b_{i+8}], i < 8
    l1[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44),
                          _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xEE));
  for (int p = 0; p < 4; ++p)  // 128-bit quarter q of l2[p] = output 4 p + q's partials i (+) i+4, i < 4
    l2[p] = _mm512_add_ps(_mm512_shuffle_f32x4(l1[2 * p], l1[2 * p + 1], 0x88),
                          _mm512_shuffle_f32x4(l1[2 * p], l1[2 * p + 1], 0xDD));
  for (int p = 0; p < 2; ++p)  // per quarter: [e_0 + e_2, e_1 + e_3, f_0 + f_2, f_1 + f_3]
    l3[p] = _mm512_add_ps(_mm512_shuffle_ps(l2[2 * p], l2[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                          _mm512_shuffle_ps(l2[2 * p], l2[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4 q + s: the sum of v[4 s + q] (outputs of l2[s], quarter q)
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_ps(l3[0], l3[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(transpose, sums);
}

// The 4 x 4 tile, rounded to bfloat16 as a vector (the same bits as hsum + a scalar rounding).
inline void tile_bf16_4x4_store(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K,
                                at::BFloat16* y, int64_t ldy) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock) {
    __m512bh wt[4];
    for (int t = 0; t < 4; ++t) wt[t] = load_bf16(w + t * K + k);
    for (int r = 0; r < 4; ++r) {
      const __m512bh xr = load_bf16(x + r * ldx + k);
      for (int t = 0; t < 4; ++t) acc[4 * r + t] = _mm512_dpbf16_ps(acc[4 * r + t], wt[t], xr);
    }
  }
  const __m256i rounded = (__m256i)_mm512_cvtneps_pbh(reduce_4x4(acc));
  alignas(32) uint64_t rows[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(rows), rounded);
  for (int r = 0; r < 4; ++r) std::memcpy(y + r * ldy, &rows[r], 8);
}

template <int R>
inline void tile_bf16_t(int T, const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K, float* out,
                        int64_t ldo) {
  switch (T) {
    case 4: return tile_bf16<R, 4>(x, ldx, w, K, out, ldo);
    case 3: return tile_bf16<R, 3>(x, ldx, w, K, out, ldo);
    case 2: return tile_bf16<R, 2>(x, ldx, w, K, out, ldo);
    default: return tile_bf16<R, 1>(x, ldx, w, K, out, ldo);
  }
}

inline void tile_bf16_rt(int R, int T, const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t K,
                         float* out, int64_t ldo) {
  switch (R) {
    case 4: return tile_bf16_t<4>(T, x, ldx, w, K, out, ldo);
    case 3: return tile_bf16_t<3>(T, x, ldx, w, K, out, ldo);
    case 2: return tile_bf16_t<2>(T, x, ldx, w, K, out, ldo);
    default: return tile_bf16_t<1>(T, x, ldx, w, K, out, ldo);
  }
}

// Below this many rows the blocks are read directly; from it on, through the scratch tile.
constexpr int64_t kScratchRows = 4;
constexpr int64_t kOutTile = 16;

template <int64_t Q>
void linear_bf16_tiles(const at::BFloat16* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int64_t row_bytes,
                       at::BFloat16* y);

template <int64_t Q>
void linear_bf16_impl(const at::BFloat16* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int64_t row_bytes,
                      at::BFloat16* y) {
  const int64_t nblocks = K / kBlock;
  if (N < kScratchRows) {
    const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, O / (4 * at::get_num_threads())));
    at::parallel_for(0, O, grain, [&](int64_t o_begin, int64_t o_end) {
      float r_out[kScratchRows];
      for (int64_t o = o_begin; o < o_end; ++o) {
        switch (N) {
          case 3: dot_rows_bf16<Q, 3>(x, K, w + o * row_bytes, nblocks, r_out); break;
          case 2: dot_rows_bf16<Q, 2>(x, K, w + o * row_bytes, nblocks, r_out); break;
          default: dot_rows_bf16<Q, 1>(x, K, w + o * row_bytes, nblocks, r_out); break;
        }
        for (int64_t n = 0; n < N; ++n) y[n * O + o] = static_cast<at::BFloat16>(r_out[n]);
      }
    });
    return;
  }
  // Rows of x in chunks that stay in L2 (about 384 KiB) while every output tile passes over them;
  // one pass over all N rows per tile streamed a 2,048-row prefill chunk (2.4 MB at K = 576) from
  // memory once per 16 outputs. A row's arithmetic does not depend on its chunk.
  const int64_t chunk_rows = std::max<int64_t>(64, (384 * 1024 / (2 * K)) / 4 * 4);
  for (int64_t c0 = 0; c0 < N; c0 += chunk_rows)
    linear_bf16_tiles<Q>(x + c0 * K, std::min(chunk_rows, N - c0), K, w, O, row_bytes, y + c0 * O);
}

// Rows x [N, K] (N >= kScratchRows) through scratch tiles of 16 dequantized weight rows.
template <int64_t Q>
void linear_bf16_tiles(const at::BFloat16* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int64_t row_bytes,
                       at::BFloat16* y) {
  const int64_t nblocks = K / kBlock;
  const int64_t tiles = (O + kOutTile - 1) / kOutTile;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    std::vector<at::BFloat16> scratch(kOutTile * K);  // 16 rows: 18 KiB at K = 576, 48 KiB at 1536
    float out[4 * 4];
    for (int64_t tile = t_begin; tile < t_end; ++tile) {
      const int64_t o0 = tile * kOutTile, rows = std::min<int64_t>(kOutTile, O - o0);
      for (int64_t i = 0; i < rows; ++i) {
        at::BFloat16* dst = scratch.data() + i * K;
        if constexpr (kSuper<Q>) {
          for (int64_t sb = 0; sb < nblocks / 8; ++sb)
            super_block_bf16<Q>(w + (o0 + i) * row_bytes + sb * kBytes<Q>, [&](int s, __m512bh wb) {
              _mm512_storeu_si512(reinterpret_cast<void*>(dst + (sb * 8 + s) * kBlock), (__m512i)wb);
            });
        } else {
          for (int64_t b = 0; b < nblocks; ++b)
            _mm512_storeu_si512(reinterpret_cast<void*>(dst + b * kBlock),
                                (__m512i)dequant_chunk_bf16<Q>(w + (o0 + i) * row_bytes, b));
        }
      }
      for (int64_t n0 = 0; n0 < N; n0 += 4) {
        const int R = static_cast<int>(std::min<int64_t>(4, N - n0));
        for (int64_t t0 = 0; t0 < rows; t0 += 4) {
          const int T = static_cast<int>(std::min<int64_t>(4, rows - t0));
          if (R == 4 && T == 4) {
            tile_bf16_4x4_store(x + n0 * K, K, scratch.data() + t0 * K, K, y + n0 * O + o0 + t0, O);
            continue;
          }
          tile_bf16_rt(R, T, x + n0 * K, K, scratch.data() + t0 * K, K, out, 4);
          for (int r = 0; r < R; ++r)
            for (int t = 0; t < T; ++t) y[(n0 + r) * O + o0 + t0 + t] = static_cast<at::BFloat16>(out[r * 4 + t]);
        }
      }
    }
  });
}
#else
#define KVMEM_QUANT_BF16 0
#endif

// Rows of x in tiles of up to kTile share each dequantized weight block; a tile's x rows stay in L1.
constexpr int kTile = 8;

template <int64_t Q>
void dot_tile(const float* x, int64_t ldx, int rows, const uint8_t* w, int64_t nblocks, float* out) {
  switch (rows) {
    case 8: return dot_rows<Q, 8>(x, ldx, w, nblocks, out);
    case 7: return dot_rows<Q, 7>(x, ldx, w, nblocks, out);
    case 6: return dot_rows<Q, 6>(x, ldx, w, nblocks, out);
    case 5: return dot_rows<Q, 5>(x, ldx, w, nblocks, out);
    case 4: return dot_rows<Q, 4>(x, ldx, w, nblocks, out);
    case 3: return dot_rows<Q, 3>(x, ldx, w, nblocks, out);
    case 2: return dot_rows<Q, 2>(x, ldx, w, nblocks, out);
    default: return dot_rows<Q, 1>(x, ldx, w, nblocks, out);
  }
}

template <int64_t Q, typename OutT>
void linear_impl(const float* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int64_t row_bytes,
                 OutT* y) {
  const int64_t nblocks = K / kBlock;
  // Output rows per task: enough work to amortize a task, small enough to spread over the threads.
  const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(64, O / (4 * at::get_num_threads())));
  at::parallel_for(0, O, grain, [&](int64_t o_begin, int64_t o_end) {
    float tile_out[kTile];
    for (int64_t n0 = 0; n0 < N; n0 += kTile) {
      const int rows = static_cast<int>(std::min<int64_t>(kTile, N - n0));
      for (int64_t o = o_begin; o < o_end; ++o) {
        dot_tile<Q>(x + n0 * K, K, rows, w + o * row_bytes, nblocks, tile_out);
        for (int r = 0; r < rows; ++r) y[(n0 + r) * O + o] = static_cast<OutT>(tile_out[r]);
      }
    }
  });
}

void check_weight(const torch::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(),
              "quantized weight must be a contiguous CPU uint8 matrix [out_features, row bytes]");
  const int64_t values = block_values(qtype), bytes = block_bytes(qtype);
  TORCH_CHECK(K > 0 && K % values == 0, "in_features (", K, ") of type ", qtype, " must be a multiple of ", values);
  TORCH_CHECK(w.size(1) == K / values * bytes, "weight rows hold ", w.size(1), " bytes; type ",
              qtype, " with in_features ", K, " needs ", K / values * bytes);
}

// y [N, O] = x [N, K] W^T, W the quantized matrix `w` [O, K / 32 * block bytes] of type `qtype`.
torch::Tensor quant_linear(const torch::Tensor& x_in, const torch::Tensor& w, int64_t qtype) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2, "x must be a CPU matrix [rows, in_features]");
  TORCH_CHECK(x_in.scalar_type() == torch::kFloat || x_in.scalar_type() == torch::kBFloat16,
              "x must be float32 or bfloat16");
  const int64_t N = x_in.size(0), K = x_in.size(1), O = w.size(0);
  check_weight(w, qtype, K);
  torch::Tensor y = torch::empty({N, O}, x_in.options());
  if (N == 0 || O == 0) return y;
#if KVMEM_QUANT_BF16
  if (x_in.scalar_type() == torch::kBFloat16) {
    const torch::Tensor xb = x_in.contiguous();
    const at::BFloat16* xp = xb.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    with_type(qtype, [&](auto q) {
      linear_bf16_impl<decltype(q)::value>(xp, N, K, w.data_ptr<uint8_t>(), O, w.size(1), yp);
    });
    return y;
  }
#endif
  const torch::Tensor x = x_in.to(torch::kFloat).contiguous();  // bfloat16 -> float32 is exact
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int64_t rb = w.size(1);
  auto run = [&](auto* yp) {
    using OutT = std::remove_pointer_t<decltype(yp)>;
    with_type(qtype, [&](auto q) { linear_impl<decltype(q)::value, OutT>(xp, N, K, wp, O, rb, yp); });
  };
  if (y.scalar_type() == torch::kFloat) run(y.data_ptr<float>());
  else run(y.data_ptr<at::BFloat16>());
  return y;
}

// The rows of quantized matrix `w` as float32 [R, K] (the embedding lookup: `w` is the gathered rows).
torch::Tensor dequantize(const torch::Tensor& w, int64_t qtype, int64_t K) {
  check_weight(w, qtype, K);
  const int64_t R = w.size(0), nblocks = K / kBlock, rb = w.size(1);
  torch::Tensor out = torch::empty({R, K}, torch::kFloat);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  with_type(qtype, [&](auto q) {
    at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t b = 0; b < nblocks; ++b) dequant_chunk_scalar<decltype(q)::value>(wp + r * rb, b, op + r * K + b * kBlock);
    });
  });
  return out;
}

bool has_vector_kernel() { return KVMEM_QUANT_AVX512; }

// Whether bfloat16 activations use the AVX512-BF16 path (weights rounded to bfloat16) rather than
// the float32 one (activations widened, weights exact).
bool bf16_weights() { return KVMEM_QUANT_BF16; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x W^T over GGUF-quantized W (Q8_0, Q4_0/1, Q5_0/1, Q4_K, Q5_K, Q6_K)");
  m.def("dequantize", &dequantize, "GGUF-quantized rows as float32");
  m.def("has_vector_kernel", &has_vector_kernel, "whether the AVX-512 path was built");
  m.def("bf16_weights", &bf16_weights, "whether bfloat16 activations meet weights rounded to bfloat16");
}
