// The fused CPU stop-signal kernel: one pass over each row of logits gives the
// next token and the stop signals of docs/signals.md. Plain C++17: no
// pybind11, no torch. The caller owns every buffer.
#pragma once

#include <cstdint>

namespace haltwise {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Status bits of a row (int8 in the outputs). 0 = valid.
constexpr int8_t kStatusNaN = 1;       // the row holds a NaN
constexpr int8_t kStatusPosInf = 2;    // the row holds +inf
constexpr int8_t kStatusNoFinite = 4;  // no entry of the row is finite

// top_k_conf may be 0 (off) .. kMaxTopKConf.
constexpr int kMaxTopKConf = 128;

struct SignalsArgs {
  const void* logits = nullptr;  // [batch, vocab], element (r, j) at r * row_stride + j
  DType dtype = DType::kFloat32;
  int64_t batch = 0;
  int64_t vocab = 0;
  int64_t row_stride = 0;  // in elements, >= vocab
  bool sample = false;          // false: greedy argmax; true: Gumbel-max sampling
  float inv_temperature = 0.0f;  // float32(1 / T), rounded once by the caller (all backends alike)
  int top_k_conf = 0;
  const int64_t* seed = nullptr;    // [batch], read only when temperature > 0
  const int64_t* offset = nullptr;  // [batch]
  bool salt_with_row = false;       // mix the row index into the counter (scalar seed/offset)
  // outputs, each [batch]
  int64_t* token = nullptr;
  float* logprob = nullptr;
  float* entropy = nullptr;
  float* confidence = nullptr;
  float* margin = nullptr;
  float* topk_conf = nullptr;
  int8_t* status = nullptr;
  int num_threads = 0;  // 0: all available
};

// Throws std::invalid_argument naming the bad field.
void compute_signals_cpu(const SignalsArgs& args);

// The instruction set the dispatcher picked on this machine ("avx512", "avx2", "generic").
const char* signals_cpu_isa();

}  // namespace haltwise
