// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels in this folder.
#ifndef JOVA_JAX_KERNELS_PARALLEL_FOR_H_
#define JOVA_JAX_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jova {

// Runs work(i) for every i in [0, n) on the calling thread and XLA's intra-op threads. Work is
// claimed from a shared counter, so the caller finishes alone when no pool thread comes free:
// it never waits on a task that has not started.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, std::function<void(int64_t)> work) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    std::function<void(int64_t)> work;
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto shared = std::make_shared<Shared>();  // outlives this call if a helper starts late
  shared->n = n;
  shared->work = std::move(work);
  auto run = [shared] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < shared->n;) {
      shared->work(i);
      if (shared->done.fetch_add(1) + 1 == shared->n) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->all_done.notify_all();
      }
    }
  };
  // No more helpers than cores: the test suite's fake devices give the pool 17 threads on 2
  // cores, and a helper that claims a task and then waits for a core holds up the caller.
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), n, cores}) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done.load() == shared->n; });
}

}  // namespace jova

#endif  // JOVA_JAX_KERNELS_PARALLEL_FOR_H_
