// The per-sequence stop rules: a validated stop configuration (StopRules,
// shared by every sequence that uses it) and the O(1)-per-token running state
// of one sequence (StopTracker), which says after each token whether and why
// the sequence stops. The queueing lives apart, in admission_queue.h.
// Plain C++17: no pybind11, no torch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "stop_sequences.h"

namespace haltwise {

// Why a sequence ended. Codes are the Python StopReason values.
enum class StopReason : int8_t {
  kNone = 0,  // still running (or: no would-stop recorded)
  kEos = 1,
  kMaxTokens = 2,
  kStopSequence = 3,
  kLowConfidence = 4,
  kConfident = 5,
  kGroupConsensus = 6,
  kInvalidLogits = 7,
  kCancelled = 8,
  kOutOfMemory = 9,  // its state could not be allocated when it was admitted
};
constexpr int kNumStopReasons = 10;  // including kNone

// Bounds that keep a sequence's memory bounded: at admission it allocates
// min(window, max_new_tokens) floats for its window and grows with the tokens
// it generates. Requests beyond them are refused at submit (ValueError naming
// the argument). Python: haltwise.scheduler.MAX_NEW_TOKENS / MAX_WINDOW.
constexpr int64_t kMaxNewTokens = int64_t{1} << 24;  // 16,777,216 tokens: far past any context length
constexpr int64_t kMaxWindow = int64_t{1} << 16;     // 65,536 tokens: a 256 KiB window per sequence at most
const char* stop_reason_name(StopReason reason);  // "EOS", ...; "NONE" for kNone

// The signal whose sliding-window mean LOW_CONFIDENCE watches. Every one is
// oriented so that higher means more confident (kNegEntropy is -entropy).
enum class ConfSignal : int8_t { kTopkConf = 0, kLogprob = 1, kConfidence = 2, kMargin = 3, kNegEntropy = 4 };
// "topk_conf", "logprob", "confidence", "margin", "neg_entropy"; throws std::invalid_argument otherwise.
ConfSignal parse_conf_signal(const std::string& name);

// The fields of the Python StopConfig (see python/haltwise/scheduler.py).
struct StopConfig {
  std::vector<int64_t> eos_ids;
  std::vector<std::vector<int64_t>> stop_sequences;
  int64_t min_new_tokens = 0;
  ConfSignal low_conf_signal = ConfSignal::kTopkConf;
  std::optional<double> low_conf_threshold;  // none: LOW_CONFIDENCE off
  int64_t window = 16;
  std::optional<double> confident_entropy_below;
  std::optional<double> confident_margin_above;
  int64_t confident_steps = 0;
  bool shadow = false;
  bool record_signals = false;
};

// A validated StopConfig with its stop-sequence automaton built. Immutable;
// shared (shared_ptr) by the sequences that use it.
class StopRules {
 public:
  // Throws std::invalid_argument naming the bad field.
  explicit StopRules(StopConfig config);

  const StopConfig& config() const { return config_; }
  bool is_eos(int64_t token) const {
    if (eos_sorted_.size() <= 4) {
      for (int64_t id : eos_sorted_)
        if (id == token) return true;
      return false;
    }
    return is_eos_search(token);
  }
  const StopSequenceMatcher& matcher() const { return matcher_; }
  bool has_stop_sequences() const { return has_stop_sequences_; }
  bool low_confidence_on() const { return low_confidence_on_; }
  bool confident_on() const { return confident_on_; }
  // Confidence rules are evaluated from this many generated tokens on.
  int64_t first_evaluated_token() const { return first_evaluated_token_; }

 private:
  bool is_eos_search(int64_t token) const;

  StopConfig config_;
  std::vector<int64_t> eos_sorted_;  // sorted, unique
  StopSequenceMatcher matcher_;
  // The config, flattened for the per-token path.
  bool has_stop_sequences_ = false;
  bool low_confidence_on_ = false;
  bool confident_on_ = false;
  int64_t first_evaluated_token_ = 1;

  friend class StopTracker;
};

// The decode-step outputs of one row (docs/signals.md).
struct TokenSignals {
  float logprob;
  float entropy;
  float confidence;
  float margin;
  float topk_conf;
  int8_t status;  // 0 = valid
};

// Order of the recorded signals in StopSummary::signals.
enum RecordedSignal : int { kRecTopkConf = 0, kRecLogprob, kRecEntropy, kRecConfidence, kRecMargin, kNumRecorded };
extern const char* const kRecordedSignalNames[kNumRecorded];

// What a finished sequence reports about its stop signals. Means are over the
// tokens with valid signals (all of them, except the last token of a sequence
// ended by INVALID_LOGITS); NaN when there is none.
struct StopSummary {
  int64_t num_tokens = 0;
  std::vector<int64_t> tokens;  // exactly the tokens stepped in
  double mean_topk_conf;
  double mean_logprob;
  double mean_neg_entropy;
  double mean_signal;      // of config.low_conf_signal, oriented
  double min_window_mean;  // min over the steps where the confidence rules were evaluated; NaN if none
  double last_window_mean; // window mean after the last valid token; NaN if none
  double last_entropy;     // entropy of the last valid token; NaN if none
  int64_t steps_below_threshold = 0;  // evaluated steps whose window mean was < the threshold
  int64_t would_stop_step = -1;       // shadow mode: num_tokens at the first would-stop, else -1
  StopReason would_stop_reason = StopReason::kNone;
  // config.record_signals: kNumRecorded vectors (RecordedSignal order), one
  // entry per generated token, raw values; empty otherwise.
  std::vector<std::vector<float>> signals;
  bool has_signals() const { return !signals.empty(); }
};

// The running stop state of one sequence. start() before the first token.
class StopTracker {
 public:
  void start(const StopRules* rules, int64_t max_new_tokens);

  // Appends one generated token and its signals, updates the running state and
  // evaluates the rules in order: INVALID_LOGITS, EOS, STOP_SEQUENCE,
  // MAX_TOKENS, then (from rules.first_evaluated_token() tokens on)
  // LOW_CONFIDENCE and CONFIDENT. Returns the first that fires, or kNone.
  // Shadow mode records the confidence rules instead of firing them. O(1)
  // (the automaton: amortised).
  StopReason on_token(int64_t token, const TokenSignals& s);

  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }

  // Asks the cache for what the next on_token() will touch outside this object.
  void prefetch() const {
    __builtin_prefetch(tokens_.data() + tokens_.size(), 1);
    __builtin_prefetch(ring_ + ring_pos_, 1);
  }

  // The summary of the sequence; moves the tokens and recorded signals out.
  StopSummary finish();

  // The summary of a request that ended before it generated anything.
  static StopSummary empty_summary(const StopRules& rules);

 private:
  // Hot fields first: a row's step touches the first few cache lines only.
  const StopRules* rules_ = nullptr;
  std::vector<int64_t> tokens_;
  float* ring_ = nullptr;  // ring_storage_.data()
  int64_t ring_pos_ = 0;   // (n - 1) % W for the next valid token n
  int32_t automaton_state_ = StopSequenceMatcher::kStart;
  int64_t max_new_tokens_ = 0;
  // Sliding window of the chosen signal: ring_[(n - 1) % W] holds the value of
  // valid token n; window_sum_ is a running double sum, re-derived from the
  // ring (indices 0..W-1, in order) every W tokens so that it never drifts.
  double window_sum_ = 0;
  double sum_topk_conf_ = 0, sum_logprob_ = 0, sum_neg_entropy_ = 0, sum_signal_ = 0;
  int64_t confident_streak_ = 0;
  double min_window_mean_ = 0;
  float last_entropy_ = 0;
  bool evaluated_ = false;
  bool invalid_ = false;  // the last token's signals were invalid (and the sequence ended)
  StopReason would_stop_reason_ = StopReason::kNone;
  int64_t steps_below_ = 0;
  int64_t would_stop_step_ = -1;
  std::vector<float> ring_storage_;  // [min(W, max_new_tokens)]
  std::unique_ptr<std::vector<float>[]> recorded_;  // [kNumRecorded], with record_signals only
};

// The per-token path, here so that it inlines into the scheduler's row loop.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline StopReason StopTracker::on_token(int64_t token, const TokenSignals& s) {
  const StopConfig& config = rules_->config();
  tokens_.push_back(token);
  const int64_t n = static_cast<int64_t>(tokens_.size());
  if (config.record_signals) {
    recorded_[kRecTopkConf].push_back(s.topk_conf);
    recorded_[kRecLogprob].push_back(s.logprob);
    recorded_[kRecEntropy].push_back(s.entropy);
    recorded_[kRecConfidence].push_back(s.confidence);
    recorded_[kRecMargin].push_back(s.margin);
  }
  // One branch for the six tests (x != x: NaN); no short circuit on purpose.
  const bool invalid = (s.status != 0) | (s.logprob != s.logprob) | (s.entropy != s.entropy) |
                       (s.confidence != s.confidence) | (s.margin != s.margin) | (s.topk_conf != s.topk_conf);
  if (invalid) {
    invalid_ = true;
    return StopReason::kInvalidLogits;  // its placeholder signals stay out of the sums
  }

  // Running state.
  const float neg_entropy = -s.entropy;
  sum_topk_conf_ += s.topk_conf;
  sum_logprob_ += s.logprob;
  sum_neg_entropy_ += neg_entropy;
  float value = s.topk_conf;
  switch (config.low_conf_signal) {
    case ConfSignal::kTopkConf: value = s.topk_conf; break;
    case ConfSignal::kLogprob: value = s.logprob; break;
    case ConfSignal::kConfidence: value = s.confidence; break;
    case ConfSignal::kMargin: value = s.margin; break;
    case ConfSignal::kNegEntropy: value = neg_entropy; break;
  }
  sum_signal_ += value;
  const int64_t window = config.window;
  if (n > window) {
    window_sum_ = window_sum_ - static_cast<double>(ring_[ring_pos_]) + static_cast<double>(value);
  } else {
    window_sum_ += value;
  }
  ring_[ring_pos_] = value;
  if (++ring_pos_ == window) {  // every W tokens: re-derive, so the running sum never drifts
    ring_pos_ = 0;
    double exact = 0;
    for (float v : ring_storage_) exact += v;
    window_sum_ = exact;
  }
  last_entropy_ = s.entropy;
  const bool confident_on = rules_->confident_on();
  if (confident_on) {
    const bool calm = (!config.confident_entropy_below || static_cast<double>(s.entropy) < *config.confident_entropy_below) &&
                      (!config.confident_margin_above || static_cast<double>(s.margin) > *config.confident_margin_above);
    confident_streak_ = calm ? confident_streak_ + 1 : 0;
  }

  // The rules, in order; the first that fires ends the sequence.
  if (rules_->is_eos(token)) return StopReason::kEos;
  if (rules_->has_stop_sequences() && rules_->matcher().advance(automaton_state_, token))
    return StopReason::kStopSequence;
  if (n >= max_new_tokens_) return StopReason::kMaxTokens;
  if (n < rules_->first_evaluated_token()) return StopReason::kNone;

  const double window_mean = window_sum_ / static_cast<double>(std::min(n, window));
  if (!evaluated_ || window_mean < min_window_mean_) min_window_mean_ = window_mean;
  evaluated_ = true;
  if (config.low_conf_threshold && window_mean < *config.low_conf_threshold) {
    ++steps_below_;
    if (!config.shadow) return StopReason::kLowConfidence;
    if (would_stop_step_ < 0) {
      would_stop_step_ = n;
      would_stop_reason_ = StopReason::kLowConfidence;
    }
  }
  if (confident_on && confident_streak_ >= config.confident_steps) {
    if (!config.shadow) return StopReason::kConfident;
    if (would_stop_step_ < 0) {
      would_stop_step_ = n;
      would_stop_reason_ = StopReason::kConfident;
    }
  }
  return StopReason::kNone;
}

}  // namespace haltwise
