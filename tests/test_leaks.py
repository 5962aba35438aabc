"""Leaks: every op, on its normal and its error paths (Python checks and the C++ entry points), repeated
10,000 times keeps the process's resident memory flat and its arguments' reference counts unchanged.
Arrays are sized so that one leaked buffer per call would show as tens of MB."""
import gc
import os
import sys
import time

import numpy as np
import pytest

import fastnn
from fastnn import _C

REPEATS = int(os.environ.get("FASTNN_LEAK_REPEATS", "10000"))
MIN_REPEATS = 1000    # on a loaded machine the time cap may stop the loop early, never before this
WARMUP = 300
TIME_CAP = 4.0        # seconds per op group (10,000 repeats take 1-3 s on an idle machine)
TOLERANCE_MB = 3.0    # RSS growth allowed after warm-up
RESULTS = {}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def expect(exc, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except exc:
        return
    raise AssertionError(f"{f.__name__} did not raise {exc.__name__}")


def groups():
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    a, b, x, g = f32(48, 40), f32(40, 32), f32(32, 130), f32(32, 130)
    ab = f32(3, 16, 40)
    out_mm = np.empty((48, 32), np.float32)
    ro = f32(32, 130)
    ro.flags.writeable = False
    y = fastnn.softmax(x)
    ly = fastnn.log_softmax(x)
    labels = rng.integers(0, 130, 32)
    bad_labels = labels.copy()
    bad_labels[3] = 130
    q, k, v = f32(2, 2, 20, 16), f32(2, 2, 37, 16), f32(2, 2, 37, 8)
    mask = rng.random((20, 37)) < 0.8
    o, lse = fastnn.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    go = f32(*o.shape)
    p, pg, m, v2 = f32(4096), f32(4096), np.zeros(4096, np.float32), np.zeros(4096, np.float32)
    ro_state = np.zeros(4096, np.float32)
    ro_state.flags.writeable = False
    off = np.zeros(1, np.int64)
    bad_off = np.full(1, 10**6, np.int64)
    w, bias = f32(130, 24), f32(24)
    gy = f32(32, 24)
    args = [a, b, x, g, ab, out_mm, ro, y, ly, labels, q, k, v, mask, o, lse, go, p, pg, m, v2, w, bias, gy]
    G = {
        "matmul": [
            lambda: fastnn.matmul(a, b),
            lambda: fastnn.matmul(ab, b),
            lambda: fastnn.matmul(a, b, out=out_mm),
            lambda: fastnn.matmul(a.T[:, ::2], a[::2]),
            lambda: expect(ValueError, fastnn.matmul, a, a),
            lambda: expect(TypeError, fastnn.matmul, a, b.astype(np.float64)),
            lambda: expect(ValueError, _C.gemm, a, b, out_mm, off, bad_off, 48, 32, 40, 40, 1, 32, 1, None, False, False),
            lambda: expect(ValueError, _C.gemm, a, b, x, off, off, 48, 32, 40, 40, 1, 32, 1, None, False, False),
        ],
        "linear": [
            lambda: fastnn.linear(x, w, bias, activation="relu"),
            lambda: expect(ValueError, fastnn.linear, x, w, w),
            lambda: expect(ValueError, fastnn.linear, x, w, activation="gelu"),
        ],
        "relu": [
            lambda: fastnn.relu(x),
            lambda: fastnn.relu(x, out=g.copy()),
            lambda: fastnn.relu(x.T),
            lambda: fastnn.relu_backward(g, x),
            lambda: expect(ValueError, fastnn.relu, x, out=ro),
            lambda: expect(TypeError, fastnn.relu, labels),
            lambda: expect(ValueError, _C.relu, x, out_mm),
        ],
        "softmax": [
            lambda: fastnn.softmax(x),
            lambda: fastnn.log_softmax(x, axis=0),
            lambda: fastnn.softmax_backward(g, y),
            lambda: fastnn.log_softmax_backward(g, ly),
            lambda: fastnn.cross_entropy(x, labels),
            lambda: expect(ValueError, fastnn.softmax, x, axis=2),
            lambda: expect(ValueError, fastnn.cross_entropy, x, bad_labels),
            lambda: expect(ValueError, _C.cross_entropy, x, bad_labels, g.copy(), 130, 1.0, -100, None),
            lambda: expect(ValueError, _C.softmax, x, ro, 130, False),
        ],
        "attention": [
            lambda: fastnn.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            lambda: fastnn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True),
            lambda: fastnn.scaled_dot_product_attention_backward(go, q, k, v, o, lse, attn_mask=mask),
            lambda: expect(ValueError, fastnn.scaled_dot_product_attention, q, k, v, attn_mask=mask, is_causal=True),
            lambda: expect(ValueError, fastnn.scaled_dot_product_attention, q, v, v),
            lambda: expect(ValueError, _C.sdpa, q, k, v, o.copy(), off, bad_off, off, 20, 37, 16, 8, 16, 16, 8,
                           None, off, 0, 0, False, 0.25, None),
        ],
        "adam": [
            lambda: fastnn.adam_update(p, pg, m, v2, step=3, lr=1e-6),
            lambda: fastnn.adam_update(p, pg[::-1], m, v2, step=3, lr=1e-6, weight_decay=0.1, max_exp_avg_sq=np.zeros_like(p)),
            lambda: expect(ValueError, fastnn.adam_update, p, pg, ro_state, v2, step=1),
            lambda: expect(TypeError, fastnn.adam_update, p, pg, m, v2, step=1.5),
            lambda: expect(ValueError, _C.adam, p, pg, m, x, None, 1e-3, 0.9, 0.999, 1e-8, 0, 1e-3, 1, False, False),
        ],
    }
    if hasattr(fastnn, "linear_backward"):
        G["linear"] += [lambda: fastnn.linear_backward(gy, x, w),
                        lambda: expect(ValueError, fastnn.linear_backward, gy, x, w.T)]
    return G, args


GROUPS, ARGS = groups()


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None and RESULTS:
        with capture.global_and_fixture_disabled():
            tr.write_line("")
            for name, (calls, secs, before, after) in RESULTS.items():
                tr.write_line(f"leaks: {name:10s} {calls:7d} calls in {secs:4.1f} s: RSS {before:.1f} MB -> "
                              f"{after:.1f} MB ({after - before:+.2f} MB)")


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    # Leaks are in the bindings and allocations, not in threading; one thread keeps a loaded CI machine
    # from spending the time budget waiting for the pool's workers.
    fastnn.set_num_threads(1)


@pytest.mark.skipif(bool(os.environ.get("FASTNN_SANITIZED")),
                    reason="ASan's quarantine keeps freed memory resident; RSS says nothing there")
@pytest.mark.parametrize("group", list(GROUPS))
def test_rss_flat(group):
    calls = GROUPS[group]
    refs = [sys.getrefcount(a) for a in ARGS]
    for _ in range(WARMUP):
        for f in calls:
            f()
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    n = 0
    while n < REPEATS and time.perf_counter() - start < TIME_CAP:
        for f in calls:
            f()
        n += 1
    secs = time.perf_counter() - start
    gc.collect()
    after = rss_mb()
    RESULTS[group] = (n * len(calls), secs, before, after)
    assert n >= min(MIN_REPEATS, REPEATS), f"only {n} repeats in {TIME_CAP} s"
    assert after - before <= TOLERANCE_MB, f"RSS grew {after - before:.1f} MB over {n} repeats ({before:.1f} -> {after:.1f})"
    assert [sys.getrefcount(a) for a in ARGS] == refs, "an argument's reference count changed"
