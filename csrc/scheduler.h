// The native batch scheduler: keeps a running view of every sequence in the
// decode batch, ends the ones whose stop rules fire (stop_rules.h), admits
// queued requests into the freed rows (admission_queue.h) and tallies the
// answer votes of groups of traces (group_vote.h). One step() per decode step;
// everything it does per row is O(1), and a step costs O(rows + admissions +
// ends), whatever the capacity: slots are created as they are first needed.
// Plain C++17: no pybind11, no torch. Not thread-safe: callers serialise.
// The Python API and the semantics in full: python/haltwise/scheduler.py.
#pragma once

#include <cstdint>
#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <queue>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <vector>

#include "admission_queue.h"
#include "group_vote.h"
#include "stop_rules.h"

namespace haltwise {

// compact: the next batch is the kept rows in their old order, then the
// admitted ones. slots: every sequence holds a stable slot in [0, capacity);
// a batch's rows are the active slots in increasing order.
enum class Layout : int8_t { kCompact = 0, kSlots = 1 };

struct SchedulerOptions {
  int64_t capacity = 1;  // max rows in a batch
  Layout layout = Layout::kCompact;
  int64_t max_queue = 1000000;
  int64_t aging_steps = 256;  // 0: no aging
  int64_t wave_size = 0;      // 0: a group's members are admitted freely
  bool group_atomic = false;
  std::optional<double> consensus_fraction;
  int64_t consensus_min_votes = 3;
};

// submit() on a full queue. Nothing changed.
class QueueFullError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct FinishedRecord {
  int64_t request_id = 0;
  StopReason reason = StopReason::kNone;
  std::optional<int64_t> group;
  StopSummary summary;
};

// One decode step's outputs, one entry per row of the current batch. Pointers
// with byte strides (numpy's), read only during step().
struct StepInput {
  int64_t batch = 0;
  const char* tokens = nullptr;  // int64
  int64_t tokens_stride = 8;
  // float32: logprob, entropy, confidence, margin, topk_conf
  const char* signals[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
  int64_t signal_strides[5] = {4, 4, 4, 4, 4};
  const char* status = nullptr;  // int8
  int64_t status_stride = 1;
};

struct StepPlanData {
  std::vector<FinishedRecord> finished;  // ended since the previous plan
  std::vector<int64_t> keep;             // rows (compact) / slots (slots) of the previous batch that continue
  std::vector<std::pair<int64_t, int64_t>> admitted;  // (request_id, row or slot)
  std::vector<int64_t> request_ids;      // [next batch], row order
  std::vector<int64_t> positions;        // [next batch]: tokens generated so far
  // slots layout: the slots of the next batch, increasing (the active mask
  // and the free slots are derived from it on demand); compact: empty.
  std::vector<int32_t> active_slots;
  int64_t capacity = 0;
};

struct SchedulerStats {
  int64_t submitted = 0;
  int64_t active = 0;
  int64_t queued = 0;
  int64_t finished[kNumStopReasons] = {};
  int64_t tokens_generated = 0;
  // Sum over sequences ended by LOW_CONFIDENCE, CONFIDENT or GROUP_CONSENSUS
  // of max_new_tokens - num_tokens: the budget they did not spend (an upper
  // bound on the tokens saved, since they might have hit EOS sooner).
  int64_t tokens_saved_estimate = 0;
  int64_t groups = 0;  // groups held (see Scheduler::release_groups)
};

class Scheduler {
 public:
  // Throws std::invalid_argument naming the bad option.
  explicit Scheduler(const SchedulerOptions& options);

  // Queues a request. Throws std::invalid_argument (duplicate queued or active
  // id, max_new_tokens outside [1, kMaxNewTokens], a group whose queued
  // members have another priority) or QueueFullError; either way nothing
  // changes. A request for a settled group ends at once with GROUP_CONSENSUS.
  // max_weight: the most one member's answer may weigh in the group's vote
  // (finite, >= 0; needs a group); a new group takes it (default 1), a
  // submit to a held group with another value throws.
  void submit(int64_t request_id, int64_t max_new_tokens, int64_t priority, std::optional<int64_t> group,
              std::shared_ptr<const StopRules> rules, std::optional<double> max_weight = std::nullopt);

  // One decode step: `in` has one entry per row of the current batch
  // (batch_size()); throws std::invalid_argument if in.batch differs. An
  // admission whose state cannot be allocated (std::bad_alloc) ends that
  // request with OUT_OF_MEMORY in this plan; its row goes to the next request.
  void step(const StepInput& in, StepPlanData* plan);

  bool cancel(int64_t request_id);
  void report_answer(int64_t request_id, int64_t answer_key, double weight);
  int64_t settle_group(int64_t group);
  std::vector<std::pair<int64_t, double>> vote(int64_t group) const;
  std::optional<int64_t> leader(int64_t group) const;
  SchedulerStats stats() const;

  // Testing hook: the next `count` admissions fail as if memory ran out.
  void fail_next_admissions(int64_t count) { fail_admissions_ = std::max<int64_t>(count, 0); }

  int64_t capacity() const { return options_.capacity; }
  Layout layout() const { return options_.layout; }
  int64_t batch_size() const { return static_cast<int64_t>(rows_.size()); }

 private:
  struct Sequence {
    StopReason pending_end = StopReason::kNone;  // CANCELLED / GROUP_CONSENSUS at its next row
    int32_t group = -1;
    int32_t member_index = -1;  // its place in groups_[group].members
    int64_t request_id = 0;
    int64_t max_new_tokens = 0;
    StopTracker tracker;
    std::shared_ptr<const StopRules> rules;
  };
  struct Group {
    int64_t id = 0;
    int64_t priority = 0;  // shared by its queued members
    double max_weight = 1.0;  // the most one member's answer may weigh (set by the submit that creates it)
    int64_t queued = 0;
    std::vector<int32_t> members;  // slots of its active members
    int64_t wave_count = 0;        // members admitted in the current wave
    bool settled = false;
    bool dirty = false;  // votes or members changed: re-check the settle rule at the next step
    bool release_candidate = false;  // in empty_groups_
    int64_t reported_by = 0;  // the step whose plan reports the group's latest end
    std::vector<int64_t> ended;  // its members that ended (may still report an answer)
    GroupVote vote;
  };
  // Where a queued or active request is: slot -1 while queued.
  struct Location {
    int32_t slot;
    uint64_t seq;
  };

  int32_t group_index(int64_t group, bool create);
  bool group_blocked(int32_t g) const;
  void mark_dirty(int32_t g);
  void release_groups();
  void settle_dirty_groups(std::vector<FinishedRecord>* out);
  int64_t settle(int32_t g, std::vector<FinishedRecord>* out);
  void end_queued(QueuedRequest request, StopReason reason, std::vector<FinishedRecord>* out);
  void end_active(int32_t slot, StopReason reason, std::vector<FinishedRecord>* out);
  void record_end(int64_t request_id, int32_t g, StopReason reason, int64_t max_new_tokens, StopSummary summary,
                  std::vector<FinishedRecord>* out);
  void admit(std::vector<int32_t>* next_rows, StepPlanData* plan);
  void fail_admission(uint64_t seq, StepPlanData* plan);
  bool admit_one(uint64_t seq, std::vector<int32_t>* next_rows, StepPlanData* plan);

  SchedulerOptions options_;
  int64_t step_count_ = 0;
  int64_t fail_admissions_ = 0;  // fail_next_admissions()
  uint64_t next_seq_ = 0;

  // Slots [0, slots_.size()) exist; the free ones among them are in
  // free_slots_. The lowest free slot is free_slots_'s top, or slots_.size()
  // (a new one) when none is free: so slots_ grows only to the peak batch.
  std::vector<Sequence> slots_;
  std::priority_queue<int32_t, std::vector<int32_t>, std::greater<int32_t>> free_slots_;  // lowest first
  std::vector<int32_t> rows_;    // slot of each row of the next batch
  std::vector<int32_t> next_rows_;  // scratch of step()

  AdmissionQueue queue_;
  std::function<bool(int32_t)> blocked_;
  std::unordered_map<int64_t, Location> requests_;        // queued and active requests by id
  std::unordered_map<int64_t, int32_t> group_indices_;    // group id -> index in groups_
  std::vector<Group> groups_;  // by index; freed indices are reused
  std::vector<int32_t> free_groups_;  // freed indices
  std::vector<int32_t> dirty_groups_;
  std::vector<int32_t> empty_groups_;  // groups with no queued or active member, to release
  std::unordered_map<int64_t, int32_t> awaiting_answer_;  // finished grouped requests -> group index
  std::vector<FinishedRecord> pending_finished_;          // ended between steps, for the next plan

  SchedulerStats stats_;
};

}  // namespace haltwise
