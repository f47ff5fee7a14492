// The per-sequence stop rules: a validated stop configuration (StopRules,
// shared by every sequence that uses it) and the O(1)-per-token running state
// of one sequence (StopTracker), which says after each token whether and why
// the sequence stops. The queueing lives apart, in admission_queue.h.
// Plain C++17: no pybind11, no torch.
#pragma once

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
};
constexpr int kNumStopReasons = 9;  // including kNone
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
  bool is_eos(int64_t token) const;
  const StopSequenceMatcher& matcher() const { return matcher_; }
  bool has_stop_sequences() const { return !matcher_.empty(); }
  bool low_confidence_on() const { return config_.low_conf_threshold.has_value(); }
  bool confident_on() const {
    return config_.confident_steps > 0 &&
           (config_.confident_entropy_below.has_value() || config_.confident_margin_above.has_value());
  }
  // Confidence rules are evaluated from this many generated tokens on.
  int64_t first_evaluated_token() const { return config_.min_new_tokens > 1 ? config_.min_new_tokens : 1; }

 private:
  StopConfig config_;
  std::vector<int64_t> eos_sorted_;  // sorted, unique
  StopSequenceMatcher matcher_;
};

// The decode-step outputs of one row (DESIGN.md, "Stop signals").
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
  bool has_signals = false;                       // config.record_signals
  std::vector<float> signals[kNumRecorded];       // one entry per generated token, raw values
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

  // The summary of the sequence; moves the tokens and recorded signals out.
  StopSummary finish();

  // The summary of a request that ended before it generated anything.
  static StopSummary empty_summary(const StopRules& rules);

 private:
  const StopRules* rules_ = nullptr;
  int64_t max_new_tokens_ = 0;
  std::vector<int64_t> tokens_;
  std::vector<float> recorded_[kNumRecorded];
  int64_t num_valid_ = 0;  // tokens whose signals entered the sums
  double sum_topk_conf_ = 0, sum_logprob_ = 0, sum_neg_entropy_ = 0, sum_signal_ = 0;
  // Sliding window of the chosen signal: ring[(n - 1) % W] holds the value of
  // valid token n; window_sum_ is a running double sum, re-derived from the
  // ring (indices 0..W-1, in order) every W tokens so that it never drifts.
  std::vector<float> ring_;
  double window_sum_ = 0;
  double min_window_mean_ = 0;
  bool evaluated_ = false;
  float last_entropy_ = 0;
  int64_t confident_streak_ = 0;
  int64_t steps_below_ = 0;
  int64_t would_stop_step_ = -1;
  StopReason would_stop_reason_ = StopReason::kNone;
  int32_t automaton_state_ = StopSequenceMatcher::kStart;
};

}  // namespace haltwise
