"""softmax, log_softmax and softmax_backward: every axis, size and layout, large magnitudes, NaN/inf, out=, errors."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import (DTYPES, LAYOUTS, Unchanged, assert_close, f64, make_array, poisoned,
                      softmax_backward_scale)
from gpu_helpers import GPU_DTYPES, cp, gpu, gpu_check, needs_gpu, rand

SHAPES = [(1, 1), (1, 7), (7, 1), (13, 31), (15, 16), (16, 17), (17, 15), (33, 63), (64, 65),
          (63, 64), (3, 255), (2, 256), (5, 257), (2, 3, 127), (3, 1025), (61, 32)]
FUNCS = ["softmax", "log_softmax"]


def check_forward(rng, name, shape, dtype, axis=-1, layout="C", scale=1.0):
    x = make_array(rng, shape, dtype, layout, scale)
    keep = Unchanged(x)
    got = getattr(fastnn, name)(x, axis=axis)
    keep.check()
    expected = getattr(ref, name)(f64(x), axis=axis)
    assert_close(got, expected, dtype, k=shape[axis])
    return got


def check_backward(rng, shape, dtype, axis=-1, layout="C"):
    x = make_array(rng, shape, dtype, layout)
    y = ref.softmax(f64(x), axis=axis).astype(dtype)
    g = make_array(rng, shape, dtype, layout)
    keep = Unchanged(g, y)
    got = fastnn.softmax_backward(g, y, axis=axis)
    keep.check()
    assert_close(got, ref.softmax_backward(*f64(g, y), axis=axis), dtype, k=shape[axis],
                 scale=softmax_backward_scale(g, y, axis))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FUNCS)
def test_forward_shapes(rng, name, dtype, shape):
    got = check_forward(rng, name, shape, dtype)
    if name == "softmax":
        assert np.allclose(got.sum(axis=-1), 1, rtol=0, atol=10 * shape[-1] * np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_shapes(rng, dtype, shape):
    check_backward(rng, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_core_every_isa(isa, rng, dtype):
    for shape in [(1, 1), (3, 7), (5, 16), (4, 17), (2, 33), (3, 65), (2, 1025)]:
        for name in FUNCS:
            check_forward(rng, name, shape, dtype)
        check_backward(rng, shape, dtype)
    for name in FUNCS:
        check_forward(rng, name, (9, 33), dtype, axis=0, layout="T")
        check_forward(rng, name, (7, 31), dtype, scale=1e4 if dtype == np.float32 else 1e30)
    check_backward(rng, (9, 33), dtype, axis=0, layout="step")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS + ["backward"])
@pytest.mark.parametrize("shape,axis", [
    ((13, 7), 0), ((13, 7), 1), ((13, 7), -2), ((5, 6, 7), 0), ((5, 6, 7), 1), ((5, 6, 7), 2),
    ((5, 6, 7), -1), ((5, 6, 7), -3), ((2, 3, 4, 33), 2), ((9,), 0), ((9,), -1),
])
def test_axes(rng, name, dtype, shape, axis):
    if name == "backward":
        check_backward(rng, shape, dtype, axis=axis)
    else:
        check_forward(rng, name, shape, dtype, axis=axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [0, -1])
def test_layouts(rng, dtype, layout, axis):
    for name in FUNCS:
        check_forward(rng, name, (11, 37), dtype, axis=axis, layout=layout)
    check_backward(rng, (11, 37), dtype, axis=axis, layout=layout)
    check_forward(rng, "softmax", (3, 5, 19), dtype, axis=1, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_mixed_layouts(rng, dtype):
    x = make_array(rng, (17, 23), dtype)
    y = np.asfortranarray(ref.softmax(f64(x)).astype(dtype))
    g = make_array(rng, (17, 23), dtype, "neg")
    assert_close(fastnn.softmax_backward(g, y), ref.softmax_backward(*f64(g, y)), dtype, k=23,
                 scale=softmax_backward_scale(g, y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("shape,axis", [((0, 5), -1), ((5, 0), 0), ((3, 0, 4), -1), ((0,), 0)])
def test_empty(name, dtype, shape, axis):
    x = np.ones(shape, dtype)
    got = getattr(fastnn, name)(x, axis=axis)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    got = fastnn.softmax_backward(x, x, axis=axis)
    assert got.shape == shape and got.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
def test_empty_reduction_axis(name, dtype):
    # Softmax over a zero-length axis: nothing to normalize, the result is empty too.
    x = np.ones((4, 0), dtype)
    got = getattr(fastnn, name)(x, axis=-1)
    assert got.shape == (4, 0)


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype,scale", [(np.float32, 1e2), (np.float32, 1e4), (np.float32, 1e30),
                                         (np.float64, 1e2), (np.float64, 1e4), (np.float64, 1e30),
                                         (np.float64, 1e300)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the error norm of 1e300 values
def test_large_magnitudes(rng, name, dtype, scale):
    check_forward(rng, name, (9, 67), dtype, scale=scale)
    check_forward(rng, name, (9, 67), dtype, axis=0, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
def test_outliers(rng, name, dtype):
    x = make_array(rng, (8, 129), dtype)
    x[0, 5] = 1e4
    x[1, 128] = -1e4
    x[2, :] += 1e4
    x[3, :] -= 3e4
    x[4, 0] = 80.0     # exp(80) overflows float32 without the max shift
    x[5, 64] = 700.0   # ... and exp(700) nearly overflows float64
    x[6, :] = 0        # uniform row
    keep = Unchanged(x)
    got = getattr(fastnn, name)(x)
    keep.check()
    assert_close(got, getattr(ref, name)(f64(x)), dtype, k=129)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the oracle on inf - inf
def test_nan_inf(rng, name, dtype):
    x = make_array(rng, (6, 40), dtype)
    x[0, 3] = np.nan        # NaN row
    x[1, 7] = np.inf        # +inf: inf - inf = NaN, whole row NaN as in plain NumPy
    x[2, 9] = -np.inf       # -inf: weight 0 (log: -inf), rest finite
    x[2, 30] = -np.inf
    x[3, :] = -np.inf       # all -inf: 0/0 = NaN
    x[4, 0] = np.nan
    x[4, 1] = np.inf
    got = getattr(fastnn, name)(x)
    expected = getattr(ref, name)(f64(x))
    assert np.isnan(expected[0]).all() and np.isnan(expected[1]).all() and np.isfinite(expected[5]).all()
    assert_close(got, expected, dtype, k=40)
    got = getattr(fastnn, name)(np.ascontiguousarray(x.T), axis=0)
    assert_close(got, expected.T, dtype, k=40)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_nan(rng, dtype):
    y = ref.softmax(make_array(rng, (4, 21), np.float64)).astype(dtype)
    g = make_array(rng, (4, 21), dtype)
    g[1, 5] = np.nan
    y[2, 3] = np.nan
    assert_close(fastnn.softmax_backward(g, y), ref.softmax_backward(*f64(g, y)), dtype, k=21,
                 scale=softmax_backward_scale(g, y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("axis", [-1, 0])
def test_out(rng, name, dtype, axis):
    x = make_array(rng, (19, 33), dtype)
    out = poisoned(x.shape, dtype)
    keep = Unchanged(x)
    res = getattr(fastnn, name)(x, axis=axis, out=out)
    keep.check()
    assert res is out
    assert_close(out, getattr(ref, name)(f64(x), axis=axis), dtype, k=x.shape[axis])


@pytest.mark.parametrize("name", FUNCS)
def test_out_errors(name):
    f = getattr(fastnn, name)
    x = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="out"):
        f(x, out=np.empty((5, 4), np.float32))
    with pytest.raises(TypeError, match="out"):
        f(x, out=np.empty((4, 5), np.float64))
    ro = np.empty((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        f(x, out=ro)


@pytest.mark.parametrize("name", FUNCS + ["backward"])
@pytest.mark.parametrize("axis", [2, -3, 100])
def test_bad_axis(name, axis):
    x = np.ones((3, 4), np.float64)
    with pytest.raises(ValueError, match="axis"):
        if name == "backward":
            fastnn.softmax_backward(x, x, axis=axis)
        else:
            getattr(fastnn, name)(x, axis=axis)


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.int16, np.complex128, np.bool_, object])
def test_bad_dtype(bad):
    x = np.ones((3, 4), dtype=bad)
    good = np.ones((3, 4), np.float64)
    with pytest.raises(TypeError):
        fastnn.softmax(x)
    with pytest.raises(TypeError):
        fastnn.log_softmax(x)
    with pytest.raises(TypeError):
        fastnn.softmax_backward(x, good)
    with pytest.raises(TypeError):
        fastnn.softmax_backward(good, x)


def test_backward_errors():
    with pytest.raises(TypeError):
        fastnn.softmax_backward(np.ones((2, 3), np.float32), np.ones((2, 3), np.float64))
    with pytest.raises(ValueError):
        fastnn.softmax_backward(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        fastnn.softmax_backward(np.ones((2, 3)), np.ones((1, 3)))


@pytest.mark.parametrize("name", FUNCS)
def test_zero_dim_rejected(name):
    # A 0-d input has no axis -1: ValueError (as NumPy's reductions raise AxisError, a ValueError).
    with pytest.raises(ValueError):
        getattr(fastnn, name)(np.array(1.0))


# Results of 8 MiB and more with rows of 2 KiB and more are streamed past the cache (softmax and
# cross_entropy from a scratch row: on the stack up to 8 KiB, else the heap; rows beyond 512 KiB are
# computed in the output itself; softmax_backward directly). Odd row lengths start most rows off a cache
# line, so the partial heads and tails are exercised too.
STREAMED = [(np.float32, (1031, 2053)), (np.float64, (517, 2053)), (np.float32, (2053, 1031)),
            (np.float32, (17, 131101))]


@pytest.mark.parametrize("dtype,shape", STREAMED)
def test_streamed_results(isa, rng, dtype, shape):
    if isa != fastnn.info()["cpu_isa_supported"][-1] and shape[1] > 100000:
        pytest.skip("the long-row case runs on the best path only")
    x = make_array(rng, shape, dtype)
    x64 = f64(x)
    for name in FUNCS:
        out = poisoned(shape, dtype)
        assert getattr(fastnn, name)(x, out=out) is out
        assert_close(out, getattr(ref, name)(x64), dtype, k=shape[1])
    y = ref.softmax(x64).astype(dtype)
    g = make_array(rng, shape, dtype)
    got = fastnn.softmax_backward(g, y)
    assert_close(got, ref.softmax_backward(*f64(g, y)), dtype, k=shape[1], scale=softmax_backward_scale(g, y))
    labels = rng.integers(0, shape[1], shape[0])
    loss, grad = fastnn.cross_entropy(x, labels)
    ref_loss, ref_grad = ref.cross_entropy(x64, labels)
    assert abs(loss - ref_loss) <= (1e-5 if dtype == np.float32 else 1e-12) * abs(ref_loss)
    assert_close(grad, ref_grad, dtype, k=shape[1])


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

SOFTMAX_SHAPES = [(1, 1), (3, 31), (5, 32), (4, 33), (17, 1000), (3, 1024), (2, 1025), (3, 4099), (2, 3, 50)]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax_and_log_softmax_gpu(rng, variant, dtype, shape):
    x = rand(rng, shape, dtype, scale=3.0)
    x.reshape(-1, shape[-1])[0, 0] = 60.0    # an outlier: the max must be subtracted
    for fn, oracle in ((fastnn.softmax, ref.softmax), (fastnn.log_softmax, ref.log_softmax)):
        gpu_check(fn(gpu(x)), oracle(f64(x)), dtype)
        gpu_check(fn(gpu(x), axis=0), oracle(f64(x), axis=0), dtype)
        out = cp.full(shape, cp.nan, dtype)
        assert fn(gpu(x), out=out) is out
        gpu_check(out, oracle(f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_softmax_special_rows_gpu(variant, dtype):
    x = np.array([[0.0, -np.inf, 1.0, 2.0],       # -inf entries: probability 0
                  [1.0, np.nan, 0.0, 0.0],        # NaN: the whole row NaN (as NumPy's formula)
                  [0.0, np.inf, 1.0, 1.0],        # +inf: NaN
                  [1e4, -1e4, 0.0, 1e4]], dtype)
    with np.errstate(invalid="ignore"):
        gpu_check(fastnn.softmax(gpu(x)), ref.softmax(f64(x)), dtype)
        gpu_check(fastnn.log_softmax(gpu(x)), ref.log_softmax(f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (7, 1000), (2, 2049)])
def test_softmax_backward_gpu(rng, variant, dtype, shape):
    x = rand(rng, shape, dtype, scale=2.0)
    g = rand(rng, shape, dtype)
    y = ref.softmax(f64(x)).astype(dtype)
    terms = np.abs(f64(y)) * (np.abs(f64(g)) + np.sum(np.abs(f64(g * y)), axis=-1, keepdims=True))
    gpu_check(fastnn.softmax_backward(gpu(g), gpu(y)), ref.softmax_backward(f64(g), f64(y)), dtype,
          scale=float(np.linalg.norm(terms)))
    ly = ref.log_softmax(f64(x)).astype(dtype)
    want = f64(g) - np.exp(f64(ly)) * np.sum(f64(g), axis=-1, keepdims=True)
    lterms = np.abs(f64(g)) + np.exp(f64(ly)) * np.sum(np.abs(f64(g)), axis=-1, keepdims=True)
    gpu_check(fastnn.log_softmax_backward(gpu(g), gpu(ly)), want, dtype, scale=float(np.linalg.norm(lterms)))
    gpu_check(fastnn.softmax_backward(gpu(g), gpu(y), axis=0), ref.softmax_backward(f64(g), f64(y), axis=0), dtype,
          scale=float(np.linalg.norm(terms)))
