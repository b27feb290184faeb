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
#include <utility>
#include <vector>

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

// An item run_from_both_ends hands a thread, and the one it will take next if any is left (what
// its look-ahead asks for); item -1: none left.
struct EndItem {
  int64_t item, next;
};

// Items [0, count) in runs taken from both ends: threads go in pairs, each pair one run of the
// items, one thread front to back and the other back to front, so each always knows its next
// item (a look-ahead that asks for the next item's data keeps working) and where the two meet
// follows their speeds. Each takes its first 3/8 of the run unasked; only the middle quarter is
// claimed an item at a time, one atomic add each: an item of a decode step's matmul is a few
// microseconds, and an atomic add on a line both threads write ~0.1 us. So a thread up
// to 1.67x faster than its partner never waits for it. worker(claim) runs once on each of up to
// `count` of torch's threads; a thread left without a partner (an odd count) runs its whole run.
template <typename Worker>
void run_from_both_ends(int64_t count, const Worker& worker) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  if (workers <= 0) return;
  const int64_t runs = (workers + 1) / 2;
  auto shared = [&](int64_t run) { return 2 * run + 1 < workers; };
  auto bounds = [&](int64_t run) {
    return std::pair{run * count / runs, (run + 1) * count / runs};
  };
  auto unasked = [&](int64_t run) {  // items each thread of the run takes without claiming
    const auto [first, last] = bounds(run);
    return shared(run) ? (last - first) * 3 / 8 : last - first;
  };
  std::vector<std::atomic<int64_t>> taken(runs);  // items of each run handed out
  for (int64_t run = 0; run < runs; ++run) taken[run] = (shared(run) ? 2 : 1) * unasked(run);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t run = w / 2, own = unasked(run);
      const auto [first, last] = bounds(run);
      const bool backwards = w % 2 == 1;
      int64_t done = 0;
      const auto claim = [&]() -> EndItem {
        if (done >= own &&
            (!shared(run) || taken[run].fetch_add(1, std::memory_order_relaxed) >= last - first)) {
          return {-1, -1};
        }
        const int64_t item = backwards ? last - 1 - done : first + done;
        ++done;
        return {item, backwards ? std::max(item - 1, first) : std::min(item + 1, last - 1)};
      };
      worker(claim);
    }
  });
}

}  // namespace baton
