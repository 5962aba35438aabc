"""The vector exp every kernel uses (softmax, log_softmax backward, cross_entropy, attention), on every ISA path:
within EXP_ULP ulp of exp over its whole input range (results in the subnormal range and at the overflow edge
included), the same special values everywhere; and the ops give the same tiny results on every path."""
import math
import os

import numpy as np
import pytest

import fastnn
from fastnn import _C
from fastnn import reference as ref
from conftest import f64

# The bound the kernels' exp is held to, in ulps of the exact result (the spacing of the result's type at the
# exact value; 2^-149 / 2^-1074 in the subnormal range). Measured: float 1.06 ulp (AVX2, AVX-512), 1.34 ulp
# (generic: no FMA); double 0.88 (AVX2, AVX-512) and 1.17 ulp (generic).
EXP_ULP = 1.5
LONG_DOUBLE = np.finfo(np.longdouble).nmant >= 63


def vexp(x):
    y = np.full_like(x, np.nan)
    _C._exp(x, y)
    return y


def ulp_error(x):
    """|vexp(x) - exp(x)| in ulps of exp(x), inf counted as 2^128 (2^1024) for both."""
    if x.dtype == np.float32:
        # float64 is exact enough for a float32 result; past [-200, 100] it is 0 / inf in float32 anyway.
        exact = np.exp(np.clip(x.astype(np.float64), -200.0, 100.0))
        top, emax, tiny = 2.0**128, 2.0**127, 2.0**-149
        got = vexp(x).astype(np.float64)
    else:
        exact = np.exp(np.clip(x.astype(np.longdouble), -1000, 1000))
        top, emax, tiny = np.longdouble(2.0)**1024, np.longdouble(2.0)**1023, np.longdouble(2.0)**-1074
        got = vexp(x).astype(np.longdouble)
    got[np.isposinf(got)] = top
    exact = np.minimum(exact, top)   # from 2^128 (2^1024) up, exp is inf: no error there
    # Spacing of the result type at the exact value: the subnormal spacing below the normal range, and
    # at and past the largest finite number the spacing of the top binade.
    with np.errstate(over="ignore"):
        sp = np.spacing(np.minimum(exact, emax).astype(x.dtype)).astype(exact.dtype)
    sp = np.maximum(sp, tiny)
    return np.abs(got - exact) / sp


def edges(dtype):
    """Every value of `dtype` in windows around the points where exp changes regime, plus a dense sweep."""
    f = np.finfo(dtype)
    ln = lambda v: math.log(float(v))
    points = [ln(f.max), ln(f.tiny), ln(f.smallest_subnormal), ln(f.smallest_subnormal) - math.log(2), 0.0,
              -87.2, 88.0, -100.0]
    out = []
    for p in points:
        c = dtype(p)
        steps = np.arange(-4000, 4000)
        w = np.nextafter(c, np.inf if p >= 0 else -np.inf, dtype=dtype)  # a value near c in dtype
        out.append(c + (np.spacing(np.abs(w)) * steps).astype(dtype))
    lo, hi = dtype(ln(f.smallest_subnormal) - math.log(2) - 1), dtype(ln(f.max) + 1)
    out.append(np.linspace(lo, hi, 400_001, dtype=dtype))
    out.append(np.geomspace(dtype(1e-30), dtype(1), 20_001, dtype=dtype))
    out.append(-np.geomspace(dtype(1e-30), dtype(1), 20_001, dtype=dtype))
    return np.concatenate(out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_ulp_bound(isa, dtype):
    if dtype == np.float64 and not LONG_DOUBLE:
        pytest.skip("needs an 80-bit long double for the float64 reference")
    x = edges(dtype)
    err = ulp_error(x)
    worst = int(np.argmax(err))
    assert err[worst] <= EXP_ULP, f"{isa}: exp({x[worst]!r}) off by {err[worst]:.3f} ulp"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_special_values(isa, dtype):
    f = np.finfo(dtype)
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, f.max, -f.max, f.tiny, -f.tiny,
                  f.smallest_subnormal], dtype)
    nan_payload = np.array([0x7FC00001, 0x7FC003FF, 0xFFC00155, 0x7F800001], np.uint32).view(np.float32)
    if dtype == np.float32:
        x = np.concatenate([x, nan_payload])
    y = vexp(x)
    want = np.exp(x.astype(np.float64)).astype(dtype) if dtype == np.float32 else np.exp(x)
    assert np.array_equal(y, want, equal_nan=True), f"{isa}: {y} != {want}"
    assert np.isnan(y[np.isnan(x)]).all()


def test_issue_example_softmax_tiny_value(isa):
    got = fastnn.softmax(np.array([[0.0, -87.2]], np.float32))
    assert got[0, 0] == 1 and abs(got[0, 1] - np.float32(1.3474805e-38)) <= np.spacing(np.float32(1.3474805e-38))


def _ulps(got, want, dtype):
    """Elementwise |got - want| in ulps of want (subnormal spacing below the normal range)."""
    want = np.asarray(want, np.float64)
    sp = np.maximum(np.spacing(np.abs(want).astype(dtype)).astype(np.float64), np.finfo(dtype).smallest_subnormal)
    return np.abs(np.asarray(got, np.float64) - want) / sp


def _tiny_row(dtype):
    """A row whose softmax holds results from normal down through the subnormal range to 0."""
    if dtype == np.float32:
        tail = [-80.0, -87.2, -88.5, -90.0, -95.0, -100.0, -103.0, -103.9, -110.0]
    else:
        tail = [-700.0, -708.3, -709.0, -720.0, -740.0, -744.0, -745.1, -760.0]
    row = np.array([0.0] + tail * 3 + [-1.0, -2.0], dtype)   # 30 or 27 entries: body and tail of a vector
    return row


# Results made of exp(x) for tiny exp(x) are within a few ulps of the oracle's (the subnormal spacing
# included) on every path; a flushed 0 would be off by up to 2^23 ulps.
OP_ULP = 4


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_tiny_results_every_path(isa, dtype):
    x = np.stack([_tiny_row(dtype), _tiny_row(dtype)[::-1].copy()])
    assert np.array_equal(_ulps(fastnn.softmax(x), ref.softmax(f64(x)), dtype) <= OP_ULP, np.ones(x.shape, bool))
    # log_softmax backward: g - exp(y) * sum(g), with exp(y) tiny: the tiny part shows with g = 0 there.
    y = fastnn.log_softmax(x)
    g = np.zeros_like(x)
    g[:, 0] = -1.0
    got = fastnn.log_softmax_backward(g, y)
    want = f64(g) - np.exp(f64(y)) * f64(g).sum(-1, keepdims=True)
    assert (_ulps(got, want, dtype) <= OP_ULP).all(), (got, want)
    # cross_entropy's gradient: (softmax - onehot) / N.
    loss, grad = fastnn.cross_entropy(x, np.array([0, 0]))
    rloss, rgrad = ref.cross_entropy(f64(x), np.array([0, 0]))
    assert (_ulps(grad, rgrad, dtype) <= OP_ULP).all()
    assert abs(loss - rloss) <= 1e-6 * max(1.0, abs(rloss))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_tiny_weights_every_path(isa, dtype):
    # One query, keys chosen so that q . k are the tiny row's scores, and V the identity: the output row
    # is the weights themselves. Forward and the backward's recomputed P both use the vector exp.
    s = _tiny_row(dtype)
    n = s.size
    q = np.ones((1, 1, 1, 1), dtype)
    k = s.reshape(1, 1, n, 1).copy()
    v = np.eye(n, dtype=dtype).reshape(1, 1, n, n)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True)
    want = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), scale=1.0)
    assert (_ulps(out, want, dtype) <= OP_ULP).all(), (out, want)
    # grad_value = P^T dO: with dO = ones, row j of grad_value is P_j in every column.
    _, _, dv = fastnn.scaled_dot_product_attention_backward(np.ones_like(out), q, k, v, out, lse, scale=1.0)
    _, _, rdv = ref.scaled_dot_product_attention_backward(np.ones(out.shape), f64(q), f64(k), f64(v), None, None,
                                                          scale=1.0)
    # The backward recomputes P = exp(s - lse): the rounding of s - lse (half an ulp of |s|) is a relative
    # error of up to |s| * eps / 2 in P, at any magnitude (as in every flash-style backward).
    rel = np.abs(s).max() * np.finfo(dtype).eps
    err = np.abs(dv.astype(np.float64) - rdv)
    tol = OP_ULP * np.finfo(dtype).smallest_subnormal + rel * np.abs(rdv)
    assert (err <= tol).all(), (dv[..., 0], rdv[..., 0])


@pytest.mark.slow
def test_exp_float32_exhaustive(isa, request):
    """All 2^32 float32 inputs (minutes per path): with `-m slow` or FASTNN_TEST_BIG=1, like tests/test_big.py."""
    if not (os.environ.get("FASTNN_TEST_BIG") or "slow" in (request.config.getoption("-m") or "")):
        pytest.skip("the exhaustive exp test runs with `-m slow` or FASTNN_TEST_BIG=1")
    worst = (0.0, None)
    for c in range(256):
        x = np.arange(c << 24, (c + 1) << 24, dtype=np.uint64).astype(np.uint32).view(np.float32)
        finite = np.isfinite(x)
        err = ulp_error(x[finite])
        i = int(np.argmax(err))
        if err[i] > worst[0]:
            worst = (float(err[i]), x[finite][i])
        nan = np.isnan(x)
        assert np.isnan(vexp(x[nan])).all()
    assert worst[0] <= EXP_ULP, f"{isa}: exp({worst[1]!r}) off by {worst[0]:.3f} ulp"
