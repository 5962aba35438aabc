"""Timing one call. On the CPU (`time_call`): wall clock, the median of grouped samples, after the previous
library's worker threads went quiet. On a GPU (`CudaEvents`, the timer of bench/gpu_bench.py): CUDA events
around each call on the current stream, L2 flushed before each repetition. Both give a `Timing`."""
from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Optional


# Idle worker threads spin before they sleep: OpenBLAS's for 2^28 cycles (~0.1 s), libgomp's (fastnn's
# and PyTorch's OpenMP) for a few ms. On a 2-core machine the spinning threads of the library timed
# last steal the cores from the next one (a 2-thread fastnn matmul ran 2-20x slower right after a NumPy
# matmul), so every timing starts after the workers of the multi-threaded work before it fell asleep.
SETTLE_SECONDS = 0.2          # after BLAS on several threads
SETTLE_OPENMP_SECONDS = 0.03  # after OpenMP on several threads
_quiet_at = 0.0               # perf_counter() time by which every worker thread is asleep


def note_threads(threads, blas=False):
    """Record that work on `threads` threads (BLAS when `blas`) has just finished."""
    global _quiet_at
    if threads and threads > 1:
        pause = SETTLE_SECONDS if blas else SETTLE_OPENMP_SECONDS
        _quiet_at = max(_quiet_at, time.perf_counter() + pause)


QUIET_WINDOW = 0.02           # seconds: the pools are quiet when, over this long, the other threads
QUIET_CPU_FRACTION = 0.02     # of this process used under this fraction of one core
QUIET_TIMEOUT = 2.0           # seconds at most: a thread that never sleeps must not stall the bench


def _other_threads_cpu_seconds():
    """CPU seconds used so far by this process's threads other than the calling one (Linux:
    /proc/self/task/*/schedstat, in ns), or None where that cannot be read."""
    me = str(threading.get_native_id())
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            if tid == me:
                continue
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue                                   # a thread that just ended
    except OSError:
        return None
    return total / 1e9


def wait_quiet(timeout=QUIET_TIMEOUT) -> Optional[float]:
    """Wait until the other threads of this process (OpenBLAS's, PyTorch's and fastnn's worker pools)
    stop using the CPU, i.e. until the pools of the implementation timed before have gone to sleep,
    measured rather than assumed. Returns the seconds waited, or None where threads' CPU time cannot be
    read (then only settle()'s fixed pauses apply)."""
    start = time.perf_counter()
    before = _other_threads_cpu_seconds()
    if before is None:
        return None
    while True:
        time.sleep(QUIET_WINDOW)
        after = _other_threads_cpu_seconds()
        if after - before < QUIET_CPU_FRACTION * QUIET_WINDOW:
            return time.perf_counter() - start
        if time.perf_counter() - start > timeout:
            return time.perf_counter() - start
        before = after


def settle(seconds=None):
    """Wait until the worker threads of the previous implementation (and of the check) are asleep:
    `seconds`, or until the time that note_threads() recorded, and then until wait_quiet() sees them
    idle."""
    wait = seconds if seconds is not None else _quiet_at - time.perf_counter()
    if wait > 0:
        time.sleep(wait)
    wait_quiet()


# A row whose 90th-percentile sample exceeds its median by more than this is flagged in the tables:
# another process or a pool that did not go quiet disturbed it, and its median is not to be trusted.
SPREAD_FLAG = 1.25


@dataclass
class Timing:
    median: float                                     # seconds per call
    best: float
    calls: int
    p90: Optional[float] = None                       # 90th percentile of the samples (None: under 5)

    @property
    def spread(self) -> Optional[float]:
        """p90 / median (None with too few samples to say)."""
        return self.p90 / self.median if self.p90 and self.median > 0 else None

    @property
    def unreliable(self) -> bool:
        return self.spread is not None and self.spread > SPREAD_FLAG


def time_call(fn, budget=0.5, min_samples=5, max_samples=1000, first=None, warmup=0.0) -> Timing:
    """Median seconds per call of fn(), already warmed up by the caller.

    Samples are taken until `budget` seconds have passed and at least `min_samples` were taken. Calls
    shorter than ~100 us are grouped so one sample spans about 100 us, well above timer overhead.
    `first`: the seconds the caller's warm-up call took; above 1 ms it spares a call to size the groups.
    `warmup`: seconds of untimed calls first (when a call is shorter). On virtual machines the first
    touches of memory the host has reclaimed cost up to ten times more for a while (a 32 MiB fresh output
    took 31 ms instead of 3 for about a second); every implementation gets the same warm-up, so each is
    timed in its steady state.
    """
    if first is not None and first < warmup:
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            fn()
    start = time.perf_counter()
    if first is None or first < 1e-3:
        fn()
        first = time.perf_counter() - start
    group = max(1, int(1e-4 / max(first, 1e-9)))
    samples = []
    while len(samples) < max_samples:
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        samples.append((time.perf_counter() - t0) / group)
        if len(samples) >= min_samples and time.perf_counter() - start >= budget:
            break
    p90 = statistics.quantiles(samples, n=10)[-1] if len(samples) >= 5 else None
    return Timing(statistics.median(samples), min(samples), len(samples) * group, p90)


class CudaEvents:
    """The GPU timer: CUDA events recorded around each call on cupy's current stream, the L2 cache flushed
    before each repetition (so every call reads its operands from device memory, as a call in a real step
    does), the median of the repetitions. `cupy` is the module (passed in: importing fastnn.bench never
    imports it)."""

    FLUSH_BYTES = 256 << 20  # written before each repetition: beyond any current L2 (H100 / H200: 50 MB)

    def __init__(self, cupy):
        self.cp = cupy
        self._flush = None

    def flush_l2(self):
        if self._flush is None:
            self._flush = self.cp.empty(self.FLUSH_BYTES, self.cp.uint8)
        self._flush.fill(1)

    def __call__(self, fn, reps, warmup=3) -> Timing:
        """fn() timed `reps` times after `warmup` untimed calls."""
        for _ in range(warmup):
            fn()
        cuda = self.cp.cuda
        start, end = cuda.Event(), cuda.Event()
        times = []
        for _ in range(reps):
            self.flush_l2()
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(cuda.get_elapsed_time(start, end) * 1e-3)  # ms -> s
        p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 5 else None
        return Timing(statistics.median(times), min(times), len(times), p90)
