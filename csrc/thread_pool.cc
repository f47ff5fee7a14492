#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace haltwise {
namespace {

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int workers() const { return int(threads_.size()); }

  void run(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      pending_ = helpers;
      wanted_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    drain();  // the caller works too
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*fn_)(i);
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && wanted_ > 0); });
        if (stop_) return;
        seen = generation_;
        --wanted_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (--pending_ == 0) done_.notify_one();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  int pending_ = 0;  // helpers that have not finished this job
  int wanted_ = 0;   // helpers still to join this job
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// The process's pool and the mutex that serialises jobs (held for a whole job).
// A forked child inherits both as they were at the fork: the mutex possibly
// locked by a thread that does not exist in the child, the workers gone. So
// the child never touches them: an atfork handler (which runs in the child,
// single-threaded, before fork() returns) abandons the inherited state and
// installs a fresh one, with an unlocked mutex and no pool yet. The abandoned
// state is leaked on purpose: destroying a locked mutex, or joining threads
// that do not exist, is undefined.
struct PoolState {
  std::mutex mutex;
  std::unique_ptr<Pool> pool;
};
PoolState* g_state = nullptr;  // never freed (see above); replaced only in a forked child

void start_fresh_in_child() { g_state = new PoolState; }

PoolState& pool_state() {
  static PoolState* const first = [] {
    g_state = new PoolState;
    pthread_atfork(nullptr, nullptr, start_fresh_in_child);
    return g_state;
  }();
  (void)first;
  return *g_state;
}

}  // namespace

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  const int helpers = int(std::min<int64_t>(threads, n)) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  PoolState& state = pool_state();
  std::lock_guard<std::mutex> lock(state.mutex);
  if (!state.pool || state.pool->workers() < helpers) {
    state.pool.reset();
    state.pool = std::make_unique<Pool>(helpers);
  }
  state.pool->run(n, helpers, fn);
}

}  // namespace haltwise
