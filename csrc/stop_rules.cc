#include "stop_rules.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <utility>

namespace haltwise {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double mean_or_nan(double sum, int64_t count) { return count > 0 ? sum / static_cast<double>(count) : kNaN; }

void check_finite(const std::optional<double>& value, const char* field) {
  if (value && !std::isfinite(*value))
    throw std::invalid_argument(std::string("StopConfig: ") + field + " must be a finite number or None, got " +
                                std::to_string(*value));
}

}  // namespace

const char* stop_reason_name(StopReason reason) {
  switch (reason) {
    case StopReason::kNone: return "NONE";
    case StopReason::kEos: return "EOS";
    case StopReason::kMaxTokens: return "MAX_TOKENS";
    case StopReason::kStopSequence: return "STOP_SEQUENCE";
    case StopReason::kLowConfidence: return "LOW_CONFIDENCE";
    case StopReason::kConfident: return "CONFIDENT";
    case StopReason::kGroupConsensus: return "GROUP_CONSENSUS";
    case StopReason::kInvalidLogits: return "INVALID_LOGITS";
    case StopReason::kCancelled: return "CANCELLED";
    case StopReason::kOutOfMemory: return "OUT_OF_MEMORY";
  }
  return "UNKNOWN";
}

ConfSignal parse_conf_signal(const std::string& name) {
  if (name == "topk_conf") return ConfSignal::kTopkConf;
  if (name == "logprob") return ConfSignal::kLogprob;
  if (name == "confidence") return ConfSignal::kConfidence;
  if (name == "margin") return ConfSignal::kMargin;
  if (name == "neg_entropy") return ConfSignal::kNegEntropy;
  throw std::invalid_argument(
      "StopConfig: low_conf_signal must be one of 'topk_conf', 'logprob', 'confidence', 'margin', 'neg_entropy', "
      "got '" + name + "'");
}

const char* const kRecordedSignalNames[kNumRecorded] = {"topk_conf", "logprob", "entropy", "confidence", "margin"};

StopRules::StopRules(StopConfig config) : config_(std::move(config)) {
  if (config_.min_new_tokens < 0)
    throw std::invalid_argument("StopConfig: min_new_tokens must be >= 0, got " +
                                std::to_string(config_.min_new_tokens));
  if (config_.window < 1 || config_.window > kMaxWindow)
    throw std::invalid_argument("StopConfig: window must be in [1, " + std::to_string(kMaxWindow) + "], got " +
                                std::to_string(config_.window));
  if (config_.confident_steps < 0)
    throw std::invalid_argument("StopConfig: confident_steps must be >= 0, got " +
                                std::to_string(config_.confident_steps));
  check_finite(config_.low_conf_threshold, "low_conf_threshold");
  check_finite(config_.confident_entropy_below, "confident_entropy_below");
  check_finite(config_.confident_margin_above, "confident_margin_above");
  if (config_.confident_entropy_below && *config_.confident_entropy_below < 0)
    throw std::invalid_argument("StopConfig: confident_entropy_below must be >= 0 (entropy is), got " +
                                std::to_string(*config_.confident_entropy_below));
  if (config_.confident_margin_above && *config_.confident_margin_above < 0)
    throw std::invalid_argument("StopConfig: confident_margin_above must be >= 0 (margin is), got " +
                                std::to_string(*config_.confident_margin_above));
  eos_sorted_ = config_.eos_ids;
  std::sort(eos_sorted_.begin(), eos_sorted_.end());
  eos_sorted_.erase(std::unique(eos_sorted_.begin(), eos_sorted_.end()), eos_sorted_.end());
  matcher_ = StopSequenceMatcher(config_.stop_sequences);
  has_stop_sequences_ = !matcher_.empty();
  low_confidence_on_ = config_.low_conf_threshold.has_value();
  confident_on_ = config_.confident_steps > 0 &&
                  (config_.confident_entropy_below.has_value() || config_.confident_margin_above.has_value());
  first_evaluated_token_ = std::max<int64_t>(config_.min_new_tokens, 1);
}

bool StopRules::is_eos_search(int64_t token) const {
  return std::binary_search(eos_sorted_.begin(), eos_sorted_.end(), token);
}

void StopTracker::start(const StopRules* rules, int64_t max_new_tokens) {
  const StopConfig& config = rules->config();
  rules_ = rules;
  max_new_tokens_ = max_new_tokens;
  tokens_.clear();
  tokens_.reserve(static_cast<size_t>(std::min<int64_t>(max_new_tokens, 256)));
  if (config.record_signals) {
    if (!recorded_) recorded_.reset(new std::vector<float>[kNumRecorded]);
    for (int i = 0; i < kNumRecorded; ++i) {
      recorded_[i].clear();
      recorded_[i].reserve(tokens_.capacity());
    }
  }
  ring_storage_.assign(static_cast<size_t>(std::min(config.window, max_new_tokens)), 0.0f);
  ring_ = ring_storage_.data();
  ring_pos_ = 0;
  automaton_state_ = StopSequenceMatcher::kStart;
  window_sum_ = 0;
  sum_topk_conf_ = sum_logprob_ = sum_neg_entropy_ = sum_signal_ = 0;
  confident_streak_ = 0;
  min_window_mean_ = 0;
  last_entropy_ = 0;
  evaluated_ = false;
  invalid_ = false;
  would_stop_reason_ = StopReason::kNone;
  steps_below_ = 0;
  would_stop_step_ = -1;
}

StopSummary StopTracker::finish() {
  StopSummary out;
  const StopConfig& config = rules_->config();
  const int64_t num_valid = num_tokens() - (invalid_ ? 1 : 0);
  out.num_tokens = num_tokens();
  out.tokens = std::move(tokens_);
  out.mean_topk_conf = mean_or_nan(sum_topk_conf_, num_valid);
  out.mean_logprob = mean_or_nan(sum_logprob_, num_valid);
  out.mean_neg_entropy = mean_or_nan(sum_neg_entropy_, num_valid);
  out.mean_signal = mean_or_nan(sum_signal_, num_valid);
  out.min_window_mean = evaluated_ ? min_window_mean_ : kNaN;
  out.last_window_mean = mean_or_nan(window_sum_, std::min(num_valid, config.window));
  out.last_entropy = num_valid > 0 ? static_cast<double>(last_entropy_) : kNaN;
  out.steps_below_threshold = steps_below_;
  out.would_stop_step = would_stop_step_;
  out.would_stop_reason = would_stop_reason_;
  if (config.record_signals) {
    out.signals.resize(kNumRecorded);
    for (int i = 0; i < kNumRecorded; ++i) out.signals[static_cast<size_t>(i)] = std::move(recorded_[i]);
  }
  tokens_ = std::vector<int64_t>();
  return out;
}

StopSummary StopTracker::empty_summary(const StopRules& rules) {
  StopSummary out;
  out.mean_topk_conf = out.mean_logprob = out.mean_neg_entropy = out.mean_signal = kNaN;
  out.min_window_mean = out.last_window_mean = out.last_entropy = kNaN;
  if (rules.config().record_signals) out.signals.resize(kNumRecorded);
  return out;
}

}  // namespace haltwise
