// One way to split work across the library's OpenMP threads: parallel_for(n, grain, f) calls f(begin, end)
// on contiguous ranges of [0, n), using at most num_threads() threads and no more than n / grain of them,
// so small problems run inline on the calling thread with no OpenMP overhead.
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu/kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastnn::cpu {

template <typename F> inline void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t nt = std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / std::max<int64_t>(grain, 1)));
#ifdef _OPENMP
  if (nt > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(static_cast<int>(nt))
    {
      const int64_t t = omp_get_thread_num(), team = omp_get_num_threads();
      const int64_t begin = n * t / team, end = n * (t + 1) / team;
      if (begin < end) f(begin, end);
    }
    return;
  }
#endif
  f(0, n);
}

// Hands out items one at a time (dynamic schedule) for uneven work (causal attention) to exactly
// min(nt, n) threads: callers that keep one workspace per thread pass the nt they allocated for, so a
// concurrent set_num_threads cannot make thread_index() outrun the workspaces.
template <typename F> inline void parallel_items(int64_t n, int64_t nt, F&& f) {
  if (n <= 0) return;
  nt = std::max<int64_t>(1, std::min<int64_t>(nt, n));
#ifdef _OPENMP
  if (nt > 1 && !omp_in_parallel()) {
#pragma omp parallel for num_threads(static_cast<int>(nt)) schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) f(i);
}

}  // namespace fastnn::cpu

namespace fastnn::cpu {
// Index of the calling thread inside the current parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
}  // namespace fastnn::cpu
