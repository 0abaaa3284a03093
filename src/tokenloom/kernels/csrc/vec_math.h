// AVX2 helpers shared by the kernels: horizontal sum and max, a vector exp, and
// 8 cache elements (float32, float16 widened with F16C, or int8 converted) as
// float32 lanes.
#pragma once

#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

namespace tokenloom_vec {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The largest of the 8 lanes.
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// The sum of the 8 lanes.
inline float hsum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// exp(x) to about 1 ulp. Writes x = n ln2 + r with |r| <= ln2 / 2, takes e^r
// from its degree-7 Taylor polynomial (the first dropped term, r^8 / 8!, is
// below 1e-8) and builds 2^n directly in the exponent bits. Inputs are clamped
// to [-87, 88.7]: e^-87 is still a normal float and next to any term near 1 it
// vanishes; above 88.7 the result is +inf, as exp's is. NaN propagates.
inline __m256 exp_ps(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693145752f);  // few mantissa bits: n * ln2_hi is exact
  const __m256 ln2_lo = _mm256_set1_ps(1.42860677e-6f);
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // NaN in the second operand is kept
  x = _mm256_min_ps(_mm256_set1_ps(88.7f), x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  // Horner on 1 + r + r^2/2! + ... + r^7/7!.
  const float inv_factorials[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 1.0f / 2, 1.0f, 1.0f};
  __m256 p = _mm256_set1_ps(inv_factorials[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(inv_factorials[i]));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

}  // namespace tokenloom_vec
