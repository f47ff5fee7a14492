#include "stop_sequences.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>

namespace haltwise {

StopSequenceMatcher::StopSequenceMatcher() : nodes_(1) {}

StopSequenceMatcher::StopSequenceMatcher(const std::vector<std::vector<int64_t>>& sequences) {
  // 1. The trie, with ordered children while it is being built.
  std::vector<std::map<int64_t, int32_t>> children(1);
  std::vector<bool> terminal(1, false);
  for (size_t i = 0; i < sequences.size(); ++i) {
    const std::vector<int64_t>& sequence = sequences[i];
    if (sequence.empty())
      throw std::invalid_argument("stop_sequences: every stop sequence must hold at least one token, sequence " +
                                  std::to_string(i) + " is empty");
    int32_t node = kStart;
    for (int64_t token : sequence) {
      auto found = children[node].find(token);
      if (found == children[node].end()) {
        const int32_t created = static_cast<int32_t>(children.size());
        children[node].emplace(token, created);
        children.emplace_back();
        terminal.push_back(false);
        node = created;
      } else {
        node = found->second;
      }
    }
    terminal[node] = true;
  }

  // 2. Flat, sorted edge lists.
  nodes_.resize(children.size());
  for (size_t n = 0; n < children.size(); ++n) {
    nodes_[n].first_edge = static_cast<uint32_t>(edges_.size());
    nodes_[n].num_edges = static_cast<uint32_t>(children[n].size());
    for (const auto& [token, target] : children[n]) edges_.push_back(Edge{token, target});
  }

  // 3. Failure links and accept flags, breadth first so a node's fail target
  // (a shorter path) is complete before the node itself.
  std::vector<int32_t> order{kStart};
  nodes_[kStart].accept = terminal[kStart];
  for (size_t head = 0; head < order.size(); ++head) {
    const int32_t node = order[head];
    for (const auto& [token, target] : children[node]) {
      int32_t fail = kStart;
      if (node != kStart) {
        int32_t state = nodes_[node].fail;
        for (;;) {
          const int32_t next = child(state, token);
          if (next >= 0) {
            fail = next;
            break;
          }
          if (state == kStart) break;
          state = nodes_[state].fail;
        }
      }
      nodes_[target].fail = fail;
      nodes_[target].accept = terminal[target] || nodes_[fail].accept;
      order.push_back(target);
    }
  }
}

int32_t StopSequenceMatcher::child_search(const Edge* first, const Edge* last, int64_t token) {
  const Edge* found = std::lower_bound(first, last, token, [](const Edge& e, int64_t t) { return e.token < t; });
  return (found != last && found->token == token) ? found->target : -1;
}

}  // namespace haltwise
