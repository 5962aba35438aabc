"""Coexistence bench: fastnn beside the thread pools that commonly share its process.

For each neighbour (NumPy's BLAS matmul; PyTorch's matmul and an element-wise op on PyTorch's intra-op
OpenMP pool, when torch is importable) and each fastnn call (matmul, linear_backward, softmax, attention,
adam), at each thread count (every library set to it): a loop of the neighbour alone, of fastnn alone and
of the neighbour then fastnn, each loop started after the previous one's pools have gone quiet. A row
reports the medians and 90th percentiles of the loop bodies and

    ratio      median(neighbour then fastnn) / (median(neighbour alone) + median(fastnn alone))
    p90_ratio  p90(neighbour then fastnn) / (p90(neighbour alone) + p90(fastnn alone))
    nb_ratio   median of the neighbour's own call inside the pair / median of the neighbour alone

1.0 means no interference (a little above is shared caches). Run: fastnn bench --op coexist
[--threads 1,2,4] [--quick] [--json FILE]; `run()` returns the rows for other front ends.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time

import numpy as np

import fastnn


# Long enough for OpenBLAS's idle workers (which poll for about 0.1 s after a call) to go to sleep before
# the next loop starts: each loop is timed from a quiet machine.
SETTLE_SECONDS = 0.25
OPS = ("matmul", "linear_backward", "softmax", "attention", "adam")
# The goal: the pair's median within 1.3x, its p90 within 2x of the isolated times.
GOAL_MEDIAN, GOAL_P90 = 1.3, 2.0


def _fastnn_calls(rng):
    """name -> zero-argument callable, each about 0.1-1 ms on one core (the sizes of the issue's report)."""
    f32 = np.float32
    a = rng.standard_normal((256, 256)).astype(f32)
    g = rng.standard_normal((64, 128)).astype(f32)
    x = rng.standard_normal((64, 784)).astype(f32)
    w = rng.standard_normal((784, 128)).astype(f32)
    s = rng.standard_normal((256, 1024)).astype(f32)
    q, k, v = (rng.standard_normal((1, 4, 128, 64)).astype(f32) for _ in range(3))
    p = rng.standard_normal(1 << 18).astype(f32)
    pg = rng.standard_normal(1 << 18).astype(f32)
    m, vv = np.zeros_like(p), np.zeros_like(p)
    return {
        "matmul": lambda: fastnn.matmul(a, a),
        "linear_backward": lambda: fastnn.linear_backward(g, x, w),
        "softmax": lambda: fastnn.softmax(s),
        "attention": lambda: fastnn.scaled_dot_product_attention(q, k, v),
        "adam": lambda: fastnn.adam_update(p, pg, m, vv, step=1, lr=1e-6),
    }


def _torch():
    try:
        import torch
    except Exception:  # not installed, or a broken install: the torch neighbours are left out
        return None
    return torch


def _neighbours(rng, torch):
    """name -> (callable, set_threads(n)) for each neighbour available here."""
    a = rng.standard_normal((256, 256)).astype(np.float32)
    out = {}
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    limits = {}

    def blas_threads(n):
        # threadpoolctl's limit on the BLAS alone (fastnn's own count is set separately).
        if threadpool_limits is not None:
            old = limits.pop("blas", None)
            if old is not None:
                old.restore_original_limits()
            limits["blas"] = threadpool_limits(limits=n, user_api="blas")

    out["numpy_matmul"] = (lambda: a @ a, blas_threads)
    if torch is not None:
        ta = torch.from_numpy(a)
        big = torch.from_numpy(rng.standard_normal(1 << 20).astype(np.float32))
        tout = torch.empty_like(big)
        out["torch_matmul"] = (lambda: torch.mm(ta, ta), torch.set_num_threads)
        # Element-wise on 1M floats: at::parallel_for, i.e. PyTorch's intra-op OpenMP team.
        out["torch_openmp"] = (lambda: torch.mul(big, 1.5, out=tout), torch.set_num_threads)
    return out


def _loop(bodies, iters):
    """Times `iters` passes of the bodies in order; returns one list of seconds per body and one for the pass."""
    each = [[] for _ in bodies]
    total = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        t = t0
        for i, body in enumerate(bodies):
            body()
            t1 = clock()
            each[i].append(t1 - t)
            t = t1
        total.append(t - t0)
    return each, total


def _quiet():
    time.sleep(SETTLE_SECONDS)


def _p90(xs):
    return float(np.percentile(xs, 90))


def measure(neighbour, call, iters, warmup=10):
    """Isolated and interleaved timings of one (neighbour, fastnn call) pair at the current thread counts."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        _loop([neighbour, call], warmup)
        _quiet()
        (nb,), _ = _loop([neighbour], iters)
        _quiet()
        (fn,), _ = _loop([call], iters)
        _quiet()
        (nb_in, fn_in), pair = _loop([neighbour, call], iters)
        _quiet()
    finally:
        if gc_was:
            gc.enable()
    med = statistics.median
    return {
        "neighbour_ms": med(nb) * 1e3, "fastnn_ms": med(fn) * 1e3,
        "pair_ms": med(pair) * 1e3, "pair_p90_ms": _p90(pair) * 1e3,
        "ratio": med(pair) / (med(nb) + med(fn)),
        "p90_ratio": _p90(pair) / (_p90(nb) + _p90(fn)),
        "nb_ratio": med(nb_in) / med(nb),
        "fastnn_ratio": med(fn_in) / med(fn),
    }


def run(threads_list=None, quick=False, ops=OPS, neighbours=None, iters=None, log=None):
    """Rows of the coexistence table (dicts: neighbour, op, threads, the times in ms and the ratios above).

    threads_list: thread counts (default 1, 2 and the core count); every library is set to each in turn.
    quick: fewer iterations. ops / neighbours: subsets by name. log: callable(str) for progress, or None.
    fastnn's thread count is restored afterwards."""
    cores = os.cpu_count() or 1
    if threads_list is None:
        threads_list = sorted({1, 2, cores})
    iters = iters or (60 if quick else 300)
    rng = np.random.default_rng(0)
    torch = _torch()
    nbs = _neighbours(rng, torch)
    if neighbours is not None:
        nbs = {k: v for k, v in nbs.items() if k in neighbours}
    calls = _fastnn_calls(rng)
    rows = []
    saved = fastnn.get_num_threads()
    torch_saved = torch.get_num_threads() if torch is not None else None
    try:
        for n in threads_list:
            for nb_name, (nb_call, nb_threads) in nbs.items():
                nb_threads(n)
                # After the neighbour's limit: threadpoolctl's restore_original_limits() (in blas_threads) puts
                # every library it sees back, fastnn included, to its count when that limit was taken.
                fastnn.set_num_threads(n)
                for op in ops:
                    row = {"neighbour": nb_name, "op": op, "threads": n, **measure(nb_call, calls[op], iters)}
                    rows.append(row)
                    if log:
                        log(format_row(row))
    finally:
        fastnn.set_num_threads(saved)
        if torch is not None:
            torch.set_num_threads(torch_saved)
    return rows


HEADER = (f"{'neighbour':<14} {'fastnn op':<16} {'thr':>3} {'nb ms':>7} {'fastnn ms':>9} {'pair ms':>8} "
          f"{'pair p90':>8} {'ratio':>6} {'p90 ratio':>9} {'nb ratio':>8}")


def format_row(r):
    flag = "" if r["ratio"] <= GOAL_MEDIAN and r["p90_ratio"] <= GOAL_P90 else "  over goal"
    return (f"{r['neighbour']:<14} {r['op']:<16} {r['threads']:>3} {r['neighbour_ms']:>7.3f} {r['fastnn_ms']:>9.3f} "
            f"{r['pair_ms']:>8.3f} {r['pair_p90_ms']:>8.3f} {r['ratio']:>6.2f} {r['p90_ratio']:>9.2f} "
            f"{r['nb_ratio']:>8.2f}{flag}")


def bench(args):
    """`fastnn bench --op coexist`: the table for args.threads (default 1, 2 and the core count), fewer
    iterations with args.quick, the rows also to args.json; returns the exit status."""
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    ops = OPS
    info = fastnn.info()
    print(f"fastnn {info['version']} ({info['cpu_isa']}), {os.cpu_count()} cores; goal: ratio <= {GOAL_MEDIAN}, "
          f"p90 ratio <= {GOAL_P90}")
    print(HEADER)
    rows = run(threads, args.quick, ops, log=print)
    over = [r for r in rows if r["ratio"] > GOAL_MEDIAN or r["p90_ratio"] > GOAL_P90]
    print(f"{len(rows) - len(over)} of {len(rows)} rows within the goal")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": {k: info[k] for k in ("version", "cpu_isa", "thread_pool") if k in info},
                       "cores": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0

