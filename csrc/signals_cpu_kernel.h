// The fused signal pass over one row segment, written once and compiled once
// per instruction set: each signals_cpu_<isa>.cc defines HALTWISE_ISA_NS and
// includes this file with its own -m flags. Nothing here may have external
// linkage outside that namespace (no std:: templates either): the linker
// would otherwise be free to hand the generic path an AVX-512 body.
//
// Per chunk of kChunk columns, three sweeps over data that stays in L1:
//   1. max, NaN/+inf detection, and "does any logit beat the top-k threshold"
//      (the rare hits go through a scalar insertion into the sorted list);
//   2. online sum of exp(x - max) and of exp(x - max) * (x - max) (entropy);
//   3. when sampling, the Gumbel race argmax_j x_j / T + g_j (scaled so it
//      cannot overflow: score_scales below), Philox bits
//      generated 64 columns at a time (philox.h documents the mapping), the
//      logs skipped where a cheap bound shows no column can win.
#ifndef HALTWISE_ISA_NS
#error "define HALTWISE_ISA_NS before including signals_cpu_kernel.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "float16.h"
#include "philox.h"
#include "signals_cpu_partial.h"
#include "simd.h"

namespace haltwise {
namespace HALTWISE_ISA_NS {
namespace {

using namespace simd;

constexpr int kChunk = 256;  // 1 KiB of float32: three sweeps stay in L1
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Element type, -inf bit pattern, vector and scalar loads for each dtype.
template <DType D>
struct Elem;
template <>
struct Elem<DType::kFloat32> {
  using T = float;
  HW_INLINE T neg_inf() { return -kPosInf; }
  HW_INLINE vf load(const T* p) { return load_f32(p); }
  HW_INLINE float scalar(T x) { return x; }
};
template <>
struct Elem<DType::kBFloat16> {
  using T = uint16_t;
  HW_INLINE T neg_inf() { return 0xff80u; }
  HW_INLINE vf load(const T* p) { return load_bf16(p); }
  HW_INLINE float scalar(T x) { return bfloat16_to_float(x); }
};
template <>
struct Elem<DType::kFloat16> {
  using T = uint16_t;
  HW_INLINE T neg_inf() { return 0xfc00u; }
  HW_INLINE vf load(const T* p) { return load_f16(p); }
  HW_INLINE float scalar(T x) { return half_to_float(x); }
};

// Upper bounds of a Gumbel score fl(x + g(bits) * noise_scale) for x <= xmax
// (gmax: the bound of g, times noise_scale), used only to
// skip work that cannot change the race (so they may be loose, never low).
// g(u) = -log(-log u) <= -log(1 - u), and 1 - u = (m + 0.5) / 2^24 with
// m = ~bits >> 8, so g <= (24 - floor(log2 m)) * ln 2 (m = 0: 25 * ln 2).
// The margin covers the float32 logs of simd::gumbel (errors ~1e-7) and the
// final float32 rounding.
HW_INLINE float score_bound(float xmax, float gmax) {
  const float bound = xmax + gmax;
  return bound + 1e-5f + 1e-6f * (bound < 0 ? -bound : bound);
}
HW_INLINE float gumbel_bound(uint32_t bits) {
  const uint32_t m = ~bits >> 8;
  const int floor_log2 = m == 0 ? -1 : 31 - __builtin_clz(m);
  return float(24 - floor_log2) * 0.693147181f;
}
constexpr float kGumbelMax = 17.3286795f;  // g at the largest uniform, 1 - 2^-25

// The race scores x * x_scale + g * noise_scale, the same order as x / T + g
// but never overflowing float32: x_scale = inv_t and noise_scale = 1 when
// inv_t <= 1; otherwise noise_scale = 2^-e, the power of two that brings
// x_scale = inv_t * noise_scale into [0.5, 1). The distribution and why:
// score_scales in python/haltwise/signals_types.py (every backend alike).
struct ScoreScales {
  float x, noise;
};
HW_INLINE ScoreScales score_scales(float inv_t) {
  if (!(inv_t > 1.0f)) return {inv_t, 1.0f};
  int exponent = 0;
  std::frexp(inv_t, &exponent);  // inv_t = m * 2^exponent, m in [0.5, 1)
  const float noise = std::ldexp(1.0f, -exponent);
  return {inv_t * noise, noise};  // both exact
}

// The slow path for a segment holding NaN or +inf: its outputs will be
// placeholders, only the status bits matter.
template <DType D>
void classify_bad_segment(const typename Elem<D>::T* x, int64_t begin, int64_t end, RowPartial* p) {
  for (int64_t j = begin; j < end; ++j) {
    const float v = Elem<D>::scalar(x[j]);
    if (std::isnan(v)) p->bad |= kStatusNaN;
    else if (v == kPosInf) p->bad |= kStatusPosInf;
    else if (v != -kPosInf) p->any_finite = true;
  }
}

template <DType D>
void segment(const SignalsArgs& a, int64_t row, int64_t begin, int64_t end, int k, RowPartial* out) {
  using E = Elem<D>;
  using T = typename E::T;
  const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
  RowPartial& p = *out;
  p = RowPartial{};
  float thr = kNegInf;  // a logit must beat this to enter the top-k list

  // Gumbel race state, lane-wise; reduced after the last chunk.
  const bool sample = a.sample;
  const ScoreScales scales = score_scales(a.inv_temperature);
  const vf x_scale = splat(scales.x), noise_scale = splat(scales.noise);
  vf best = splat(kNegInf);
  vi best_col = splat_i(0);
  float best_all = kNegInf;  // max over the lanes of best
  vi lane = splat_i(0);
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  uint32_t key0 = 0, key1 = 0, off_lo = 0, off_hi = 0, salt = 0;
  if (sample) {
    const uint64_t seed = uint64_t(a.seed[row]), offset = uint64_t(a.offset[row]);
    key0 = uint32_t(seed);
    key1 = uint32_t(seed >> 32);
    off_lo = uint32_t(offset);
    off_hi = uint32_t(offset >> 32);
    salt = a.salt_with_row ? uint32_t(row) : 0u;
  }
  const PhiloxKeys keys = philox_keys(key0, key1);

  alignas(64) T tail[kChunk];
  double lanes_s[16] = {}, lanes_t[16] = {};  // the segment's sums, per accumulator lane
  for (int64_t c = begin; c < end; c += kChunk) {
    const int n = end - c < kChunk ? int(end - c) : kChunk;
    const T* src = x + c;
    if (n < kChunk) {  // pad the last chunk with -inf so every sweep is full-width
      for (int i = 0; i < kChunk; ++i) tail[i] = E::neg_inf();
      std::memcpy(tail, src, sizeof(T) * n);
      src = tail;
    }

    // Sweep 1: max and the top-k threshold test. (NaN is ignored by the max;
    // NaN and +inf turn sweep 2's sums non-finite, which is where they are caught.)
    vf vmax = splat(kNegInf);
    vi above = splat_i(0);
    const vf vthr = splat(thr);
#pragma GCC unroll 4
    for (int i = 0; i < kChunk; i += kLanes) {
      const vf v = E::load(src + i);
      vmax = v > vmax ? v : vmax;
      above |= v > vthr;
    }
    if (any(above)) {  // rare once the list is full: visit only the vectors with a hit
      for (int i = 0; i < kChunk; i += kLanes) {
        if (!any(E::load(src + i) > splat(thr))) continue;
        for (int j = i; j < i + kLanes; ++j) {
          const float v = E::scalar(src[j]);  // padding is -inf: never inserted
          if (v > thr) {
            top_insert(p.top, p.n_top, k, v);
            thr = top_threshold(p.top, p.n_top, k);
          }
        }
      }
    }
    const float cmax = hmax(vmax);
    if (cmax > p.max) {
      int first = 0;
      while (E::scalar(src[first]) != cmax) ++first;
      p.argmax = c + first;
      for (int j = 0; j < 16; ++j) rebase_sums(lanes_s[j], lanes_t[j], p.max, cmax);
      p.max = cmax;
    }
    if (p.max == kNegInf) {  // everything masked so far (or NaN, which only a scan can tell)
      for (int i = 0; i < n; ++i) {
        if (std::isnan(E::scalar(src[i]))) {
          classify_bad_segment<D>(x, begin, end, &p);
          return;
        }
      }
      continue;
    }

    // Sweep 2: sum of exp(x - max) and of exp(x - max) * (x - max), in 16
    // float lanes per chunk (kParts vectors of kLanes, whatever the width),
    // then into 16 double lanes for the segment: the same additions in the
    // same order on every ISA.
    constexpr int kParts = 16 / kLanes;
    vf s[kParts], t[kParts];
    for (int h = 0; h < kParts; ++h) s[h] = t[h] = splat(0.0f);
    const vf vm = splat(p.max), floor = splat(-87.0f), zero = splat(0.0f);
#pragma GCC unroll 2
    for (int i = 0; i < kChunk; i += 16) {
      for (int h = 0; h < kParts; ++h) {
        const vf d = E::load(src + i + h * kLanes) - vm;
        const vi masked = d < floor;  // -inf logits, and terms below float range: exactly 0
        const vf dc = masked ? floor : d;  // NaN stays NaN (NaN < floor is false)
        const vf e = masked ? zero : exp_clamped(dc);
        s[h] += e;
        t[h] = fmadd(e, dc, t[h]);  // e * (x - max), never 0 * -inf
      }
    }
    alignas(64) float chunk_s[16], chunk_t[16];
    std::memcpy(chunk_s, s, sizeof chunk_s);
    std::memcpy(chunk_t, t, sizeof chunk_t);
    double chunk_total = 0.0;
    for (int j = 0; j < 16; ++j) {
      lanes_s[j] += chunk_s[j];
      lanes_t[j] += chunk_t[j];
      chunk_total += chunk_s[j] + chunk_t[j];
    }
    if (!std::isfinite(chunk_total)) {  // a NaN or +inf logit
      classify_bad_segment<D>(x, begin, end, &p);
      return;
    }

    // Sweep 3: the Gumbel race, 64 columns at a time. Column 64b + 16w + j
    // takes word w of counter 16b + j (philox.h): kLanes counters per call,
    // each call's word w covering kLanes consecutive columns.
    if (sample) {
      constexpr int kCalls = 16 / kLanes;
      for (int i = 0; i < kChunk; i += 64) {
        const int64_t col = c + i;  // a multiple of 64
        vu words[kCalls][4];
        vf scaled[kCalls][4];
        vf xm = splat(kNegInf);
        for (int h = 0; h < kCalls; ++h)
          for (int w = 0; w < 4; ++w) {
            scaled[h][w] = E::load(src + i + 16 * w + h * kLanes) * x_scale;
            xm = max(xm, scaled[h][w]);
          }
        // Skip work when no column of the group can win: first without the
        // bits (peaked distributions), then with their max (g increases with
        // the bits), before the two logs per column.
        const float xmax = hmax(xm);
        if (score_bound(xmax, kGumbelMax * scales.noise) <= best_all) continue;
        vu bm = vu{};
        for (int h = 0; h < kCalls; ++h) {
          const vu counter = __builtin_convertvector(lane, vu) + uint32_t((col >> 6) * 16 + h * kLanes);
          philox(counter, off_lo, off_hi, salt, keys, words[h]);
          for (int w = 0; w < 4; ++w) bm = max(bm, words[h][w]);
        }
        if (score_bound(xmax, gumbel_bound(hmax(bm)) * scales.noise) <= best_all) continue;
        for (int h = 0; h < kCalls; ++h)
          for (int w = 0; w < 4; ++w) {
            const vf score = scaled[h][w] + gumbel(words[h][w]) * noise_scale;  // no FMA: -ffp-contract=off
            const vi better = score > best;
            best = better ? score : best;
            best_col = better ? lane + int32_t(col + 16 * w + h * kLanes) : best_col;
          }
        best_all = hmax(best);
      }
    }
  }
  for (int j = 0; j < 16; ++j) {  // lane order: the same on every ISA
    p.sum_exp += lanes_s[j];
    p.sum_exp_shift += lanes_t[j];
  }
  p.any_finite = p.max > kNegInf;
  if (sample) {
    for (int i = 0; i < kLanes; ++i) {
      if (best[i] > p.best_score || (best[i] == p.best_score && best_col[i] < p.best_index)) {
        p.best_score = best[i];
        p.best_index = best_col[i];
      }
    }
  }
}

}  // namespace

void signals_segment(const SignalsArgs& args, int64_t row, int64_t begin, int64_t end, int k,
                     RowPartial* out) {
  switch (args.dtype) {
    case DType::kFloat32: return segment<DType::kFloat32>(args, row, begin, end, k, out);
    case DType::kFloat16: return segment<DType::kFloat16>(args, row, begin, end, k, out);
    case DType::kBFloat16: return segment<DType::kBFloat16>(args, row, begin, end, k, out);
  }
}

}  // namespace HALTWISE_ISA_NS
}  // namespace haltwise
