// Dispatch of the fused CPU signal pass: picks the instruction set once,
// splits the batch (and, for small batches, each row) across threads, merges
// row segments and turns the running state into the stop signals.
#include "signals_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(HALTWISE_HAVE_X86_ISAS)
#include <cpuid.h>
#endif

#include "float16.h"
#include "signals_cpu_partial.h"
#include "thread_pool.h"

namespace haltwise {
namespace {

using SegmentFn = void (*)(const SignalsArgs&, int64_t, int64_t, int64_t, int, RowPartial*);

struct Isa {
  SegmentFn fn;
  const char* name;
};

#if defined(__x86_64__) && defined(HALTWISE_HAVE_X86_ISAS)
// What this CPU and its operating system can run, read with CPUID and XGETBV
// directly. __builtin_cpu_supports is not used: it reads a table that the
// compiler's runtime library fills in, and some runtimes leave it empty (the
// compiler-rt that zig links, for one, stubs __cpu_indicator_init out), which
// silently sent every call to the generic kernel.
struct X86Features {
  bool avx2 = false;    // AVX2 + FMA + F16C, YMM state enabled by the OS
  bool avx512 = false;  // AVX-512 F/BW/DQ/VL on top of that, ZMM state enabled by the OS
};

X86Features detect_x86() {
  X86Features f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(1, 0, eax, ebx, ecx, edx);
  const bool osxsave = ecx & bit_OSXSAVE, avx = ecx & bit_AVX, fma = ecx & bit_FMA, f16c = ecx & bit_F16C;
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6) == 0x6;    // SSE + AVX registers saved
  const bool zmm_state = (xcr0_lo & 0xe6) == 0xe6;  // ... + opmask, ZMM0-15 high, ZMM16-31
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.avx2 = ymm_state && fma && f16c && (ebx & bit_AVX2);
  f.avx512 = f.avx2 && zmm_state && (ebx & bit_AVX512F) && (ebx & bit_AVX512BW) && (ebx & bit_AVX512DQ) &&
             (ebx & bit_AVX512VL);
  return f;
}
#endif

// The widest instruction set this CPU runs, or a narrower one named by the
// environment variable HALTWISE_CPU_ISA (generic / avx2 / avx512), for tests.
Isa pick_isa() {
  const char* env = std::getenv("HALTWISE_CPU_ISA");
  const std::string wanted = env ? env : "";
#if defined(__x86_64__) && defined(HALTWISE_HAVE_X86_ISAS)
  const X86Features cpu = detect_x86();
  if (cpu.avx512 && (wanted.empty() || wanted == "avx512")) return {isa_avx512::signals_segment, "avx512"};
  if (cpu.avx2 && wanted != "generic") return {isa_avx2::signals_segment, "avx2"};
#endif
  return {isa_generic::signals_segment, "generic"};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

// Below this many logits a call runs on one thread: fork/join would cost more.
constexpr int64_t kMinParallelElements = 1 << 16;
// A row is split across threads only into segments at least this long.
constexpr int64_t kMinSegment = 1 << 14;

float logit_at(const SignalsArgs& a, int64_t row, int64_t col) {
  const int64_t i = row * a.row_stride + col;
  switch (a.dtype) {
    case DType::kFloat32: return static_cast<const float*>(a.logits)[i];
    case DType::kBFloat16: return bfloat16_to_float(static_cast<const uint16_t*>(a.logits)[i]);
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(a.logits)[i]);
  }
  return 0.0f;
}

void finalize(const SignalsArgs& a, int64_t row, const RowPartial& p) {
  int8_t status = p.bad;
  if (!p.any_finite) status |= kStatusNoFinite;
  a.status[row] = status;
  if (status != 0) {  // finite placeholders; the caller ends this sequence
    a.token[row] = 0;
    a.logprob[row] = a.entropy[row] = a.confidence[row] = a.margin[row] = a.topk_conf[row] = 0.0f;
    return;
  }
  const double log_s = std::log(p.sum_exp);
  const double lse = double(p.max) + log_s;
  const int64_t token = a.sample ? p.best_index : p.argmax;
  a.token[row] = token;
  a.logprob[row] = float(double(logit_at(a, row, token)) - lse);
  const double entropy = log_s - p.sum_exp_shift / p.sum_exp;
  a.entropy[row] = float(std::min(std::max(entropy, 0.0), std::log(double(a.vocab))));
  const double p1 = 1.0 / p.sum_exp;
  const double p2 = p.n_top >= 2 ? std::exp(double(p.top[1]) - double(p.max)) / p.sum_exp : 0.0;
  a.confidence[row] = float(p1);
  a.margin[row] = float(p1 - p2);
  if (a.top_k_conf > 0) {
    const int k = std::min(a.top_k_conf, p.n_top);
    double sum = 0.0;
    for (int i = 0; i < k; ++i) sum += p.top[i];
    a.topk_conf[row] = float(lse - sum / k);
  } else {
    a.topk_conf[row] = 0.0f;
  }
}

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("signals_cpu: " + message);
}

}  // namespace

const char* signals_cpu_isa() { return isa().name; }

void compute_signals_cpu(const SignalsArgs& a) {
  check(a.logits != nullptr, "logits must not be null");
  check(a.batch > 0, "batch must be > 0, got " + std::to_string(a.batch));
  check(a.vocab > 0 && a.vocab < (int64_t(1) << 31),
        "vocab must be in [1, 2^31), got " + std::to_string(a.vocab));
  check(a.top_k_conf >= 0 && a.top_k_conf <= kMaxTopKConf,
        "top_k_conf must be in [0, " + std::to_string(kMaxTopKConf) + "], got " +
            std::to_string(a.top_k_conf));
  check(!a.sample || (std::isfinite(a.inv_temperature) && a.inv_temperature > 0.0f),
        "inv_temperature must be finite and > 0 when sampling");
  check(!a.sample || (a.seed != nullptr && a.offset != nullptr), "seed and offset are required when sampling");
  check(a.token && a.logprob && a.entropy && a.confidence && a.margin && a.topk_conf && a.status,
        "every output pointer is required");

  const SegmentFn fn = isa().fn;
  const int k = std::max(a.top_k_conf, 2);
  int threads = a.num_threads > 0 ? a.num_threads : hardware_threads();
  if (a.batch * a.vocab < kMinParallelElements) threads = 1;

  // Split rows only when there are fewer rows than threads.
  int64_t parts = 1;
  if (a.batch < threads) {
    parts = std::min<int64_t>((threads + a.batch - 1) / a.batch, (a.vocab + kMinSegment - 1) / kMinSegment);
    parts = std::max<int64_t>(parts, 1);
  }
  const int64_t segment = ((a.vocab + parts - 1) / parts + 63) / 64 * 64;  // multiple of 64 (Philox blocks)
  parts = (a.vocab + segment - 1) / segment;

  if (parts == 1) {
    // Tasks are blocks of rows, a few per thread, so the pool's per-task
    // overhead stays small and uneven rows still balance.
    const int64_t block = std::max<int64_t>(1, a.batch / (int64_t(threads) * 4));
    parallel_for((a.batch + block - 1) / block, threads, [&](int64_t b) {
      for (int64_t row = b * block; row < std::min(a.batch, (b + 1) * block); ++row) {
        RowPartial p;
        fn(a, row, 0, a.vocab, k, &p);
        finalize(a, row, p);
      }
    });
    return;
  }
  std::vector<RowPartial> partials(size_t(a.batch * parts));
  parallel_for(a.batch * parts, threads, [&](int64_t t) {
    const int64_t row = t / parts, j = t % parts;
    fn(a, row, j * segment, std::min(a.vocab, (j + 1) * segment), k, &partials[size_t(t)]);
  });
  for (int64_t row = 0; row < a.batch; ++row) {
    RowPartial& first = partials[size_t(row * parts)];
    for (int64_t j = 1; j < parts; ++j) merge_partial(first, partials[size_t(row * parts + j)], k);
    finalize(a, row, first);
  }
}

}  // namespace haltwise
