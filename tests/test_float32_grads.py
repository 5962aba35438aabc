"""float32 backward ops against the float64 oracle's gradients (not finite differences of fastnn's own
forward, which cannot see a bug the forward and backward share, such as a wrong default scale), on every ISA
path at 1 and 2 threads, with float32 bounds (conftest.tolerance: about 2e-6 * sqrt(terms))."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import assert_close, f64, softmax_backward_scale

F32 = np.float32


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backward_float32(isa, restore_threads, rng, threads, causal):
    fastnn.set_num_threads(threads)
    q = rng.standard_normal((2, 3, 37, 24)).astype(F32)
    k = rng.standard_normal((2, 3, 69, 24)).astype(F32)
    v = rng.standard_normal((2, 3, 69, 20)).astype(F32)
    do = rng.standard_normal((2, 3, 37, 20)).astype(F32)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True)
    got = fastnn.scaled_dot_product_attention_backward(do, q, k, v, out, lse, is_causal=causal)
    want = ref.scaled_dot_product_attention_backward(*f64(do, q, k, v), None, None, is_causal=causal)
    for name, g, w in zip(("grad_query", "grad_key", "grad_value"), got, want):
        try:
            assert_close(g, w, F32, k=69 + 24)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("threads", [1, 2])
def test_log_softmax_backward_float32(isa, restore_threads, rng, threads):
    fastnn.set_num_threads(threads)
    x = (3 * rng.standard_normal((1030, 69))).astype(F32)
    g = rng.standard_normal(x.shape).astype(F32)
    y = fastnn.log_softmax(x)
    got = fastnn.log_softmax_backward(g, y)
    g64, y64 = f64(g, y)
    want = g64 - np.exp(y64) * g64.sum(-1, keepdims=True)
    assert_close(got, want, F32, k=69)
    got = fastnn.softmax_backward(g, fastnn.softmax(x))
    ys = fastnn.softmax(x)
    assert_close(got, ref.softmax_backward(*f64(g, ys)), F32, k=69, scale=softmax_backward_scale(g, ys))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(37, 69, 41), (1, 1, 1), (129, 64, 17)])
def test_linear_backward_float32(isa, restore_threads, rng, threads, shape):
    fastnn.set_num_threads(threads)
    rows, n_in, n_out = shape
    x = rng.standard_normal((rows, n_in)).astype(F32)
    w = rng.standard_normal((n_in, n_out)).astype(F32)
    g = rng.standard_normal((rows, n_out)).astype(F32)
    got = fastnn.linear_backward(g, x, w)
    want = ref.linear_backward(*f64(g, x, w))
    for name, gg, ww, k in zip(("grad_x", "grad_weight", "grad_bias"), got, want, (n_out, rows, rows)):
        try:
            assert_close(gg, ww, F32, k=k)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
