// Stop sequences: an Aho-Corasick automaton over token ids. Fed one generated
// token at a time, it says whether some stop sequence ends at that token,
// so a sequence straddling steps, or several overlapping sequences, cost
// O(1) amortised per token and nothing is ever rescanned. Built once per
// distinct stop configuration and shared, read-only, by every sequence that
// uses it; the per-sequence state is one int32.
// Plain C++17: no pybind11, no torch.
#pragma once

#include <cstdint>
#include <vector>

namespace haltwise {

class StopSequenceMatcher {
 public:
  // An automaton that never fires.
  StopSequenceMatcher();
  // Throws std::invalid_argument if one of the sequences is empty.
  explicit StopSequenceMatcher(const std::vector<std::vector<int64_t>>& sequences);

  bool empty() const { return nodes_.size() == 1; }

  // The state of a sequence that has generated nothing yet.
  static constexpr int32_t kStart = 0;

  // Moves `state` over `token`; true when a stop sequence ends at this token
  // (that is, some stop sequence is a suffix of the tokens fed so far).
  bool advance(int32_t& state, int64_t token) const {
    for (;;) {
      const int32_t next = child(state, token);
      if (next >= 0) {
        state = next;
        break;
      }
      if (state == kStart) break;
      state = nodes_[state].fail;
    }
    return nodes_[state].accept;
  }

 private:
  struct Edge {
    int64_t token;
    int32_t target;
  };
  struct Node {
    uint32_t first_edge = 0;  // edges_[first_edge, first_edge + num_edges), sorted by token
    uint32_t num_edges = 0;
    int32_t fail = kStart;  // longest proper suffix of this node's path that is also a trie path
    bool accept = false;    // a stop sequence ends here or at a node down the fail chain
  };

  int32_t child(int32_t node, int64_t token) const {
    const Node& n = nodes_[node];
    const Edge* first = edges_.data() + n.first_edge;
    if (n.num_edges <= 8) {  // the common case: a short linear scan beats a binary search
      for (uint32_t i = 0; i < n.num_edges; ++i)
        if (first[i].token == token) return first[i].target;
      return -1;
    }
    return child_search(first, first + n.num_edges, token);
  }
  static int32_t child_search(const Edge* first, const Edge* last, int64_t token);

  std::vector<Node> nodes_;
  std::vector<Edge> edges_;
};

}  // namespace haltwise
