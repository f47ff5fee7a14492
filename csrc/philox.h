// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11), bit-identical to Random123's philox4x32_R<10> and to Triton's
// tl.philox, plus the mapping from its bits to the Gumbel noise of the sampler.
//
// The sampling contract shared by every backend (native, triton, torch);
// docs/sampling.md states it with known-answer vectors. For column j:
//   key     = the row's seed, 64 bits: k0 = low 32 bits, k1 = high 32 bits
//   counter = ((j >> 6) * 16 + (j & 15), offset low 32 bits, offset high 32 bits, salt)
//   bits    = word (j >> 4) & 3 of philox4x32_10(counter, key)
//   u       = ((bits >> 8) + 0.5) * 2^-24        exactly representable, in (0, 1)
//   g       = -log(-log(u))                      standard Gumbel, float32
// So column 64b + 16w + l takes word w of counter 16b + l: one Philox call
// feeds four columns 16 apart (l, l + 16, l + 32, l + 48 of a 64-column
// block), and 16 consecutive columns take the same word of 16 consecutive
// counters (one SIMD vector of counters per word).
// salt is the row index when seed and offset were both given as scalars (so
// rows differ) and 0 when each row has its own seed and offset (so a row's
// draw depends only on its own seed, offset and logits: batch-invariant).
#pragma once

#include <cstdint>

namespace haltwise {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

struct Philox4 {
  uint32_t v[4];
};

static inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(kPhiloxRoundA) * c0;
    const uint64_t p2 = uint64_t(kPhiloxRoundB) * c2;
    const uint32_t n0 = uint32_t(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p2);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return {{c0, c1, c2, c3}};
}

// The uniform in (0, 1) drawn from 32 random bits: the top 24 bits, centred.
static inline float bits_to_uniform(uint32_t bits) {
  return (float(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

}  // namespace haltwise
