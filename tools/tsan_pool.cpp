// ThreadSanitizer check of the thread pool alone (csrc/threads.cpp + cpu/parallel.h), outside Python:
// parallel_for / parallel_items results, nested calls (inline), several threads calling at once (one gets
// the pool, the others run inline), per-thread workspaces indexed by thread_index(), and a fork() child
// that makes its own pool. Built and run by tools/tsan_pool.sh; exit status 0 when every check holds.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>

#include "cpu/parallel.h"

using namespace fastnn::cpu;

static bool sum_ok(int64_t n) {
  std::vector<long> v(n, 1);
  std::atomic<long> total{0};
  parallel_for(n, 16, [&](int64_t b, int64_t e) {
    long s = 0;
    for (int64_t i = b; i < e; ++i) s += v[i];
    parallel_for(64, 1, [&](int64_t, int64_t) {});  // nested: inline on this thread
    total += s;
  });
  return total == n;
}

static bool items_ok(int nt) {
  std::vector<long> per_thread(nt, 0);  // a workspace per thread, as attention keeps them
  std::atomic<long> total{0};
  parallel_items(100, nt, [&](int64_t i) {
    const int t = thread_index();
    if (t < 0 || t >= nt) std::abort();
    per_thread[t] += i;
    total += i;
  });
  long s = 0;
  for (long x : per_thread) s += x;
  return total == 4950 && s == 4950;
}

int main() {
  set_num_threads(4);
  long bad = 0;
  for (int r = 0; r < 2000; ++r) bad += !sum_ok(1000 + r);
  std::vector<std::thread> callers;
  std::atomic<long> bad_threads{0};
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&] {
      for (int r = 0; r < 500; ++r) bad_threads += !items_ok(1 + r % 4);
    });
  for (auto& t : callers) t.join();
  const pid_t pid = fork();
  if (pid == 0) _exit(sum_ok(5000) && items_ok(4) ? 0 : 1);
  int status = 0;
  waitpid(pid, &status, 0);
  const int child = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  std::printf("tsan_pool: %ld bad sums, %ld bad item runs, fork child exit %d\n", bad, bad_threads.load(), child);
  return bad || bad_threads || child ? 1 : 0;
}
