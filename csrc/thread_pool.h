// A small pool of worker threads that sleep (never spin) between jobs.
//
// Why not OpenMP: torch ships its own OpenMP runtime, and a second one in the
// same process keeps its workers spinning after each parallel region, taking
// cores from torch's threads (on a 2-core machine, a spinning pool is exactly
// the oversubscription that made torch ops here 100x slower under load). These
// workers sleep between jobs; a job pays a futex wake-up (~tens of us), which
// only calls big enough to split pay.
#pragma once

#include <cstdint>
#include <functional>

namespace haltwise {

// Runs fn(i) for every i in [0, n) on up to `threads` threads (the calling
// thread is one of them) and returns when all are done. threads <= 1 or
// n <= 1 runs inline. Safe to call from several threads (jobs serialise) and
// in a forked child, even one forked while another thread was inside
// parallel_for: the child starts a fresh pool and never touches the one (and
// the possibly locked mutex) it inherited.
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

// Threads the machine offers (std::thread::hardware_concurrency, at least 1).
int hardware_threads();

}  // namespace haltwise
