// Fork-join parallelism for the CPU backend.
//
// parallel_for(n, body) runs body(task, worker) for every task in [0, n) on up to num_threads()
// threads, handing out tasks one at a time (tasks may be uneven, e.g. varlen sequences). `worker`
// in [0, num_threads()) lets a task use its worker's slice of the caller's workspace. Each task
// must write disjoint outputs, so results do not depend on the schedule.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace flashdelta::cpu {

// FLASHDELTA_NUM_THREADS if set (>= 1), else the hardware's thread count. Read once.
int num_threads();

template <typename Body>
void parallel_for(int64_t num_tasks, Body&& body) {
  const int workers = static_cast<int>(std::min<int64_t>(num_threads(), num_tasks));
  if (workers <= 1) {
    for (int64_t task = 0; task < num_tasks; ++task) body(task, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto run = [&](int worker) {
    try {
      for (int64_t task = next++; task < num_tasks; task = next++) body(task, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next = num_tasks;
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) threads.emplace_back(run, w);
  run(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace flashdelta::cpu
