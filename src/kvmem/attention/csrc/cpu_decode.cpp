// Decode attention on the CPU, straight from the KV cache: one query token per sequence, keys and
// values read in place through a block table (paged: many blocks; virtual/static: one block that is
// the sequence's whole slot). Nothing is gathered or copied, and no key past a sequence's length is
// touched, so a virtual slot's unmapped tail is never read.
//
// Work item = (sequence, KV head): the query heads of a GQA group share every key row they read.
// Scores and softmax in float32; values accumulated in float32; one cast at the end.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

}  // namespace

// q [B, H, D] (D contiguous); caches [KVH, blocks, block_size, D] (D contiguous, any other strides);
// block_tables [B, W] int64; context_lens [B] int64 (each >= 1). Returns [B, H, D] in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
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
    auto run = D == 64 ? decode<scalar_t, 64> : D == 128 ? decode<scalar_t, 128> : decode<scalar_t, 0>;
    run(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
        tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, KVH, D,
        k_cache.size(2), tables.size(1), q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "decode attention over a block-addressed KV cache (CPU)");
}
