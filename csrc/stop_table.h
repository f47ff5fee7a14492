// Stop states fed by handle, for a caller that owns the batch itself (the vLLM
// logits processor: its rows come and go, and a row may receive zero, one or
// two tokens in a step). Each entry runs the same StopTracker as a Scheduler
// row; feed() steps any number of entries in one call, in order.
// Plain C++17: no pybind11, no torch.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "stop_rules.h"

namespace haltwise {

// One feed() call: n tokens, each for the entry handles[i], with its signals.
// Arrays are read with their strides in bytes (numpy's).
struct FeedInput {
  int64_t n = 0;
  const char* handles = nullptr;  // int64
  const char* tokens = nullptr;   // int64
  const char* signals[5] = {};    // float32: logprob, entropy, confidence, margin, topk_conf
  const char* status = nullptr;   // int8
  int64_t handles_stride = 8, tokens_stride = 8, status_stride = 1;
  int64_t signal_strides[5] = {4, 4, 4, 4, 4};
};

// reasons[i] of feed(): the StopReason code that fired on that token (0 for
// none), or kNotFed when the entry had already stopped and took no token.
constexpr int8_t kNotFed = -1;

class StopTable {
 public:
  // A new running entry; returns its handle (>= 0; handles of removed entries
  // are reused). Throws std::invalid_argument for max_new_tokens outside
  // [1, kMaxNewTokens] or null rules.
  int64_t add(std::shared_ptr<const StopRules> rules, int64_t max_new_tokens);
  // Throws std::invalid_argument for a handle that is not in the table.
  void remove(int64_t handle);
  int64_t num_tokens(int64_t handle) const;  // tokens fed so far
  int64_t size() const { return static_cast<int64_t>(entries_.size() - free_.size()); }

  // Feeds token i to entry handles[i], i in order, writing reasons[i]. An
  // entry stops at the first reason that fires and takes no token after it.
  // Every handle is checked before any is fed (std::invalid_argument naming
  // the index), so a bad call changes nothing.
  void feed(const FeedInput& in, int8_t* reasons);

 private:
  struct Entry {
    std::shared_ptr<const StopRules> rules;
    StopTracker tracker;
    StopReason reason = StopReason::kNone;
    bool used = false;
  };
  bool contains(int64_t handle) const;
  const Entry& at(int64_t handle, const char* what) const;

  std::vector<Entry> entries_;
  std::vector<int64_t> free_;  // handles of removed entries, reused last-in first-out
};

}  // namespace haltwise
