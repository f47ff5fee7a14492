// The weighted answer vote of one group of traces (parallel samples of one
// problem) and the rule that says when it is settled. Plain C++17.
#pragma once

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace haltwise {

class GroupVote {
 public:
  void add(int64_t answer_key, double weight) {
    ++votes_;
    total_ += weight;
    for (auto& entry : tally_)
      if (entry.first == answer_key) {
        entry.second += weight;
        return;
      }
    tally_.emplace_back(answer_key, weight);
  }

  // answer key -> summed weight, in the order the keys were first reported.
  const std::vector<std::pair<int64_t, double>>& tally() const { return tally_; }
  int64_t votes() const { return votes_; }

  // The key with the largest weight, ties to the key reported first (as
  // haltwise.voting.weighted_vote); none before any vote.
  std::optional<int64_t> leader() const {
    std::optional<int64_t> best;
    double best_weight = 0;
    for (const auto& [key, weight] : tally_)
      if (!best || weight > best_weight) {
        best = key;
        best_weight = weight;
      }
    return best;
  }

  // Settled when the leader can no longer be overturned by the `remaining`
  // members that may still vote (weight <= max_weight each): leader >
  // runner-up + remaining * max_weight; or, with a consensus fraction, once
  // votes >= min_votes and leader / total >= fraction.
  bool settled(int64_t remaining, double max_weight, const std::optional<double>& fraction,
               int64_t min_votes) const {
    double first = 0, second = 0;
    for (const auto& entry : tally_) {
      const double w = entry.second;
      if (w > first) {
        second = first;
        first = w;
      } else if (w > second) {
        second = w;
      }
    }
    if (first > second + static_cast<double>(remaining) * max_weight) return true;
    return fraction && votes_ >= min_votes && total_ > 0 && first / total_ >= *fraction;
  }

 private:
  std::vector<std::pair<int64_t, double>> tally_;
  int64_t votes_ = 0;
  double total_ = 0;
};

}  // namespace haltwise
