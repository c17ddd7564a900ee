// The decoder layer's small operations, fused for the CPU: each is one pass over its rows instead
// of 4-8 torch ops (every one of which is a dispatch, an OpenMP fork-join and a pass over memory).
// At a decode step of 64 sequences the activations are ~74 KB per tensor, so the per-op overhead,
// not the arithmetic, is what these remove.
//
// Each function rounds to the model's dtype where the torch reference (`kvmem.models.fused`'s
// fallbacks, which are the order HF uses) rounds, and computes in float32 between; only the order
// of the additions inside a row's sum of squares differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_avx512.h"

namespace {

// Loops that sit inside AT_DISPATCH's macro argument use _Pragma: a #pragma can't appear in a macro
// argument.

// float <-> element type on raw bits for bfloat16, so that the loops vectorize.
template <typename T>
inline float load(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <typename T>
inline void store(T* p, int64_t i, float v) { p[i] = static_cast<T>(v); }
template <>
inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}
template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  // Round to nearest even, as c10 does; NaN stays a (quiet) NaN.
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
}
// The value after rounding to T (what a torch op in dtype T would have stored).
template <typename T>
inline float round_to(float v) {
  T tmp[1];
  store(tmp, 0, v);
  return load(tmp, 0);
}
template <>
inline float round_to<float>(float v) { return v; }

// Rows per task: small batches (a decode step) run on the calling thread, where a fork-join would
// cost more than the work.
inline int64_t grain(int64_t width) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(width, 1)); }

// HF's RMSNorm: in float32, x * rsqrt(mean(x^2) + eps), rounded to T, then times the weight in T.
template <typename T>
inline void rms_norm_row(const T* x, const T* w, T* out, int64_t n, float eps) {
  float sum = 0.f;
_Pragma("omp simd reduction(+ : sum)")
  for (int64_t i = 0; i < n; ++i) sum += load(x, i) * load(x, i);
  const float inv = 1.f / std::sqrt(sum / static_cast<float>(n) + eps);
_Pragma("omp simd")
  for (int64_t i = 0; i < n; ++i) store(out, i, load(w, i) * round_to<T>(load(x, i) * inv));
}

#if KVMEM_HAVE_AVX512
// silu(x) * u, 16 lanes at a time: silu(x) = x * sigmoid(x), with sigmoid from e = exp(-|x|) (never
// overflows): 1/(1+e) for x >= 0, e/(1+e) below.
template <typename T>
inline void silu_mul_avx512(const T* g, const T* u, T* o, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 x = load16<T>(g + i, live);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sigmoid = _mm512_div_ps(_mm512_mask_blend_ps(negative, one, e), _mm512_add_ps(one, e));
    const __m512 silu = round16<T>(_mm512_mul_ps(x, sigmoid));
    store16<T>(o + i, _mm512_mul_ps(silu, load16<T>(u + i, live)), live);
  }
}

// The first index of the row's largest value; of its first NaN if it has one (torch.argmax's rule).
template <typename T>
inline int64_t argmax_avx512(const T* row, int64_t n) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  __mmask16 any_nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = load16<T>(row + i, live);
    any_nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
    top = _mm512_mask_max_ps(top, live, top, v);
  }
  const float best = _mm512_reduce_max_ps(top);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = load16<T>(row + i, live);
    const __mmask16 hit = any_nan ? _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q)
                                  : _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(best), _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;
}
#endif

// `vector` false: the portable loop even where the AVX-512 one is built (the tests compare them).
template <typename T>
inline void silu_mul_row(const T* g, const T* u, T* o, int64_t n, bool vector) {
#if KVMEM_HAVE_AVX512
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (vector) return silu_mul_avx512(g, u, o, n);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float x = load(g, i);
    store(o, i, round_to<T>(x / (1.f + std::exp(-x))) * load(u, i));
  }
}

template <typename T>
inline int64_t argmax_row(const T* row, int64_t n, bool vector) {
#if KVMEM_HAVE_AVX512
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (vector) return argmax_avx512(row, n);
  }
#endif
  float top = -INFINITY;
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = load(row, i);
    if (v != v) return i;
    if (v > top) top = v, best = i;
  }
  return best;
}

}  // namespace

// out = rms_norm(x) * weight; x [rows, n] with n contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.numel() == x.size(1) &&
              weight.scalar_type() == x.scalar_type(), "rms_norm: x [rows, n] (n contiguous), weight [n], one dtype");
  auto out = torch::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kvmem_rms_norm", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(px + r * ld, pw, po + r * n, n, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x (rounded to the dtype, as `residual + x` would be); returns rms_norm(residual) * weight.
torch::Tensor add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && residual.is_contiguous() && x.sizes() == residual.sizes() && x.stride(1) == 1 &&
              weight.is_contiguous() && weight.numel() == x.size(1) && x.scalar_type() == residual.scalar_type() &&
              weight.scalar_type() == x.scalar_type(), "add_rms_norm_: x, residual [rows, n] (residual contiguous)");
  auto out = torch::empty_like(residual);
  const int64_t rows = x.size(0), n = x.size(1), ld = x.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kvmem_add_rms_norm", [&] {
    const scalar_t *px = x.data_ptr<scalar_t>(), *pw = weight.data_ptr<scalar_t>();
    scalar_t *ph = residual.data_ptr<scalar_t>(), *po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* h = ph + r * n;
        const scalar_t* xr = px + r * ld;
_Pragma("omp simd")
        for (int64_t i = 0; i < n; ++i) store(h, i, load(h, i) + load(xr, i));
        rms_norm_row(h, pw, po + r * n, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

// SwiGLU: gate_up [rows, 2i] (gate first) -> silu(gate) * up [rows, i], silu rounded to the dtype
// before the product, as `F.silu(gate) * up` rounds.
// vector=false: the portable loop even where AVX-512 is built in (the tests compare the two).
torch::Tensor silu_mul(torch::Tensor gate_up, bool vector) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up [rows, 2 * i], last dimension contiguous");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2, ld = gate_up.stride(0);
  auto out = torch::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "kvmem_silu_mul", [&] {
    const scalar_t* pg = gate_up.data_ptr<scalar_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(2 * n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t *g = pg + r * ld, *u = g + n;
        scalar_t* o = po + r * n;
        silu_mul_row(g, u, o, n, vector);
      }
    });
  });
  return out;
}

// RoPE in place on x [T, heads, dim] (dim contiguous; any row and head strides, so q and k can be
// rotated inside the fused q,k,v projection's output): x = x * cos + [x2, x1] * signed_sin, with
// cos, signed_sin [T, dim]; each product rounded to the dtype, then their sum, as the torch ops do.
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rope_: x [T, heads, dim], dim contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && signed_sin.is_contiguous() && cos.sizes() == signed_sin.sizes() &&
              cos.size(0) == x.size(0) && cos.size(1) == x.size(2) && cos.scalar_type() == x.scalar_type(),
              "rope_: cos, signed_sin [T, dim] contiguous, in x's dtype");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), half = D / 2;
  const int64_t st = x.stride(0), sh = x.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kvmem_rope", [&] {
    scalar_t* px = x.data_ptr<scalar_t>();
    const scalar_t *pc = cos.data_ptr<scalar_t>(), *ps = signed_sin.data_ptr<scalar_t>();
    at::parallel_for(0, T, grain(H * D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t *c = pc + t * D, *s = ps + t * D;
        for (int64_t h = 0; h < H; ++h) {
          scalar_t* v = px + t * st + h * sh;
          // Both halves are read before either is written.
_Pragma("omp simd")
          for (int64_t i = 0; i < half; ++i) {
            const float a = load(v, i), b = load(v, i + half);
            store(v, i, round_to<scalar_t>(a * load(c, i)) + round_to<scalar_t>(b * load(s, i)));
            store(v, i + half, round_to<scalar_t>(b * load(c, i + half)) + round_to<scalar_t>(a * load(s, i + half)));
          }
        }
      }
    });
  });
}

// Row-wise argmax (first index on ties, as torch.argmax), reading bfloat16 as float32 in place:
// torch's bfloat16 argmax is a scalar loop on this CPU, and widening the whole tensor first costs a
// pass and an allocation.
torch::Tensor argmax_rows(torch::Tensor logits, bool vector) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "argmax_rows: logits [rows, vocab], vocab contiguous");
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  auto out = torch::empty({rows}, logits.options().dtype(torch::kInt64));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "kvmem_argmax_rows", [&] {
    const scalar_t* pl = logits.data_ptr<scalar_t>();
    int64_t* po = out.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        po[r] = argmax_row(pl + r * ld, n, vector);
      }
    });
  });
  return out;
}

// This step's K and V into the caches: k, v [T, kv_heads, dim] (dim contiguous, any other strides),
// caches [kv_heads, blocks, block_size, dim] (dim contiguous), token t to flat slot slots[t] =
// block * block_size + offset. The same as two index_copy_ calls on flattened views, in one pass.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1, "write_kv: k, v [T, kv_heads, dim]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
              k_cache.stride(3) == 1 && k_cache.size(0) == k.size(1) && k_cache.size(3) == k.size(2),
              "write_kv: caches [kv_heads, blocks, block_size, dim] matching k");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type(), "write_kv: one dtype");
  auto slot = slots.to(torch::kInt64).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == k.size(0), "write_kv: one slot per token");
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), bs = k_cache.size(2), capacity = k_cache.size(1) * bs;
  const int64_t* ps = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(ps[t] >= 0 && ps[t] < capacity, "write_kv: slot ", ps[t], " out of range");
  const int64_t bytes = D * k.element_size();
  char *kc = static_cast<char*>(k_cache.data_ptr()), *vc = static_cast<char*>(v_cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  const int64_t es = k.element_size();
  at::parallel_for(0, T, grain(H * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = ps[t] / bs, offset = ps[t] % bs;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = (h * k_cache.stride(0) + block * k_cache.stride(1) + offset * k_cache.stride(2)) * es;
        std::memcpy(kc + dst, kp + (t * k.stride(0) + h * k.stride(1)) * es, bytes);
        std::memcpy(vc + dst, vp + (t * v.stride(0) + h * v.stride(1)) * es, bytes);
      }
    }
  });
}

// One (token, head) row of x quantized into the cache as kvmem.attention.kv_quant.quantize does, bit
// for bit: int8 symmetric with scale = max(absmax / 127, FLT_MIN) and round-half-to-even of x / scale
// (torch.round); float8 clamped to the format's range, then converted by c10 (as tensor.to does).
template <typename In, typename Out>
void write_rows_quantized(const torch::Tensor& x, torch::Tensor& cache, float* scales, const int64_t* scale_strides,
                          const int64_t* ps) {
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2), bs = cache.size(2);
  const In* xp = x.data_ptr<In>();
  Out* cp = reinterpret_cast<Out*>(cache.data_ptr());
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), cs0 = cache.stride(0), cs1 = cache.stride(1),
                cs2 = cache.stride(2);
  at::parallel_for(0, T, grain(H * D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = ps[t] / bs, offset = ps[t] % bs;
      for (int64_t h = 0; h < H; ++h) {
        const In* src = xp + t * xs0 + h * xs1;
        Out* dst = cp + h * cs0 + block * cs1 + offset * cs2;
        if constexpr (std::is_same_v<Out, int8_t>) {
          float amax = 0.f;
          for (int64_t d = 0; d < D; ++d) {
            row[d] = load(src, d);
            amax = std::max(amax, std::fabs(row[d]));
          }
          const float scale = std::max(amax / 127.0f, std::numeric_limits<float>::min());
          for (int64_t d = 0; d < D; ++d) {
            const float q = std::nearbyint(row[d] / scale);
            dst[d] = static_cast<int8_t>(std::min(std::max(q, -127.0f), 127.0f));
          }
          scales[h * scale_strides[0] + block * scale_strides[1] + offset * scale_strides[2]] = scale;
        } else {
          const float limit = static_cast<float>(std::numeric_limits<Out>::max());
          for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<Out>(std::min(std::max(load(src, d), -limit), limit));
        }
      }
    }
  });
}

template <typename In>
void write_quantized_one(const torch::Tensor& x, torch::Tensor& cache, const c10::optional<torch::Tensor>& scales,
                         const int64_t* ps) {
  switch (cache.scalar_type()) {
    case torch::kChar: {
      TORCH_CHECK(scales.has_value() && scales->scalar_type() == torch::kFloat && scales->dim() == 3 &&
                  scales->size(0) == cache.size(0) && scales->size(1) == cache.size(1) &&
                  scales->size(2) == cache.size(2), "write_kv_quantized: int8 needs float32 scales [heads, blocks, block_size]");
      const int64_t strides[3] = {scales->stride(0), scales->stride(1), scales->stride(2)};
      write_rows_quantized<In, int8_t>(x, cache, scales->data_ptr<float>(), strides, ps);
      break;
    }
    case torch::kFloat8_e4m3fn:
      write_rows_quantized<In, c10::Float8_e4m3fn>(x, cache, nullptr, nullptr, ps);
      break;
    case torch::kFloat8_e5m2:
      write_rows_quantized<In, c10::Float8_e5m2>(x, cache, nullptr, nullptr, ps);
      break;
    default:
      TORCH_CHECK(false, "write_kv_quantized: a cache of int8, float8_e4m3fn or float8_e5m2");
  }
}

// This step's K,V quantized into the block-addressed caches in one pass (kv_quant.write_quantized's
// torch ops take several passes per layer: float copy, absmax, divide, round, clamp, convert, scatter).
void write_kv_quantized(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                        torch::Tensor slots, c10::optional<torch::Tensor> k_scales,
                        c10::optional<torch::Tensor> v_scales) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
              k.scalar_type() == v.scalar_type(), "write_kv_quantized: k, v [T, kv_heads, dim] of one dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.stride(3) == 1 &&
              v_cache.stride(3) == 1 && k_cache.size(0) == k.size(1) && k_cache.size(3) == k.size(2) &&
              k_cache.scalar_type() == v_cache.scalar_type(),
              "write_kv_quantized: caches [kv_heads, blocks, block_size, dim] matching k");
  auto slot = slots.to(torch::kInt64).contiguous();
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == k.size(0), "write_kv_quantized: one slot per token");
  const int64_t capacity = k_cache.size(1) * k_cache.size(2);
  const int64_t* ps = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(ps[t] >= 0 && ps[t] < capacity, "write_kv_quantized: slot ", ps[t], " out of range");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "write_kv_quantized", [&] {
    write_quantized_one<scalar_t>(k, k_cache, k_scales, ps);
    write_quantized_one<scalar_t>(v, v_cache, v_scales, ps);
  });
}

void register_fused(pybind11::module& m) {
  m.def("write_kv", &write_kv, "this step's K,V into the block-addressed caches");
  m.def("write_kv_quantized", &write_kv_quantized, "this step's K,V quantized into the caches (and int8's scales)",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"),
        py::arg("k_scales") = py::none(), py::arg("v_scales") = py::none());
  m.def("rms_norm", &rms_norm, "RMSNorm (HF's rounding order)");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += x; RMSNorm(residual)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate,up projection", py::arg("gate_up"),
        py::arg("vector") = true);
  m.def("rope_", &rope_, "rotary embedding in place");
  m.def("argmax_rows", &argmax_rows, "row-wise argmax", py::arg("logits"), py::arg("vector") = true);
}
