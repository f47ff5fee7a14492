#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>

namespace haltwise {

namespace {

template <typename T>
T load(const char* base, int64_t stride, int64_t row) {
  T value;
  std::memcpy(&value, base + row * stride, sizeof(T));
  return value;
}

bool saves_tokens(StopReason reason) {
  return reason == StopReason::kLowConfidence || reason == StopReason::kConfident ||
         reason == StopReason::kGroupConsensus;
}

}  // namespace

Scheduler::Scheduler(const SchedulerOptions& options) : options_(options), queue_(options.aging_steps) {
  if (options.capacity < 1 || options.capacity > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("Scheduler: capacity must be in [1, 2^31), got " + std::to_string(options.capacity));
  if (options.max_queue < 1)
    throw std::invalid_argument("Scheduler: max_queue must be >= 1, got " + std::to_string(options.max_queue));
  if (options.aging_steps < 0)
    throw std::invalid_argument("Scheduler: aging_steps must be >= 0 (0: no aging), got " +
                                std::to_string(options.aging_steps));
  if (options.wave_size < 0)
    throw std::invalid_argument("Scheduler: wave_size must be >= 0 (0: no waves), got " +
                                std::to_string(options.wave_size));
  if (options.consensus_fraction &&
      !(*options.consensus_fraction > 0.0 && *options.consensus_fraction <= 1.0))
    throw std::invalid_argument("Scheduler: consensus_fraction must be in (0, 1] or None, got " +
                                std::to_string(*options.consensus_fraction));
  if (options.consensus_min_votes < 1)
    throw std::invalid_argument("Scheduler: consensus_min_votes must be >= 1, got " +
                                std::to_string(options.consensus_min_votes));
  blocked_ = [this](int32_t g) { return group_blocked(g); };
}

// ---- groups -----------------------------------------------------------------

int32_t Scheduler::group_index(int64_t group, bool create) {
  auto found = group_indices_.find(group);
  if (found != group_indices_.end()) return found->second;
  if (!create) return -1;
  int32_t index;
  if (!free_groups_.empty()) {
    index = free_groups_.back();
    free_groups_.pop_back();
  } else {
    index = static_cast<int32_t>(groups_.size());
    groups_.emplace_back();
  }
  groups_[static_cast<size_t>(index)].id = group;
  group_indices_.emplace(group, index);
  return index;
}

// A group is released (its state freed, its id forgotten) at the start of the
// first step after the plan that reported the end of its last member, if it
// still has no queued or active member then. Until that step the caller may
// report the answers of the plan's finished members and read vote() and
// leader(); from it on, the group is unknown: report_answer() of its members
// raises, vote() is {}, leader() None, settle_group() 0, and a later submit
// with its id starts a new group.
void Scheduler::release_groups() {
  size_t kept = 0;
  for (int32_t g : empty_groups_) {
    Group& group = groups_[static_cast<size_t>(g)];
    if (group.queued > 0 || !group.members.empty()) {
      group.release_candidate = false;  // back in use: listed again when it empties
      continue;
    }
    if (group.reported_by >= step_count_) {  // its last end is in this step's plan, or a later one
      empty_groups_[kept++] = g;
      continue;
    }
    for (int64_t request_id : group.ended) {
      auto found = awaiting_answer_.find(request_id);
      if (found != awaiting_answer_.end() && found->second == g) awaiting_answer_.erase(found);
    }
    group_indices_.erase(group.id);
    queue_.forget_group(g);
    group = Group();
    free_groups_.push_back(g);
  }
  empty_groups_.resize(kept);
}

bool Scheduler::group_blocked(int32_t g) const {
  return options_.wave_size > 0 && groups_[static_cast<size_t>(g)].wave_count >= options_.wave_size;
}

void Scheduler::mark_dirty(int32_t g) {
  Group& group = groups_[static_cast<size_t>(g)];
  if (group.dirty || group.settled) return;
  group.dirty = true;
  dirty_groups_.push_back(g);
}

// The settle rule is evaluated at the start of a step, for the groups whose
// votes or members changed since the previous one: by then the caller has
// reported the answers of the previous plan's finished traces, so a trace
// that finished but has not reported yet cannot be outvoted by an early settle.
void Scheduler::settle_dirty_groups(std::vector<FinishedRecord>* out) {
  if (dirty_groups_.empty()) return;
  std::sort(dirty_groups_.begin(), dirty_groups_.end(),
            [this](int32_t a, int32_t b) { return groups_[a].id < groups_[b].id; });
  for (int32_t g : dirty_groups_) {
    Group& group = groups_[static_cast<size_t>(g)];
    group.dirty = false;
    if (group.settled) continue;
    const int64_t remaining = static_cast<int64_t>(group.members.size()) + group.queued;
    if (group.vote.settled(remaining, group.max_weight, options_.consensus_fraction, options_.consensus_min_votes))
      settle(g, out);
  }
  dirty_groups_.clear();
}

// Marks the group settled, ends its queued members now (into `out`) and its
// active ones at their next row. Returns how many it ends.
int64_t Scheduler::settle(int32_t g, std::vector<FinishedRecord>* out) {
  groups_[static_cast<size_t>(g)].settled = true;
  int64_t ended = 0;
  for (int32_t slot : groups_[static_cast<size_t>(g)].members) {
    Sequence& s = slots_[static_cast<size_t>(slot)];
    if (s.pending_end == StopReason::kNone) {
      s.pending_end = StopReason::kGroupConsensus;
      ++ended;
    }
  }
  const std::vector<uint64_t> members = queue_.group_members(g, std::numeric_limits<size_t>::max());
  for (uint64_t seq : members) end_queued(queue_.take(seq), StopReason::kGroupConsensus, out);
  return ended + static_cast<int64_t>(members.size());
}

int64_t Scheduler::settle_group(int64_t group) {
  const int32_t g = group_index(group, false);
  if (g < 0 || groups_[static_cast<size_t>(g)].settled) return 0;
  return settle(g, &pending_finished_);
}

void Scheduler::report_answer(int64_t request_id, int64_t answer_key, double weight) {
  if (!(std::isfinite(weight) && weight >= 0.0))
    throw std::invalid_argument("report_answer: weight must be finite and >= 0, got " + std::to_string(weight));
  auto found = awaiting_answer_.find(request_id);
  if (found == awaiting_answer_.end())
    throw std::invalid_argument("report_answer: request " + std::to_string(request_id) +
                                " is not a finished member of a group awaiting its answer (unknown, still queued or "
                                "active, in no group, or already reported)");
  const int32_t g = found->second;
  const double max_weight = groups_[static_cast<size_t>(g)].max_weight;
  if (weight > max_weight)
    throw std::invalid_argument("report_answer: weight " + std::to_string(weight) + " exceeds its group's max_weight " +
                                std::to_string(max_weight) + " (set at submit)");
  awaiting_answer_.erase(found);
  groups_[static_cast<size_t>(g)].vote.add(answer_key, weight);
  mark_dirty(g);
}

std::vector<std::pair<int64_t, double>> Scheduler::vote(int64_t group) const {
  auto found = group_indices_.find(group);
  if (found == group_indices_.end()) return {};
  return groups_[static_cast<size_t>(found->second)].vote.tally();
}

std::optional<int64_t> Scheduler::leader(int64_t group) const {
  auto found = group_indices_.find(group);
  if (found == group_indices_.end()) return std::nullopt;
  return groups_[static_cast<size_t>(found->second)].vote.leader();
}

// ---- requests -----------------------------------------------------------------

void Scheduler::submit(int64_t request_id, int64_t max_new_tokens, int64_t priority, std::optional<int64_t> group,
                       std::shared_ptr<const StopRules> rules, std::optional<double> max_weight) {
  if (max_new_tokens < 1 || max_new_tokens > kMaxNewTokens)
    throw std::invalid_argument("submit: max_new_tokens must be in [1, " + std::to_string(kMaxNewTokens) + "], got " +
                                std::to_string(max_new_tokens));
  if (!rules) throw std::invalid_argument("submit: stop rules must not be null");
  if (requests_.find(request_id) != requests_.end())
    throw std::invalid_argument("submit: request_id " + std::to_string(request_id) + " is already queued or active");
  if (max_weight && !(std::isfinite(*max_weight) && *max_weight >= 0.0))
    throw std::invalid_argument("submit: max_weight must be finite and >= 0, got " + std::to_string(*max_weight));
  if (max_weight && !group) throw std::invalid_argument("submit: max_weight needs a group");
  int32_t g = group ? group_index(*group, false) : -1;
  if (g >= 0 && max_weight && *max_weight != groups_[static_cast<size_t>(g)].max_weight)
    throw std::invalid_argument("submit: group " + std::to_string(*group) + " has max_weight " +
                                std::to_string(groups_[static_cast<size_t>(g)].max_weight) + ", got " +
                                std::to_string(*max_weight));
  const bool settled = g >= 0 && groups_[static_cast<size_t>(g)].settled;
  if (g >= 0 && !settled && groups_[static_cast<size_t>(g)].queued > 0 &&
      groups_[static_cast<size_t>(g)].priority != priority)
    throw std::invalid_argument("submit: priority of a group's queued members must match: group " +
                                std::to_string(*group) + " has members queued with priority " +
                                std::to_string(groups_[static_cast<size_t>(g)].priority) + ", got " +
                                std::to_string(priority));
  if (!settled && static_cast<int64_t>(queue_.size()) >= options_.max_queue)
    throw QueueFullError("submit: the queue is full (max_queue=" + std::to_string(options_.max_queue) +
                         "); request " + std::to_string(request_id) + " was not queued");

  if (group && g < 0) {
    g = group_index(*group, true);
    groups_[static_cast<size_t>(g)].max_weight = max_weight.value_or(1.0);
  }
  awaiting_answer_.erase(request_id);  // report_answer refers to the latest submission of an id
  ++stats_.submitted;
  const uint64_t seq = next_seq_++;
  if (settled) {
    record_end(request_id, g, StopReason::kGroupConsensus, max_new_tokens, StopTracker::empty_summary(*rules),
               &pending_finished_);
    return;
  }
  if (g >= 0) {
    groups_[static_cast<size_t>(g)].priority = priority;
    ++groups_[static_cast<size_t>(g)].queued;
  }
  requests_.emplace(request_id, Location{-1, seq});
  QueuedRequest request;
  request.request_id = request_id;
  request.seq = seq;
  request.priority = priority;
  request.group = g;
  request.max_new_tokens = max_new_tokens;
  request.rules = std::move(rules);
  request.submitted_at = step_count_;
  queue_.push(std::move(request));
}

bool Scheduler::cancel(int64_t request_id) {
  auto found = requests_.find(request_id);
  if (found == requests_.end()) return false;
  const Location location = found->second;
  if (location.slot < 0) {
    end_queued(queue_.take(location.seq), StopReason::kCancelled, &pending_finished_);
    return true;
  }
  Sequence& s = slots_[static_cast<size_t>(location.slot)];
  if (s.pending_end != StopReason::kNone) return false;  // already ending at its next row
  s.pending_end = StopReason::kCancelled;
  return true;
}

void Scheduler::record_end(int64_t request_id, int32_t g, StopReason reason, int64_t max_new_tokens,
                           StopSummary summary, std::vector<FinishedRecord>* out) {
  ++stats_.finished[static_cast<int>(reason)];
  if (saves_tokens(reason)) stats_.tokens_saved_estimate += max_new_tokens - summary.num_tokens;
  FinishedRecord record;
  record.request_id = request_id;
  record.reason = reason;
  if (g >= 0) {
    Group& group = groups_[static_cast<size_t>(g)];
    record.group = group.id;
    awaiting_answer_[request_id] = g;
    group.ended.push_back(request_id);
    group.reported_by = out == &pending_finished_ ? step_count_ + 1 : step_count_;
    if (group.queued == 0 && group.members.empty() && !group.release_candidate) {
      group.release_candidate = true;
      empty_groups_.push_back(g);
    }
  }
  record.summary = std::move(summary);
  out->push_back(std::move(record));
}

void Scheduler::end_queued(QueuedRequest request, StopReason reason, std::vector<FinishedRecord>* out) {
  requests_.erase(request.request_id);
  if (request.group >= 0) {
    --groups_[static_cast<size_t>(request.group)].queued;
    mark_dirty(request.group);
  }
  record_end(request.request_id, request.group, reason, request.max_new_tokens,
             StopTracker::empty_summary(*request.rules), out);
}

void Scheduler::end_active(int32_t slot, StopReason reason, std::vector<FinishedRecord>* out) {
  Sequence& s = slots_[static_cast<size_t>(slot)];
  requests_.erase(s.request_id);
  if (s.group >= 0) {
    Group& group = groups_[static_cast<size_t>(s.group)];
    const int32_t moved = group.members.back();  // swap-remove from the members
    group.members[static_cast<size_t>(s.member_index)] = moved;
    slots_[static_cast<size_t>(moved)].member_index = s.member_index;
    group.members.pop_back();
    if (group.members.empty()) {  // the wave is over: the next one may start
      group.wave_count = 0;
      queue_.unpark(s.group);
    }
    mark_dirty(s.group);
  }
  record_end(s.request_id, s.group, reason, s.max_new_tokens, s.tracker.finish(), out);
  s.rules.reset();
  s.pending_end = StopReason::kNone;
  free_slots_.push(slot);
}

// ---- the step -------------------------------------------------------------------

namespace {

// Room for one more element, growing geometrically (reserve(size + 1) would reallocate every time).
template <typename T>
void reserve_one(std::vector<T>* v) {
  if (v->size() == v->capacity()) v->reserve(std::max<size_t>(16, v->capacity() * 2));
}

}  // namespace

void Scheduler::fail_admission(uint64_t seq, StepPlanData* plan) {
  reserve_one(&plan->finished);  // if even this fails, the request stays queued (see admit())
  end_queued(queue_.take(seq), StopReason::kOutOfMemory, &plan->finished);
}

// Moves the queued request `seq` into the lowest free slot. Everything that
// allocates happens first, before any state changes: if it fails, the request
// ends with OUT_OF_MEMORY (into plan->finished), the slot stays free, and
// false is returned. Never loses the request.
bool Scheduler::admit_one(uint64_t seq, std::vector<int32_t>* next_rows, StepPlanData* plan) {
  const bool fresh = free_slots_.empty();
  const int32_t slot = fresh ? static_cast<int32_t>(slots_.size()) : free_slots_.top();
  {
    const QueuedRequest& queued = queue_.get(seq);
    try {
      if (fail_admissions_ > 0) {
        --fail_admissions_;
        throw std::bad_alloc();
      }
      if (fresh) slots_.emplace_back();
      slots_[static_cast<size_t>(slot)].tracker.start(queued.rules.get(), queued.max_new_tokens);
      if (queued.group >= 0) reserve_one(&groups_[static_cast<size_t>(queued.group)].members);
      reserve_one(next_rows);
      reserve_one(&plan->admitted);
    } catch (const std::bad_alloc&) {
      if (fresh && slots_.size() > static_cast<size_t>(slot)) slots_.pop_back();
      fail_admission(seq, plan);
      return false;
    } catch (const std::length_error&) {
      if (fresh && slots_.size() > static_cast<size_t>(slot)) slots_.pop_back();
      fail_admission(seq, plan);
      return false;
    }
  }
  // Nothing below allocates.
  QueuedRequest request = queue_.take(seq);
  if (!fresh) free_slots_.pop();
  Sequence& s = slots_[static_cast<size_t>(slot)];
  s.request_id = request.request_id;
  s.group = request.group;
  s.max_new_tokens = request.max_new_tokens;
  s.pending_end = StopReason::kNone;
  s.rules = std::move(request.rules);
  requests_.find(request.request_id)->second = Location{slot, request.seq};
  if (request.group >= 0) {
    Group& group = groups_[static_cast<size_t>(request.group)];
    --group.queued;
    s.member_index = static_cast<int32_t>(group.members.size());
    group.members.push_back(slot);
    ++group.wave_count;
  }
  next_rows->push_back(slot);
  const int64_t where = options_.layout == Layout::kCompact ? static_cast<int64_t>(next_rows->size()) - 1 : slot;
  plan->admitted.emplace_back(request.request_id, where);
  return true;
}

void Scheduler::admit(std::vector<int32_t>* next_rows, StepPlanData* plan) {
  int64_t free_rows = options_.capacity - static_cast<int64_t>(next_rows->size());  // next_rows: the kept rows
  uint64_t seq = 0;
  // Memory that runs out outside a request's own state (admit_one handles
  // that) stops admission for this step; the requests still queued stay
  // queued, and the rows admitted so far stand.
  try {
    while (free_rows > 0 && queue_.best(step_count_, blocked_, &seq)) {
      const int32_t g = queue_.get(seq).group;
      if (g < 0 || !options_.group_atomic) {
        if (admit_one(seq, next_rows, plan)) --free_rows;
        continue;
      }
      // All or nothing: the group's wave (all its queued members without
      // waves), at most a full batch. If it does not fit, admission waits for
      // rows to free rather than let later requests starve the group.
      const Group& group = groups_[static_cast<size_t>(g)];
      int64_t unit = group.queued;
      if (options_.wave_size > 0) unit = std::min(unit, options_.wave_size - group.wave_count);
      unit = std::min(unit, options_.capacity);
      if (unit > free_rows) break;
      for (uint64_t member : queue_.group_members(g, static_cast<size_t>(unit)))
        if (admit_one(member, next_rows, plan)) --free_rows;
    }
  } catch (const std::bad_alloc&) {
    // stop admitting for this step
  }
}

void Scheduler::step(const StepInput& in, StepPlanData* plan) {
  if (in.batch != batch_size())
    throw std::invalid_argument("step: the batch has " + std::to_string(batch_size()) + " rows, got " +
                                std::to_string(in.batch));
  ++step_count_;
  plan->finished = std::move(pending_finished_);
  pending_finished_.clear();
  plan->finished.reserve(plan->finished.size() + 16);
  plan->keep.clear();
  plan->admitted.clear();
  plan->admitted.reserve(16);
  settle_dirty_groups(&plan->finished);
  release_groups();

  const bool compact = options_.layout == Layout::kCompact;
  // Outputs of the row loop are written through raw pointers into vectors
  // sized for the current batch (at most every row is kept), then trimmed: no
  // capacity checks in the row loop. Admissions append. Nothing here is
  // sized by the capacity: a step costs O(rows + admissions + ends).
  const size_t rows = rows_.size();
  std::vector<int32_t>& next_rows = next_rows_;
  next_rows.resize(rows);
  plan->keep.resize(rows);
  plan->request_ids.resize(rows);
  plan->positions.resize(rows);
  int32_t* next_row = next_rows.data();
  int64_t* keep = plan->keep.data();
  int64_t* request_id = plan->request_ids.data();
  int64_t* position = plan->positions.data();
  size_t kept = 0;
  // Rows are scattered over the slots and each row's state is a few cache
  // lines plus its token and window buffers: fetch them ahead, in two stages
  // (a sequence 8 rows ahead, then the buffers it points to 4 rows ahead).
  constexpr int64_t kAhead = 8;
  for (int64_t r = 0; r < in.batch; ++r) {
    if (r + kAhead < in.batch) {
      const char* next = reinterpret_cast<const char*>(&slots_[static_cast<size_t>(rows_[static_cast<size_t>(r + kAhead)])]);
      for (size_t line = 0; line < sizeof(Sequence); line += 64) __builtin_prefetch(next + line);
    }
    if (r + kAhead / 2 < in.batch) slots_[static_cast<size_t>(rows_[static_cast<size_t>(r + kAhead / 2)])].tracker.prefetch();
    const int32_t slot = rows_[static_cast<size_t>(r)];
    Sequence& s = slots_[static_cast<size_t>(slot)];
    StopReason reason = s.pending_end;  // cancelled or group settled: this step's token is not appended
    if (reason == StopReason::kNone) {
      TokenSignals signals;
      signals.logprob = load<float>(in.signals[0], in.signal_strides[0], r);
      signals.entropy = load<float>(in.signals[1], in.signal_strides[1], r);
      signals.confidence = load<float>(in.signals[2], in.signal_strides[2], r);
      signals.margin = load<float>(in.signals[3], in.signal_strides[3], r);
      signals.topk_conf = load<float>(in.signals[4], in.signal_strides[4], r);
      signals.status = load<int8_t>(in.status, in.status_stride, r);
      reason = s.tracker.on_token(load<int64_t>(in.tokens, in.tokens_stride, r), signals);
      ++stats_.tokens_generated;
    }
    if (reason == StopReason::kNone) {
      keep[kept] = compact ? r : slot;
      request_id[kept] = s.request_id;
      position[kept] = s.tracker.num_tokens();
      next_row[kept] = slot;
      ++kept;
    } else {
      end_active(slot, reason, &plan->finished);
    }
  }
  plan->keep.resize(kept);
  next_rows.resize(kept);
  plan->request_ids.resize(kept);
  plan->positions.resize(kept);

  admit(&next_rows, plan);
  for (size_t r = kept; r < next_rows.size(); ++r) {
    plan->request_ids.push_back(slots_[static_cast<size_t>(next_rows[r])].request_id);
    plan->positions.push_back(0);
  }
  if (!compact && next_rows.size() > kept && kept > 0) {
    // slots: rows in slot order. Kept slots are increasing, and so are the
    // admitted ones (lowest free first): merge the two runs.
    std::inplace_merge(next_rows.begin(), next_rows.begin() + static_cast<std::ptrdiff_t>(kept), next_rows.end());
    for (size_t r = 0; r < next_rows.size(); ++r) {
      const Sequence& s = slots_[static_cast<size_t>(next_rows[r])];
      plan->request_ids[r] = s.request_id;
      plan->positions[r] = s.tracker.num_tokens();
    }
  }
  rows_.swap(next_rows);
  plan->capacity = options_.capacity;
  if (compact) {
    plan->active_slots.clear();
  } else {
    plan->active_slots.assign(rows_.begin(), rows_.end());  // slot order
  }
}

SchedulerStats Scheduler::stats() const {
  SchedulerStats out = stats_;
  out.active = batch_size();
  out.queued = static_cast<int64_t>(queue_.size());
  out.groups = static_cast<int64_t>(group_indices_.size());
  return out;
}

}  // namespace haltwise
