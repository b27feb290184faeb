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

// An item run_from_both_ends hands a thread (-1: none left), and the item next to it in that
// thread's direction, kept inside its run: a hint for a look-ahead only (it may be this item, or
// one the partner ends up taking).
struct EndItem {
  int64_t item, next;
};

// run_from_both_ends' runs: pair r (workers 2r, 2r + 1) shares items [first, last) in
// proportion to its workers, so a worker without a partner gets half a pair's run.
struct BothEnds {
  struct alignas(64) Counter {  // a run's items handed out, claims that found none included
    std::atomic<int64_t> n{0};
  };
  int64_t count, workers;

  bool shared(int64_t run) const { return 2 * run + 1 < workers; }
  int64_t first(int64_t run) const { return 2 * run * count / workers; }
  int64_t last(int64_t run) const { return std::min(2 * run + 2, workers) * count / workers; }
  int64_t unclaimed(int64_t run) const {  // items each worker of the run takes without claiming
    const int64_t size = last(run) - first(run);
    return shared(run) ? size * 3 / 8 : size;
  }

  // Worker w's claim(): its end's items without claiming, then the middle's as `handed` allows;
  // `done` counts the items it took.
  auto claimer(int64_t w, std::atomic<int64_t>& handed, int64_t& done) const {
    const int64_t run = w / 2, own = unclaimed(run), from = first(run), to = last(run);
    const bool backwards = w % 2 == 1, alone = !shared(run);
    return [=, &handed, &done]() -> EndItem {
      if (done >= own &&
          (alone || handed.fetch_add(1, std::memory_order_relaxed) >= to - from)) {
        return {-1, -1};
      }
      const int64_t item = backwards ? to - 1 - done : from + done;
      ++done;
      return {item, backwards ? std::max(item - 1, from) : std::min(item + 1, to - 1)};
    };
  }
};

// Items [0, count) in runs taken from both ends: threads go in pairs, each pair one run, one
// thread front to back and the other back to front, so each knows its next item (a look-ahead
// that asks for the next item's data keeps working) and where the two meet follows their speeds.
// Each takes its first 3/8 of the run without claiming, and only the middle quarter, where they
// may meet, is claimed an item at a time: an atomic add on a line both threads write costs ~0.1
// us, a few percent of a decode step matmul's item. The faster of a pair can take the whole
// middle, 5/8 of the run against 3/8: up to 5/3 the other's speed the pair ends together.
// worker(claim) runs once on each of up to `count` of torch's threads; with an odd number of
// them the last has a run of its own, half a pair's size, and takes it all.
template <typename Worker>
void run_from_both_ends(int64_t count, const Worker& worker) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  if (workers <= 0) return;
  const BothEnds ends{count, workers};
  std::vector<BothEnds::Counter> claims((workers + 1) / 2);
  for (int64_t run = 0; run < static_cast<int64_t>(claims.size()); ++run) {
    claims[run].n = 2 * ends.unclaimed(run);  // both ends' (a worker alone never claims)
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      int64_t done = 0;
      worker(ends.claimer(w, claims[w / 2].n, done));
    }
  });
}

}  // namespace baton
