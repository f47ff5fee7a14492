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
  if (config_.window < 1)
    throw std::invalid_argument("StopConfig: window must be >= 1, got " + std::to_string(config_.window));
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
}

bool StopRules::is_eos(int64_t token) const {
  if (eos_sorted_.size() <= 8) {
    for (int64_t id : eos_sorted_)
      if (id == token) return true;
    return false;
  }
  return std::binary_search(eos_sorted_.begin(), eos_sorted_.end(), token);
}

void StopTracker::start(const StopRules* rules, int64_t max_new_tokens) {
  rules_ = rules;
  max_new_tokens_ = max_new_tokens;
  tokens_.clear();
  tokens_.reserve(static_cast<size_t>(std::min<int64_t>(max_new_tokens, 256)));
  const bool record = rules->config().record_signals;
  for (auto& r : recorded_) {
    r.clear();
    if (record) r.reserve(tokens_.capacity());
  }
  num_valid_ = 0;
  sum_topk_conf_ = sum_logprob_ = sum_neg_entropy_ = sum_signal_ = 0;
  ring_.assign(static_cast<size_t>(std::min(rules->config().window, max_new_tokens)), 0.0f);
  window_sum_ = 0;
  min_window_mean_ = 0;
  evaluated_ = false;
  last_entropy_ = 0;
  confident_streak_ = 0;
  steps_below_ = 0;
  would_stop_step_ = -1;
  would_stop_reason_ = StopReason::kNone;
  automaton_state_ = StopSequenceMatcher::kStart;
}

StopReason StopTracker::on_token(int64_t token, const TokenSignals& s) {
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
  if (s.status != 0 || std::isnan(s.logprob) || std::isnan(s.entropy) || std::isnan(s.confidence) ||
      std::isnan(s.margin) || std::isnan(s.topk_conf))
    return StopReason::kInvalidLogits;  // its placeholder signals stay out of the sums

  // Running state.
  num_valid_ = n;
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
  const size_t pos = static_cast<size_t>((n - 1) % window);
  if (n > window) {
    window_sum_ = window_sum_ - static_cast<double>(ring_[pos]) + static_cast<double>(value);
  } else {
    window_sum_ += value;
  }
  ring_[pos] = value;
  if (n % window == 0) {  // re-derive: the running sum never drifts
    double exact = 0;
    for (float v : ring_) exact += v;
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

StopSummary StopTracker::finish() {
  StopSummary out;
  const StopConfig& config = rules_->config();
  out.num_tokens = num_tokens();
  out.tokens = std::move(tokens_);
  out.mean_topk_conf = mean_or_nan(sum_topk_conf_, num_valid_);
  out.mean_logprob = mean_or_nan(sum_logprob_, num_valid_);
  out.mean_neg_entropy = mean_or_nan(sum_neg_entropy_, num_valid_);
  out.mean_signal = mean_or_nan(sum_signal_, num_valid_);
  out.min_window_mean = evaluated_ ? min_window_mean_ : kNaN;
  out.last_window_mean = mean_or_nan(window_sum_, std::min(num_valid_, config.window));
  out.last_entropy = num_valid_ > 0 ? static_cast<double>(last_entropy_) : kNaN;
  out.steps_below_threshold = steps_below_;
  out.would_stop_step = would_stop_step_;
  out.would_stop_reason = would_stop_reason_;
  out.has_signals = config.record_signals;
  if (out.has_signals)
    for (int i = 0; i < kNumRecorded; ++i) out.signals[i] = std::move(recorded_[i]);
  tokens_ = std::vector<int64_t>();
  return out;
}

StopSummary StopTracker::empty_summary(const StopRules& rules) {
  StopSummary out;
  out.mean_topk_conf = out.mean_logprob = out.mean_neg_entropy = out.mean_signal = kNaN;
  out.min_window_mean = out.last_window_mean = out.last_entropy = kNaN;
  out.has_signals = rules.config().record_signals;
  return out;
}

}  // namespace haltwise
