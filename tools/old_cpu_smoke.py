#!/usr/bin/env python3
"""Every public op once, both dtypes, checked against NumPy: for running the installed fastnn on an emulated
older CPU, where any AVX instruction outside the per-ISA kernels would die with SIGILL, e.g.

    env -u OPENBLAS_CORETYPE qemu-x86_64 -cpu Nehalem venv/bin/python tools/old_cpu_smoke.py generic

The optional argument is the ISA path the dispatcher must pick on that CPU. (qemu 7.2's AVX2 emulation
faults on masked loads that real CPUs allow, so emulated AVX2 CPUs are no test of fastnn's avx2 path.)"""
import sys

import numpy as np

import fastnn
from fastnn import reference as ref


def close(got, want, dtype):
    tol = 1e-4 if dtype == np.float32 else 1e-10
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert err < tol, f"relative error {err:.2e}"


def main():
    isa = fastnn.cpu_isa()
    print(f"fastnn {fastnn.__version__}: ISA path {isa} (supported here: {fastnn.info()['cpu_isa_supported']})")
    if len(sys.argv) > 1 and isa != sys.argv[1]:
        print(f"expected the {sys.argv[1]} path on this CPU, got {isa}")
        return 1
    fastnn.set_num_threads(2)
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        a = rng.standard_normal((67, 45)).astype(dt)
        b = rng.standard_normal((45, 33)).astype(dt)
        bias = rng.standard_normal(33).astype(dt)
        c = rng.standard_normal(a.shape).astype(dt)
        close(fastnn.matmul(a, b), a @ b, dt)
        close(fastnn.matmul(a[None].repeat(3, 0), b), a @ b[None].repeat(3, 0), dt)
        close(fastnn.linear(a, b, bias, activation="relu"), np.maximum(a @ b + bias, 0), dt)
        close(fastnn.relu(a), np.maximum(a, 0), dt)
        close(fastnn.relu_backward(c, a), ref.relu_backward(c, a), dt)
        close(fastnn.softmax(a), ref.softmax(a), dt)
        close(fastnn.log_softmax(a), ref.log_softmax(a), dt)
        y = fastnn.softmax(a)
        close(fastnn.softmax_backward(a, y), ref.softmax_backward(a, y), dt)
        labels = rng.integers(0, 45, 67)
        loss, grad = fastnn.cross_entropy(a, labels)
        want_loss, want_grad = ref.cross_entropy(a, labels)
        close(loss, want_loss, dt)
        close(grad, want_grad, dt)
        q = rng.standard_normal((2, 3, 17, 8)).astype(dt)
        k = rng.standard_normal((2, 3, 23, 8)).astype(dt)
        v = rng.standard_normal((2, 3, 23, 5)).astype(dt)
        close(fastnn.scaled_dot_product_attention(q, k, v, is_causal=True),
              ref.scaled_dot_product_attention(q, k, v, is_causal=True), dt)
        p, g = a.copy(), c
        m, v2 = np.zeros_like(p), np.zeros_like(p)
        pr, mr, vr = p.copy(), m.copy(), v2.copy()
        fastnn.adam_update(p, g, m, v2, step=1, lr=1e-2)
        ref.adam_update(pr, g, mr, vr, step=1, lr=1e-2)
        close(p, pr, dt)
    print("every op ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
