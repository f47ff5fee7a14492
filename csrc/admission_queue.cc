#include "admission_queue.h"

#include <utility>

namespace haltwise {

AdmissionQueue::GroupQueue& AdmissionQueue::group_queue(int32_t group) {
  if (static_cast<size_t>(group) >= groups_.size()) groups_.resize(static_cast<size_t>(group) + 1);
  return groups_[static_cast<size_t>(group)];
}

void AdmissionQueue::prune_front(GroupQueue& g) {
  while (g.head < g.fifo.size() && requests_.find(g.fifo[g.head]) == requests_.end()) ++g.head;
  if (g.head == g.fifo.size()) {
    g.fifo.clear();
    g.head = 0;
  } else if (g.head > 32 && g.head * 2 > g.fifo.size()) {  // compact now and then
    g.fifo.erase(g.fifo.begin(), g.fifo.begin() + static_cast<std::ptrdiff_t>(g.head));
    g.head = 0;
  }
}

void AdmissionQueue::push(QueuedRequest request) {
  const uint64_t seq = request.seq;
  classes_[request.priority].push(seq);
  if (request.group >= 0) group_queue(request.group).fifo.push_back(seq);
  requests_.emplace(seq, std::move(request));
}

QueuedRequest AdmissionQueue::take(uint64_t seq) {
  auto found = requests_.find(seq);
  QueuedRequest request = std::move(found->second);
  requests_.erase(found);  // its class heap entry goes stale and is dropped when it surfaces
  if (request.group >= 0) prune_front(group_queue(request.group));
  return request;
}

bool AdmissionQueue::best(int64_t now, const std::function<bool(int32_t)>& blocked, uint64_t* seq) {
  const QueuedRequest* best = nullptr;
  int64_t best_priority = 0;
  for (auto it = classes_.begin(); it != classes_.end();) {
    Class& heap = it->second;
    const QueuedRequest* head = nullptr;
    while (!heap.empty()) {
      auto found = requests_.find(heap.top());
      if (found == requests_.end()) {  // stale: admitted or ended out of order
        heap.pop();
        continue;
      }
      if (found->second.group >= 0 && blocked(found->second.group)) {
        group_queue(found->second.group).parked.push_back(heap.top());
        heap.pop();
        continue;
      }
      head = &found->second;
      break;
    }
    if (head == nullptr) {
      it = classes_.erase(it);
      continue;
    }
    const int64_t effective = head->priority + (aging_steps_ > 0 ? (now - head->submitted_at) / aging_steps_ : 0);
    if (best == nullptr || effective > best_priority || (effective == best_priority && head->seq < best->seq)) {
      best = head;
      best_priority = effective;
    }
    ++it;
  }
  if (best == nullptr) return false;
  *seq = best->seq;
  return true;
}

void AdmissionQueue::unpark(int32_t group) {
  if (static_cast<size_t>(group) >= groups_.size()) return;
  GroupQueue& g = groups_[static_cast<size_t>(group)];
  for (uint64_t seq : g.parked) {
    auto found = requests_.find(seq);
    if (found != requests_.end()) classes_[found->second.priority].push(seq);
  }
  g.parked.clear();
}

void AdmissionQueue::forget_group(int32_t group) {
  if (static_cast<size_t>(group) < groups_.size()) groups_[static_cast<size_t>(group)] = GroupQueue();
}

std::vector<uint64_t> AdmissionQueue::group_members(int32_t group, size_t limit) {
  std::vector<uint64_t> out;
  if (static_cast<size_t>(group) >= groups_.size()) return out;
  GroupQueue& g = groups_[static_cast<size_t>(group)];
  prune_front(g);
  for (size_t i = g.head; i < g.fifo.size() && out.size() < limit; ++i)
    if (requests_.find(g.fifo[i]) != requests_.end()) out.push_back(g.fifo[i]);
  return out;
}

}  // namespace haltwise
