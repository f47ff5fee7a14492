// A small pool of worker threads that sleep (never spin) between jobs.
//
// Why not OpenMP: torch ships its own OpenMP runtime; two runtimes in one
// process each spin-wait after a parallel region and starve each other (a
// 32x32 torch matmul measured 22 ms instead of ~10 us here). Sleeping
// workers cost a futex wake-up (~tens of us) per job, which only jobs that
// are worth splitting pay.
#pragma once

#include <cstdint>
#include <functional>

namespace haltwise {

// Runs fn(i) for every i in [0, n) on up to `threads` threads (the calling
// thread is one of them) and returns when all are done. threads <= 1 or
// n <= 1 runs inline. Safe to call from several threads (jobs serialise) and
// after fork() (the child starts a fresh pool).
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn);

// Threads the machine offers (std::thread::hardware_concurrency, at least 1).
int hardware_threads();

}  // namespace haltwise
