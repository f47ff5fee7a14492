// Float/int vectors of the including unit's native width (GCC/Clang vector
// extensions: 16 lanes with AVX-512, 8 with AVX2, 4 otherwise) and the few
// vector math functions the signal kernel needs. Wider-than-native vectors
// would be split by the compiler, and their selects scalarised. Every function
// is static and always inlined, so each ISA's translation unit has its own copy.
// The polynomials are Cephes' expf/logf (about 1 ulp on the ranges used here).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define HW_INLINE static inline __attribute__((always_inline))

namespace haltwise {
namespace simd {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
typedef uint64_t vu64 __attribute__((vector_size(4 * kLanes)));

HW_INLINE vf splat(float x) { return vf{} + x; }
HW_INLINE vi splat_i(int32_t x) { return vi{} + x; }
HW_INLINE vf as_f(vi x) { vf r; std::memcpy(&r, &x, sizeof r); return r; }
HW_INLINE vf as_f(vu x) { vf r; std::memcpy(&r, &x, sizeof r); return r; }
HW_INLINE vi as_i(vf x) { vi r; std::memcpy(&r, &x, sizeof r); return r; }
HW_INLINE vf select(vi mask, vf a, vf b) { return mask ? a : b; }

HW_INLINE vf load_f32(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }

HW_INLINE vf load_bf16(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return as_f(__builtin_convertvector(h, vu) << 16);
}

// IEEE half to float, exact (normals, subnormals, inf, NaN).
HW_INLINE vf load_f16(const uint16_t* p) {
  vh h16;
  std::memcpy(&h16, p, sizeof h16);
  const vu h = __builtin_convertvector(h16, vu);
  const vu sign = (h & 0x8000u) << 16;
  const vu em = h & 0x7fffu;
  // Reinterpreting the shifted exponent+mantissa as a float and scaling by
  // 2^112 re-biases the exponent (15 -> 127) and handles subnormals.
  vf finite = as_f(em << 13) * 0x1p112f;
  vu finite_bits;
  std::memcpy(&finite_bits, &finite, sizeof finite_bits);
  const vu special_bits = (em << 13) | 0x7f800000u;
  const vi is_special = __builtin_convertvector(em >= 0x7c00u, vi);
  return as_f(sign | (is_special ? special_bits : finite_bits));
}

HW_INLINE float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
HW_INLINE uint32_t hmax(vu v) {
  uint32_t m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
HW_INLINE vf max(vf a, vf b) { return a > b ? a : b; }
HW_INLINE vu max(vu a, vu b) { return a > b ? a : b; }
HW_INLINE bool any(vi mask) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask((__m512i)mask, (__m512i)mask) != 0;
#elif defined(__AVX__)
  return _mm256_movemask_ps((__m256)mask) != 0;
#else
  int32_t r = 0;
  for (int i = 0; i < kLanes; ++i) r |= mask[i];
  return r != 0;
#endif
}

// a * b + c: one fused multiply-add where the unit has FMA (AVX2 and AVX-512
// builds), else a multiply and an add. Only the exp/log polynomials use it;
// the Gumbel score x / T + g is written unfused, as every backend computes it.
HW_INLINE vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// Nearest integer (ties: away from zero without SSE4.1, to even with it).
HW_INLINE vf round_nearest(vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vf)_mm256_round_ps((__m256)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  return __builtin_convertvector(__builtin_convertvector(x + (x < 0.0f ? splat(-0.5f) : splat(0.5f)), vi), vf);
#endif
}

// exp(x) for x in [-87, 0] (callers clamp): Cody-Waite reduction by ln 2 and
// Cephes' degree-7 polynomial. NaN in, NaN out.
HW_INLINE vf exp_clamped(vf x) {
  const vf nf = round_nearest(x * 1.44269504088896341f);  // x / ln 2
  x = fmadd(nf, splat(-0.693359375f), x);
  x = fmadd(nf, splat(2.12194440e-4f), x);
  const vf z = x * x;
  vf y = fmadd(splat(1.9875691500e-4f), x, splat(1.3981999507e-3f));
  y = fmadd(y, x, splat(8.3334519073e-3f));
  y = fmadd(y, x, splat(4.1665795894e-2f));
  y = fmadd(y, x, splat(1.6666665459e-1f));
  y = fmadd(y, x, splat(5.0000001201e-1f));
  y = fmadd(y, z, x + 1.0f);
  return y * as_f((__builtin_convertvector(nf, vi) + 127) << 23);
}

// log(x) for positive normal x (Cephes logf).
HW_INLINE vf log_positive(vf x) {
  const vi bits = as_i(x);
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = as_f((bits & 0x007fffff) | 0x3f000000);  // x = m * 2^e, m in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
  e = e + small;  // mask lanes are -1
  m = small ? m + m - 1.0f : m - 1.0f;
  const vf z = m * m;
  vf y = fmadd(splat(7.0376836292e-2f), m, splat(-1.1514610310e-1f));
  y = fmadd(y, m, splat(1.1676998740e-1f));
  y = fmadd(y, m, splat(-1.2420140846e-1f));
  y = fmadd(y, m, splat(1.4249322787e-1f));
  y = fmadd(y, m, splat(-1.6668057665e-1f));
  y = fmadd(y, m, splat(2.0000714765e-1f));
  y = fmadd(y, m, splat(-2.4999993993e-1f));
  y = fmadd(y, m, splat(3.3333331174e-1f));
  y = y * m * z;
  const vf ef = __builtin_convertvector(e, vf);
  y = fmadd(ef, splat(-2.12194440e-4f), y);
  y = fmadd(splat(-0.5f), z, y);
  return fmadd(ef, splat(0.693359375f), m + y);
}

}  // namespace simd
}  // namespace haltwise

namespace haltwise {
namespace simd {

// High and low 32 bits of a * b in every lane: even and odd lanes go through
// the 32x32->64 multiply (vpmuludq) and are blended back.
HW_INLINE void mulhilo(uint32_t a, vu b, vu& hi, vu& lo) {
#if defined(__AVX512F__)
  const __m512i vb = (__m512i)b, va = _mm512_set1_epi64(a);
  const __m512i even = _mm512_mul_epu32(vb, va);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(vb, 32), va);
  hi = (vu)_mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = (vu)_mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
#elif defined(__AVX2__)
  const __m256i vb = (__m256i)b, va = _mm256_set1_epi64x(a);
  const __m256i even = _mm256_mul_epu32(vb, va);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(vb, 32), va);
  hi = (vu)_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = (vu)_mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
#else
  const vu64 wide = (vu64)b;
  const vu64 even = (wide & 0xffffffffull) * uint64_t(a);
  const vu64 odd = (wide >> 32) * uint64_t(a);
  hi = (vu)((even >> 32) | (odd & 0xffffffff00000000ull));
  lo = b * a;
#endif
}

// The ten round keys of Philox 4x32-10 for key (k0, k1), splatted once per row.
struct PhiloxKeys {
  vu k0[10], k1[10];
};
HW_INLINE PhiloxKeys philox_keys(uint32_t k0, uint32_t k1) {
  PhiloxKeys keys;
  for (int round = 0; round < 10; ++round) {
    keys.k0[round] = vu{} + k0;
    keys.k1[round] = vu{} + k1;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return keys;
}

// Philox 4x32-10 on kLanes counters (c0 per lane; c1, c2, c3 shared).
// Must stay bit-identical to haltwise::philox4x32_10 in philox.h.
HW_INLINE void philox(vu c0, uint32_t c1s, uint32_t c2s, uint32_t c3s, const PhiloxKeys& keys, vu out[4]) {
  vu c1 = vu{} + c1s, c2 = vu{} + c2s, c3 = vu{} + c3s;
  for (int round = 0; round < 10; ++round) {
    vu hi0, lo0, hi2, lo2;
    mulhilo(0xD2511F53u, c0, hi0, lo0);
    mulhilo(0xCD9E8D57u, c2, hi2, lo2);
    c0 = hi2 ^ c1 ^ keys.k0[round];
    c2 = hi0 ^ c3 ^ keys.k1[round];
    c1 = lo2;
    c3 = lo0;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Standard Gumbel noise from 32 random bits: u = ((bits >> 8) + 0.5) / 2^24, g = -log(-log u).
HW_INLINE vf gumbel(vu bits) {
  // bits >> 8 < 2^24: the signed conversion is exact and vectorises everywhere.
  const vi top24 = __builtin_convertvector(bits >> 8, vi);
  const vf u = (__builtin_convertvector(top24, vf) + 0.5f) * (1.0f / 16777216.0f);
  return -log_positive(-log_positive(u));
}

}  // namespace simd
}  // namespace haltwise
