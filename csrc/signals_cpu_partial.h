// The running state of one row segment of the fused signal pass, how two
// segments merge, and the per-ISA entry points that fill it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "signals_cpu.h"

namespace haltwise {

// Helpers in headers shared by the per-ISA translation units are `static`:
// each unit keeps its own copy, so the linker can never hand generic code an
// AVX-512 compiled body.

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowPartial {
  float max = kNegInf;       // largest logit seen (NaN and +inf excluded)
  int64_t argmax = 0;        // lowest column holding max
  double sum_exp = 0.0;      // sum_j exp(x_j - max)
  double sum_exp_shift = 0.0;  // sum_j exp(x_j - max) * (x_j - max)
  int n_top = 0;             // entries in top (finite logits only)
  float top[kMaxTopKConf];   // largest logits, descending; first n_top valid
  float best_score = kNegInf;  // Gumbel race: max_j x_j / T + g_j
  int64_t best_index = 0;
  int8_t bad = 0;            // kStatusNaN | kStatusPosInf seen in the segment
  bool any_finite = false;   // only filled when bad != 0
};

// Inserts x into the descending list top[0, n) keeping at most k entries;
// equal values keep their order (a later equal value goes after).
static inline void top_insert(float* top, int& n, int k, float x) {
  int pos = n < k ? n : k - 1;
  while (pos > 0 && top[pos - 1] < x) {
    if (pos < k) top[pos] = top[pos - 1];
    --pos;
  }
  // When the list is full, the last entry is dropped by the shift above.
  if (pos < k) top[pos] = x;
  if (n < k) ++n;
}

// The threshold a logit must beat to enter a full list (-inf while not full).
static inline float top_threshold(const float* top, int n, int k) { return n < k ? kNegInf : top[k - 1]; }

// Rescales (sum_exp, sum_exp_shift) from base max `from` to base `to` >= from.
static inline void rebase_sums(double& sum_exp, double& sum_exp_shift, float from, float to) {
  if (from == kNegInf || sum_exp == 0.0) {
    sum_exp = 0.0;
    sum_exp_shift = 0.0;
    return;
  }
  const double delta = double(to) - double(from);
  const double r = std::exp(-delta);
  sum_exp_shift = r * (sum_exp_shift - delta * sum_exp);
  sum_exp = r * sum_exp;
}

// a <- merge(a, b) where b covers columns after a's.
static inline void merge_partial(RowPartial& a, const RowPartial& b, int k) {
  a.bad |= b.bad;
  a.any_finite = a.any_finite || b.any_finite;
  if (b.max > a.max) {
    rebase_sums(a.sum_exp, a.sum_exp_shift, a.max, b.max);
    a.sum_exp += b.sum_exp;
    a.sum_exp_shift += b.sum_exp_shift;
    a.max = b.max;
    a.argmax = b.argmax;
  } else {
    double s = b.sum_exp, t = b.sum_exp_shift;
    rebase_sums(s, t, b.max, a.max);
    a.sum_exp += s;
    a.sum_exp_shift += t;
  }
  for (int i = 0; i < b.n_top; ++i) {
    if (b.top[i] <= top_threshold(a.top, a.n_top, k)) break;
    top_insert(a.top, a.n_top, k, b.top[i]);
  }
  if (b.best_score > a.best_score) {
    a.best_score = b.best_score;
    a.best_index = b.best_index;
  }
}

// One segment [begin, end) of one row; begin is a multiple of 64.
// k = number of top logits to keep (max(top_k_conf, 2)).
#define HALTWISE_DECLARE_SEGMENT(ns)                                                      \
  namespace ns {                                                                          \
  void signals_segment(const SignalsArgs& args, int64_t row, int64_t begin, int64_t end, \
                       int k, RowPartial* out);                                           \
  }
HALTWISE_DECLARE_SEGMENT(isa_generic)
HALTWISE_DECLARE_SEGMENT(isa_avx2)
HALTWISE_DECLARE_SEGMENT(isa_avx512)
#undef HALTWISE_DECLARE_SEGMENT

}  // namespace haltwise
