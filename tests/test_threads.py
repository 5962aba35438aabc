"""Thread safety and thread-count independence: many Python threads calling ops at once, and one kernel
thread vs all of them."""
import concurrent.futures as cf

import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import assert_close, f64, make_array


def op_cases(rng, dtype):
    """(name, call, float64 oracle, reduction length) for one op each, at sizes that get split across threads."""
    a = make_array(rng, (97, 131), dtype)
    b = make_array(rng, (131, 67), dtype)
    bias = make_array(rng, (67,), dtype)
    x = make_array(rng, (61, 257), dtype)
    g = make_array(rng, (61, 257), dtype)
    y = ref.softmax(f64(x)).astype(dtype)
    labels = rng.integers(0, 257, size=61)
    q = make_array(rng, (2, 3, 37, 32), dtype)
    k = make_array(rng, (2, 3, 129, 32), dtype)
    v = make_array(rng, (2, 3, 129, 16), dtype)
    return [
        ("matmul", lambda: fastnn.matmul(a, b), ref.matmul(*f64(a, b)), 131),
        ("linear", lambda: fastnn.linear(a, b, bias, activation="relu"),
         ref.linear(*f64(a, b, bias), activation="relu"), 132),
        ("relu", lambda: fastnn.relu(x), ref.relu(f64(x)), 1),
        ("relu_backward", lambda: fastnn.relu_backward(g, x), ref.relu_backward(*f64(g, x)), 1),
        ("softmax", lambda: fastnn.softmax(x), ref.softmax(f64(x)), 257),
        ("log_softmax", lambda: fastnn.log_softmax(x, axis=0), ref.log_softmax(f64(x), axis=0), 61),
        ("softmax_backward", lambda: fastnn.softmax_backward(g, y), ref.softmax_backward(*f64(g, y)), 257),
        ("cross_entropy", lambda: fastnn.cross_entropy(x, labels)[1], ref.cross_entropy(f64(x), labels)[1], 257),
        ("sdpa", lambda: fastnn.scaled_dot_product_attention(q, k, v, is_causal=True),
         ref.scaled_dot_product_attention(*f64(q, k, v), is_causal=True), 161),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concurrent_calls_from_python_threads(rng, dtype):
    cases = op_cases(rng, dtype)
    jobs = [cases[i % len(cases)] for i in range(48)]

    def run(job):
        name, call, _, _ = job
        return name, call()

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    for (name, got), (_, _, expected, k) in zip(results, jobs):
        assert_close(got, expected, dtype, k=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_concurrent_adam(rng, dtype):
    # Each thread owns its own parameter and state; all update at the same time.
    n = 8
    params = [rng.standard_normal(5003).astype(dtype) for _ in range(n)]
    grads = [rng.standard_normal(5003).astype(dtype) for _ in range(n)]
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    refs = [f64(p, np.zeros_like(p), np.zeros_like(p)) for p in params]

    def run(i):
        for step in range(1, 4):
            fastnn.adam_update(params[i], grads[i], ms[i], vs[i], step=step, lr=0.01, weight_decay=0.1)

    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(run, range(n)))
    for i in range(n):
        rp, rm, rv = refs[i]
        for step in range(1, 4):
            ref.adam_update(rp, f64(grads[i]), rm, rv, step=step, lr=0.01, weight_decay=0.1)
        assert_close(params[i], rp, dtype, k=3)
        assert_close(ms[i], rm, dtype, k=3)
        assert_close(vs[i], rv, dtype, k=3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_thread_matches_all_threads(rng, dtype, restore_threads):
    cases = op_cases(rng, dtype)
    n_all = max(restore_threads, 2)  # use at least two threads even on a single-core default
    fastnn.set_num_threads(n_all)
    multi = [np.array(call()) for _, call, _, _ in cases]
    fastnn.set_num_threads(1)
    assert fastnn.get_num_threads() == 1
    single = [np.array(call()) for _, call, _, _ in cases]
    fastnn.set_num_threads(n_all)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for (name, _, expected, k), s, m in zip(cases, single, multi):
        assert np.allclose(s, m, rtol=tol, atol=tol, equal_nan=True), name
        assert_close(s, expected, dtype, k=k)
        assert_close(m, expected, dtype, k=k)
    # Large enough that every op is split into several chunks.
    a = make_array(rng, (300, 257), dtype)
    b = make_array(rng, (257, 311), dtype)
    fastnn.set_num_threads(1)
    single = fastnn.matmul(a, b)
    fastnn.set_num_threads(n_all)
    assert np.allclose(single, fastnn.matmul(a, b), rtol=tol, atol=tol)


def test_set_num_threads_while_running(rng, restore_threads):
    # Changing the thread count while other threads compute must not break their results.
    a = make_array(rng, (129, 65), np.float64)
    b = make_array(rng, (65, 63), np.float64)
    expected = ref.matmul(a, b)

    def run(i):
        if i % 4 == 0:
            fastnn.set_num_threads(1 + i % 3)
        return fastnn.matmul(a, b)

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(32)))
    for got in results:
        assert_close(got, expected, np.float64, k=65)
