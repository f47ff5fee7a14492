// The admission queue: requests waiting for a row, in priority classes
// (higher first, FIFO within a class) with aging: a request's effective
// priority is priority + (steps waited) / aging_steps, ties going to the
// earlier submission. A class ages uniformly, so its oldest request is always
// its best and only the class heads are compared. Heads whose group is
// blocked (its wave is full) are parked aside until the group is unblocked,
// so blocked groups cost nothing per admission.
// Plain C++17: no pybind11, no torch.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <unordered_map>
#include <vector>

#include "stop_rules.h"

namespace haltwise {

struct QueuedRequest {
  int64_t request_id = 0;
  uint64_t seq = 0;  // submission number: unique, increasing
  int64_t priority = 0;
  int32_t group = -1;  // the scheduler's group index; -1: no group
  int64_t max_new_tokens = 0;
  std::shared_ptr<const StopRules> rules;
  int64_t submitted_at = 0;  // the scheduler's step count at submission
};

class AdmissionQueue {
 public:
  explicit AdmissionQueue(int64_t aging_steps) : aging_steps_(aging_steps) {}

  size_t size() const { return requests_.size(); }
  bool empty() const { return requests_.empty(); }

  // Adds a request; its seq must exceed every seq pushed before.
  void push(QueuedRequest request);

  // Removes and returns the queued request `seq` (which must be queued).
  QueuedRequest take(uint64_t seq);

  // The queued request `seq` (which must be queued).
  const QueuedRequest& get(uint64_t seq) const { return requests_.at(seq); }

  // Sets *seq to the request to admit next at step `now` and returns true, or
  // returns false when nothing is admissible. Heads whose group is
  // `blocked(group)` are parked until unpark(group).
  bool best(int64_t now, const std::function<bool(int32_t)>& blocked, uint64_t* seq);

  // Puts the parked requests of `group` back in their classes.
  void unpark(int32_t group);

  // Frees what is kept for `group`, which has no queued member: its index may be reused.
  void forget_group(int32_t group);

  // Up to `limit` queued members of `group`, oldest first.
  std::vector<uint64_t> group_members(int32_t group, size_t limit);

 private:
  struct GroupQueue {
    std::vector<uint64_t> fifo;    // fifo[head..]: queued members in submit order; may hold stale (taken) seqs
    size_t head = 0;
    std::vector<uint64_t> parked;  // members taken out of their class while the group is blocked
  };
  using Class = std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>>;  // oldest on top

  GroupQueue& group_queue(int32_t group);
  void prune_front(GroupQueue& g);

  int64_t aging_steps_;
  std::unordered_map<uint64_t, QueuedRequest> requests_;  // the live queue; class heaps may hold stale seqs
  std::map<int64_t, Class> classes_;                      // priority -> its requests
  std::vector<GroupQueue> groups_;                        // by group index
};

}  // namespace haltwise
