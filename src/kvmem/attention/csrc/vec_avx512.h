// AVX-512 helpers shared by the CPU kernels. KVMEM_HAVE_AVX512 says whether this build has them
// (AVX-512 F, BW and VL, from -march=native); without it the kernels use their portable loops.
#pragma once
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KVMEM_HAVE_AVX512 1
#else
#define KVMEM_HAVE_AVX512 0
#endif

#if KVMEM_HAVE_AVX512
#include <immintrin.h>

#include <c10/util/BFloat16.h>

#include <type_traits>

// e^x for x <= 0 (scores minus their maximum), to within ~2 ulp: x = n ln2 + r, |r| <= ln2/2, a
// degree-6 polynomial for e^r (Cephes' expf coefficients), and 2^n applied by vscalefps, which also
// takes e^x to 0 where it underflows. glibc's scalar expf was a quarter of the kernel's time.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// 16 elements (fewer under `live`) of T as float32, and back, rounding to T (bfloat16: to nearest
// even, as c10 does).
template <typename T>
inline __m512 load16(const T* p, __mmask16 live);
template <>
inline __m512 load16<float>(const float* p, __mmask16 live) { return _mm512_maskz_loadu_ps(live, p); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p, __mmask16 live) {
  const __m256i bits = _mm256_maskz_loadu_epi16(live, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
template <typename T>
inline void store16(T* p, __m512 v, __mmask16 live);
template <>
inline void store16<float>(float* p, __m512 v, __mmask16 live) { _mm512_mask_storeu_ps(p, live, v); }
template <>
inline void store16<c10::BFloat16>(c10::BFloat16* p, __m512 v, __mmask16 live) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_mask_storeu_epi16(p, live, _mm512_cvtepi32_epi16(rounded));
}
// v rounded to T's precision (bfloat16: to nearest even), kept as float32.
template <typename T>
inline __m512 round16(__m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
}
#endif  // KVMEM_HAVE_AVX512
