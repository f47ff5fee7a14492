// Scalar bfloat16 / IEEE half to float conversions, exact for every input
// (subnormals, inf, NaN). The vector versions live in simd.h.
#pragma once

#include <cstdint>
#include <cstring>

namespace haltwise {

static inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float bfloat16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;
  if (em >= 0x7c00u) return bits_to_float(sign | (em << 13) | 0x7f800000u);  // inf, NaN
  // Scaling by 2^112 re-biases the exponent (15 -> 127) and handles subnormals.
  const float magnitude = bits_to_float(em << 13) * 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  return bits_to_float(bits | sign);
}

}  // namespace haltwise
