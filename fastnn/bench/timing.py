"""Timing one call: the median of grouped samples, after the previous library's worker threads went quiet."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


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


def settle(seconds=None):
    """Wait until the worker threads of the previous implementation (and of the check) are asleep:
    `seconds`, or until the time that note_threads() recorded."""
    wait = seconds if seconds is not None else _quiet_at - time.perf_counter()
    if wait > 0:
        time.sleep(wait)


@dataclass
class Timing:
    median: float                                     # seconds per call
    best: float
    calls: int


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
    return Timing(statistics.median(samples), min(samples), len(samples) * group)
