// One way to split work across the library's threads (fastnn's own pool, csrc/threads.cpp):
//   parallel_for(n, grain, f)    calls f(begin, end) on contiguous ranges covering [0, n), on at most
//                                num_threads() threads and no more than n / grain of them;
//   parallel_ranges(n, nt, f)    the same with the thread count given (at most nt, at most n);
//   parallel_items(n, nt, f)     calls f(i) for every i in [0, n), items handed out one at a time;
//   thread_index()               the calling thread's index in [0, nt) inside one of these (0 outside).
// The work is cut into more pieces than threads and the pieces are claimed dynamically, the calling
// thread included: a worker that the OS has not scheduled yet (another library's threads spinning on the
// cores) delays nothing, because the caller takes the pieces it has not claimed. Small problems, calls
// made from inside a parallel region and calls made while another thread's call holds the pool run
// inline on the calling thread, so concurrent and nested calls are safe and never wait for each other.
// No function may throw out of f (allocate before the parallel call; an escaping exception terminates).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/kernels.h"

namespace fastnn::cpu {

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// Runs fn(ctx, c) for every c in [0, chunks) on up to nt threads, the caller's included, and returns when
// all have returned. Returns false, having run nothing, when no team can be had: nt < 2, chunks < 2,
// the caller is a pool thread, or the pool is busy with another thread's call (the caller then runs the
// work itself).
bool run_parallel(int64_t chunks, int nt, ChunkFn fn, void* ctx);

// Index of the calling thread inside the current parallel call (0 outside one): the caller is 0, pool
// workers 1 .. nt - 1.
int thread_index();

// Pieces per thread: enough that a late worker's share is taken over in small steps.
constexpr int64_t kChunksPerThread = 4;

namespace detail {
template <typename F> inline void run_ranges(int64_t n, int64_t nt, int64_t pieces, F& f) {
  struct Ctx { F* f; int64_t n, pieces; } ctx{&f, n, pieces};
  auto run = [](void* p, int64_t c) noexcept {  // a throw terminates: it cannot leave a pool call half done
    const Ctx& x = *static_cast<const Ctx*>(p);
    (*x.f)(x.n * c / x.pieces, x.n * (c + 1) / x.pieces);
  };
  if (nt > 1 && run_parallel(pieces, static_cast<int>(nt), run, &ctx)) return;
  f(int64_t(0), n);
}
}  // namespace detail

template <typename F> inline void parallel_ranges(int64_t n, int64_t nt, F&& f) {
  if (n <= 0) return;
  nt = std::max<int64_t>(1, std::min(nt, n));
  detail::run_ranges(n, nt, std::min(n, nt * kChunksPerThread), f);
}

template <typename F> inline void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  const int64_t most = std::max<int64_t>(1, n / std::max<int64_t>(grain, 1));  // no piece under the grain
  const int64_t nt = std::min<int64_t>(num_threads(), most);
  detail::run_ranges(n, nt, std::min(most, nt * kChunksPerThread), f);
}

// For uneven work (causal attention) on at most min(nt, n) threads: callers that keep one workspace per
// thread pass the nt they allocated for, so thread_index() stays below it whatever set_num_threads does.
template <typename F> inline void parallel_items(int64_t n, int64_t nt, F&& f) {
  if (n <= 0) return;
  nt = std::max<int64_t>(1, std::min(nt, n));
  auto run = [](void* p, int64_t i) noexcept { (*static_cast<F*>(p))(i); };
  if (nt > 1 && run_parallel(n, static_cast<int>(nt), run, &f)) return;
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace fastnn::cpu
