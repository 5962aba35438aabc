// The library-wide thread count. Kept in an atomic (not omp_set_num_threads, whose setting is per calling
// thread) so that set_num_threads from any Python thread applies to kernels started from every thread.
#include <atomic>
#include <cstdlib>

#include "cpu/kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastnn::cpu {

static int default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();  // honours OMP_NUM_THREADS
#else
  return 1;
#endif
}

static std::atomic<int> g_threads{0};

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n <= 0) {
    n = default_threads();
    if (n < 1) n = 1;
    g_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n, std::memory_order_relaxed); }

}  // namespace fastnn::cpu
