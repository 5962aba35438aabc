"""Stress: 16 Python threads call every op at once with their own shapes for a few seconds, each result
checked against the float64 oracle, while another thread keeps changing the kernel thread count (and the
ISA path) under the running kernels. FASTNN_STRESS_SECONDS sets the duration (default 4)."""
import os
import threading
import time

import numpy as np

import fastnn
from fastnn import reference as ref
from conftest import assert_close, f64, softmax_backward_scale

SECONDS = float(os.environ.get("FASTNN_STRESS_SECONDS", "4"))
N_THREADS = 16


def one_call(rng, dtype):
    """Runs one random op on random shapes; returns its name after checking the result."""
    op = rng.integers(0, 9)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    d = lambda lo=1, hi=150: int(rng.integers(lo, hi))  # noqa: E731
    if op == 0:
        a = r(d(), d())
        b = r(a.shape[1], d())
        assert_close(fastnn.matmul(a, b), ref.matmul(*f64(a, b)), dtype, k=a.shape[1])
        return "matmul"
    if op == 1:
        x = r(d(), d(1, 40))
        w = r(x.shape[1], d())
        bias = r(w.shape[1])
        assert_close(fastnn.linear(x, w, bias, activation="relu"),
                     ref.linear(*f64(x, w, bias), activation="relu"), dtype, k=x.shape[1] + 1)
        return "linear"
    if op == 2:
        x = r(d(1, 300), d(1, 300))
        out = np.empty_like(x) if rng.random() < 0.5 else None
        got = fastnn.relu(x, out=out)
        assert np.array_equal(got, ref.relu(x))
        g = r(*x.shape)
        assert np.array_equal(fastnn.relu_backward(g, x), ref.relu_backward(g, x))
        return "relu"
    if op in (3, 4):
        x = r(d(), d()) * 5
        axis = int(rng.integers(0, 2))
        f, fr = (fastnn.softmax, ref.softmax) if op == 3 else (fastnn.log_softmax, ref.log_softmax)
        assert_close(f(x, axis=axis), fr(f64(x), axis=axis), dtype, k=x.shape[axis])
        return f.__name__
    if op == 5:
        x = r(d(), d())
        g = r(*x.shape)
        y = ref.softmax(f64(x)).astype(dtype)
        assert_close(fastnn.softmax_backward(g, y), ref.softmax_backward(*f64(g, y)), dtype, k=x.shape[1],
                     scale=softmax_backward_scale(g, y))
        return "softmax_backward"
    if op == 6:
        x = r(d(), d())
        labels = rng.integers(0, x.shape[1], x.shape[0])
        loss, grad = fastnn.cross_entropy(x, labels)
        rloss, rgrad = ref.cross_entropy(f64(x), labels)
        assert abs(loss - rloss) <= 1e-4 * max(1, abs(rloss))
        assert_close(grad, rgrad, dtype, k=x.shape[1])
        return "cross_entropy"
    if op == 7:
        h, L, S, E = d(1, 4), d(1, 80), d(1, 140), d(1, 40)
        q, k, v = r(h, L, E), r(h, S, E), r(h, S, d(1, 20))
        causal = bool(rng.random() < 0.5)
        got = fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal)
        exp = ref.scaled_dot_product_attention(*f64(q, k, v), is_causal=causal)
        assert_close(got, exp, dtype, k=S + E)
        return "sdpa"
    n = d(1, 5000)
    p, g, m, v = r(n), r(n), np.zeros(n, dtype), np.zeros(n, dtype)
    rp, rm, rv = f64(p, m, v)
    fastnn.adam_update(p, g, m, v, step=2, lr=1e-2, weight_decay=0.01)
    ref.adam_update(rp, f64(g), rm, rv, step=2, lr=1e-2, weight_decay=0.01)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert np.allclose(p, rp, rtol=tol, atol=tol) and np.allclose(m, rm, rtol=tol, atol=tol)
    return "adam"


def test_many_threads_every_op(restore_threads):
    deadline = time.perf_counter() + SECONDS
    errors, counts = [], [0] * N_THREADS
    stop = threading.Event()
    old_isa = fastnn.cpu_isa()
    isas = fastnn.info()["cpu_isa_supported"]

    def worker(i):
        rng = np.random.default_rng(1000 + i)
        dtype = np.float32 if i % 2 else np.float64
        try:
            while time.perf_counter() < deadline and not errors:
                one_call(rng, dtype)
                counts[i] += 1
        except Exception as e:  # noqa: BLE001 -- reported below with the thread that saw it
            errors.append((i, repr(e)))

    def chaos():
        # set_num_threads (and the ISA switch) under running kernels: must not crash nor change results.
        rng = np.random.default_rng(7)
        n = 0
        while not stop.is_set():
            fastnn.set_num_threads(int(rng.integers(1, 5)))
            if n % 10 == 0:
                fastnn.set_cpu_isa(str(rng.choice(isas)))
            n += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_THREADS)]
    changer = threading.Thread(target=chaos)
    changer.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 120)
    finally:
        stop.set()
        changer.join()
        fastnn.set_cpu_isa(old_isa)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    assert all(c > 0 for c in counts), counts
    print(f"stress: {sum(counts)} checked calls from {N_THREADS} threads in {SECONDS} s")
