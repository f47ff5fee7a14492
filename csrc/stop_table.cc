#include "stop_table.h"

#include <stdexcept>
#include <string>
#include <utility>

namespace haltwise {

int64_t StopTable::add(std::shared_ptr<const StopRules> rules, int64_t max_new_tokens) {
  if (!rules) throw std::invalid_argument("StopTable.add: stop rules must not be null");
  if (max_new_tokens < 1 || max_new_tokens > kMaxNewTokens)
    throw std::invalid_argument("StopTable.add: max_new_tokens must be in [1, " + std::to_string(kMaxNewTokens) +
                                "], got " + std::to_string(max_new_tokens));
  int64_t handle;
  if (free_.empty()) {
    entries_.emplace_back();
    handle = static_cast<int64_t>(entries_.size()) - 1;
  } else {
    handle = free_.back();
    free_.pop_back();
  }
  Entry& e = entries_[static_cast<size_t>(handle)];
  e.rules = std::move(rules);
  e.tracker.start(e.rules.get(), max_new_tokens);
  e.reason = StopReason::kNone;
  e.used = true;
  return handle;
}

bool StopTable::contains(int64_t handle) const {
  return handle >= 0 && handle < static_cast<int64_t>(entries_.size()) && entries_[static_cast<size_t>(handle)].used;
}

const StopTable::Entry& StopTable::at(int64_t handle, const char* what) const {
  if (!contains(handle))
    throw std::invalid_argument(std::string("StopTable.") + what + ": handle " + std::to_string(handle) +
                                " is not in the table");
  return entries_[static_cast<size_t>(handle)];
}

void StopTable::remove(int64_t handle) {
  at(handle, "remove");
  Entry& e = entries_[static_cast<size_t>(handle)];
  e.tracker = StopTracker();  // frees its tokens and window now
  e.rules.reset();
  e.used = false;
  free_.push_back(handle);
}

int64_t StopTable::num_tokens(int64_t handle) const { return at(handle, "num_tokens").tracker.num_tokens(); }

void StopTable::feed(const FeedInput& in, int8_t* reasons) {
  auto handle_at = [&](int64_t i) { return *reinterpret_cast<const int64_t*>(in.handles + i * in.handles_stride); };
  for (int64_t i = 0; i < in.n; ++i) {
    const int64_t h = handle_at(i);
    if (!contains(h))
      throw std::invalid_argument("StopTable.feed: handles[" + std::to_string(i) + "] = " + std::to_string(h) +
                                  " is not in the table");
  }
  for (int64_t i = 0; i < in.n; ++i) {
    Entry& e = entries_[static_cast<size_t>(handle_at(i))];
    if (e.reason != StopReason::kNone) {
      reasons[i] = kNotFed;
      continue;
    }
    TokenSignals s;
    s.logprob = *reinterpret_cast<const float*>(in.signals[0] + i * in.signal_strides[0]);
    s.entropy = *reinterpret_cast<const float*>(in.signals[1] + i * in.signal_strides[1]);
    s.confidence = *reinterpret_cast<const float*>(in.signals[2] + i * in.signal_strides[2]);
    s.margin = *reinterpret_cast<const float*>(in.signals[3] + i * in.signal_strides[3]);
    s.topk_conf = *reinterpret_cast<const float*>(in.signals[4] + i * in.signal_strides[4]);
    s.status = *reinterpret_cast<const int8_t*>(in.status + i * in.status_stride);
    const int64_t token = *reinterpret_cast<const int64_t*>(in.tokens + i * in.tokens_stride);
    e.reason = e.tracker.on_token(token, s);
    reasons[i] = static_cast<int8_t>(e.reason);
  }
}

}  // namespace haltwise
