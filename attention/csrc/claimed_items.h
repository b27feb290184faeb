// Work items shared out as threads claim them, not split into equal runs up front. Why: on a
// shared 2-vCPU VM one vCPU often runs slower than the other (its host core's other thread busy).
// With a static split the fast thread finishes its half and waits in OpenMP's barrier: in a
// 4096-token bfloat16 prefill the calling thread spent 14.6% of its time there while the other
// did the same matmul work in ~19% more time (perf, per thread). Claimed items keep both busy
// to the end; the items must be small against the call and large against one atomic add.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace baton {

// Runs worker(claim) once on each of up to `count` of torch's threads; claim() hands the calling
// thread the next unclaimed item of [0, count) in order, or -1 once all are taken. A worker keeps
// its own state (scratch, tile configuration) across the items it claims.
template <typename Worker>
void run_claimed(int64_t count, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const auto claim = [&]() -> int64_t {
    const int64_t item = next.fetch_add(1, std::memory_order_relaxed);
    return item < count ? item : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(claim);
  });
}

}  // namespace baton
