// fastnn's thread pool and the library-wide thread count (see cpu/parallel.h for the contract).
//
// Why an own pool and not OpenMP: fastnn shares processes with NumPy's OpenBLAS and PyTorch's OpenMP pool,
// whose idle workers spin on the cores after each call. An OpenMP team splits work statically and waits at
// its barrier for every member, so a member that a spinning neighbour keeps off the CPU stalls the call
// for a scheduler tick (measured: 8 ms instead of 0.6 ms on 2 cores). Here the work is claimed piece by
// piece and the calling thread takes whatever a late worker has not claimed; workers poll briefly after a
// call (kSpin) and then sleep on a futex, so they do not take the cores from the neighbour's next call
// either. The pool is also fork-safe (GNU libgomp is not: a forked child hangs in its first parallel
// region): the child forgets the parent's workers and starts its own on its first parallel call.
//
// One call uses the pool at a time: a call made while the pool is busy (another Python thread's kernel)
// or from inside a pool thread runs inline on its calling thread, so nothing ever waits for another call.
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "cpu/kernels.h"
#include "cpu/parallel.h"

#ifdef __linux__
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#include <condition_variable>
#include <mutex>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastnn::cpu {

namespace {

// How long an idle worker keeps polling for the next call before it sleeps: long enough to bridge the
// Python between two kernel calls of a loop, short enough not to hold a core another library needs.
// (Yielding the core while polling was tried: on a loaded machine the worker then missed every call.)
constexpr auto kSpin = std::chrono::microseconds(50);
constexpr int kPolls = 64;  // polls between two clock reads
// How long the calling thread polls for the last pieces (running on workers) before it yields its core
// at each poll, so that a worker waiting for that core gets to finish.
constexpr auto kCallerSpin = std::chrono::microseconds(20);
constexpr int kMaxWorkers = 1023;  // threads beyond the caller

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One worker: `ticket` is the sequence number of the last call it was asked to join; it parks on that word.
struct alignas(64) Worker {
  std::atomic<uint32_t> ticket{0};
  std::atomic<uint32_t> sleeping{0};
#ifndef __linux__
  std::mutex m;
  std::condition_variable cv;
#endif

  // Waits until ticket != seen: polls for kSpin, then sleeps. Returns the new ticket.
  uint32_t await(uint32_t seen) {
    const auto until = std::chrono::steady_clock::now() + kSpin;
    uint32_t t;
    for (int k = 1; (t = ticket.load(std::memory_order_acquire)) == seen; ++k) {
      cpu_relax();
      if (k % kPolls == 0 && std::chrono::steady_clock::now() > until) break;
    }
    if (t != seen) return t;
    // Dekker with wake(): either it sees sleeping == 1, or this load sees its ticket.
    sleeping.store(1, std::memory_order_seq_cst);
    while ((t = ticket.load(std::memory_order_seq_cst)) == seen) {
#ifdef __linux__
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&ticket), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
      std::unique_lock<std::mutex> lock(m);
      cv.wait(lock, [&] { return ticket.load(std::memory_order_seq_cst) != seen; });
#endif
    }
    sleeping.store(0, std::memory_order_relaxed);
    return t;
  }

  void wake(uint32_t seq) {
    ticket.store(seq, std::memory_order_seq_cst);
    if (sleeping.load(std::memory_order_seq_cst)) {
#ifdef __linux__
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&ticket), FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
#else
      { std::lock_guard<std::mutex> lock(m); }
      cv.notify_one();
#endif
    }
  }
};

// The current call: `state` packs (sequence number << 32 | pieces not yet claimed); pieces are claimed
// by decrementing it, so a worker holding an old ticket can never claim a newer call's piece. fn, ctx and
// pieces are written before state is published and rewritten only once every piece is done.
struct Pool {
  std::atomic<bool> busy{false};
  alignas(64) std::atomic<uint64_t> state{0};
  alignas(64) std::atomic<int64_t> done{0};
  ChunkFn fn = nullptr;
  void* ctx = nullptr;
  int64_t pieces = 0;
  uint32_t seq = 0;
  int workers = 0;             // started: slots[1 .. workers]
  Worker* slots[kMaxWorkers + 1] = {};
};

// Leaked on purpose: workers may still be parked on it while the process exits.
Pool* g_pool = new Pool;
thread_local int tl_index = 0;
thread_local bool tl_in_team = false;

// Claims and runs pieces of call `seq` until none is left.
void work(Pool& p, uint32_t seq) {
  uint64_t s = p.state.load(std::memory_order_acquire);
  while ((s >> 32) == seq && (s & 0xffffffffu) != 0) {
    if (!p.state.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
    // Claimed piece (pieces - remaining), in increasing order: callers may order their items.
    p.fn(p.ctx, p.pieces - int64_t(s & 0xffffffffu));
    p.done.fetch_add(1, std::memory_order_release);
    s = p.state.load(std::memory_order_acquire);
  }
}

void worker_main(Pool* p, Worker* w, int index) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);  // signals go to the application's threads
  tl_index = index;
  tl_in_team = true;  // kernels called from a worker run inline
  uint32_t seen = 0;
  for (;;) {
    seen = w->await(seen);
    work(*p, seen);
  }
}

// Starts workers until `want` exist (fewer if the system refuses threads); returns how many there are.
int grow(Pool& p, int want) {
  want = std::min(want, kMaxWorkers);
  while (p.workers < want) {
    const int index = p.workers + 1;
    Worker* w = p.slots[index] ? p.slots[index] : new Worker;
    try {
      std::thread(worker_main, &p, w, index).detach();
    } catch (...) {
      p.slots[index] = w;
      break;
    }
    p.slots[index] = w;
    p.workers = index;
  }
  return p.workers;
}

// fork(): the child has only the forking thread. It drops the parent's pool (the workers, a call in flight
// on another thread, the busy flag) and starts a new one on its first parallel call.
void forget_pool_in_child() {
  g_pool = new Pool;
  tl_in_team = false;
  tl_index = 0;
}

const bool g_atfork = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);

int default_threads() {
  // OMP_NUM_THREADS is honoured as OpenMP runtimes do (its first entry); else the CPUs this process may use.
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    char* end = nullptr;
    const long n = std::strtol(env, &end, 10);
    if (end != env && n >= 1) return static_cast<int>(std::min<long>(n, kMaxWorkers + 1));
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_threads{0};

}  // namespace

bool run_parallel(int64_t chunks, int nt, ChunkFn fn, void* ctx) {
  (void)g_atfork;
  if (nt < 2 || chunks < 2 || chunks > 0x7fffffff || tl_in_team) return false;
  Pool& p = *g_pool;
  if (p.busy.exchange(true, std::memory_order_acquire)) return false;
  nt = static_cast<int>(std::min<int64_t>({int64_t(nt), chunks, int64_t(grow(p, nt - 1)) + 1}));
  if (nt < 2) {
    p.busy.store(false, std::memory_order_release);
    return false;
  }
  p.fn = fn;
  p.ctx = ctx;
  p.pieces = chunks;
  p.done.store(0, std::memory_order_relaxed);
  if (++p.seq == 0) ++p.seq;  // 0 is no call
  const uint32_t seq = p.seq;
  p.state.store(uint64_t(seq) << 32 | uint64_t(chunks), std::memory_order_release);
  for (int i = 1; i < nt; ++i) p.slots[i]->wake(seq);
  tl_in_team = true;
  work(p, seq);
  // The last pieces are running on workers: poll, then yield (a worker descheduled on this core resumes).
  if (p.done.load(std::memory_order_acquire) != chunks) {
    const auto until = std::chrono::steady_clock::now() + kCallerSpin;
    bool spin = true;
    for (int k = 1; p.done.load(std::memory_order_acquire) != chunks; ++k) {
      if (spin) {
        cpu_relax();
        if (k % 64 == 0) spin = std::chrono::steady_clock::now() < until;
      } else {
        std::this_thread::yield();
      }
    }
  }
  tl_in_team = false;
  p.busy.store(false, std::memory_order_release);
  return true;
}

int thread_index() { return tl_index; }

const char* thread_pool_info() {
  static const std::string text = "fastnn's own: std::thread workers, pieces claimed dynamically with the caller, " +
                                  std::to_string(kSpin.count()) + " us spin then sleep; fork-safe";
  return text.c_str();
}

int num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n <= 0) {
    n = std::max(1, default_threads());
    g_threads.store(n, std::memory_order_relaxed);
  }
  return n;
}

void set_num_threads(int n) { g_threads.store(std::clamp(n, 1, kMaxWorkers + 1), std::memory_order_relaxed); }

}  // namespace fastnn::cpu

// For threadpoolctl (fastnn/_threadpoolctl.py calls these through ctypes) and any C caller.
extern "C" __attribute__((visibility("default"))) int fastnn_get_num_threads(void) {
  return fastnn::cpu::num_threads();
}
extern "C" __attribute__((visibility("default"))) void fastnn_set_num_threads(int n) {
  fastnn::cpu::set_num_threads(n);
}
