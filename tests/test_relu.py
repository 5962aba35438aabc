"""relu and relu_backward: exact results on every size and layout, out= and in-place, NaN/inf, errors."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, LAYOUTS, Unchanged, f64, make_array, poisoned
from gpu_helpers import GPU_DTYPES, cp, gpu, gpu_check, needs_gpu, rand

SHAPES = [(0,), (1,), (7,), (15,), (16,), (17,), (31,), (32,), (33,), (63,), (64,), (65,), (127,),
          (1000,), (100003,), (3, 0, 2), (13, 31), (2, 3, 61), (257, 255)]


def assert_exact(got, expected, dtype):
    assert isinstance(got, np.ndarray)
    assert got.shape == expected.shape and got.dtype == np.dtype(dtype)
    assert np.array_equal(got, expected.astype(dtype), equal_nan=True)


def check_relu(rng, shape, dtype, layout="C"):
    x = make_array(rng, shape, dtype, layout)
    keep = Unchanged(x)
    got = fastnn.relu(x)
    keep.check()
    assert_exact(got, ref.relu(f64(x)), dtype)


def check_relu_backward(rng, shape, dtype, layout="C"):
    g = make_array(rng, shape, dtype, layout)
    x = make_array(rng, shape, dtype, layout)
    keep = Unchanged(g, x)
    got = fastnn.relu_backward(g, x)
    keep.check()
    assert_exact(got, ref.relu_backward(*f64(g, x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_shapes(rng, dtype, shape):
    check_relu(rng, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu_backward_shapes(rng, dtype, shape):
    check_relu_backward(rng, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_core_every_isa(isa, rng, dtype):
    for shape in [(1,), (7,), (16,), (17,), (33,), (65,), (1031,), (9, 13)]:
        check_relu(rng, shape, dtype)
        check_relu_backward(rng, shape, dtype)
    check_relu(rng, (17, 9), dtype, "step")
    check_relu_backward(rng, (17, 9), dtype, "T")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_relu_layouts(rng, dtype, layout):
    check_relu(rng, (13, 7, 5), dtype, layout)
    check_relu_backward(rng, (13, 7, 5), dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_mixed_layouts(rng, dtype):
    g = make_array(rng, (19, 11), dtype, "F")
    x = make_array(rng, (19, 11), dtype, "neg")
    assert_exact(fastnn.relu_backward(g, x), ref.relu_backward(*f64(g, x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_nan_inf(dtype):
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, -1.5, 2.5, np.nan], dtype)
    got = fastnn.relu(x)
    assert_exact(got, ref.relu(f64(x)), dtype)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_nan_inf(dtype):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1.0, -1.0, 2.0, np.nan, 3.0], dtype)
    g = np.array([1.0, 2.0, 3.0, 4.0, np.nan, np.nan, np.inf, -np.inf, -np.inf], dtype)
    got = fastnn.relu_backward(g, x)
    # NaN x counts as "not > 0": the gradient there is 0, whatever grad_output holds.
    expected = np.array([0, 2, 0, 0, np.nan, 0, np.inf, 0, -np.inf], dtype)
    assert_exact(got, expected, dtype)
    assert_exact(got, ref.relu_backward(*f64(g, x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (33,), (17, 5)])
def test_relu_out(rng, dtype, shape):
    x = make_array(rng, shape, dtype)
    out = poisoned(shape, dtype)
    keep = Unchanged(x)
    res = fastnn.relu(x, out=out)
    keep.check()
    assert res is out
    assert_exact(out, ref.relu(f64(x)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (65,), (1001,), (9, 31)])
def test_relu_in_place(rng, dtype, shape):
    x = make_array(rng, shape, dtype)
    expected = ref.relu(f64(x))
    res = fastnn.relu(x, out=x)
    assert res is x
    assert_exact(x, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_backward_out(rng, dtype):
    g = make_array(rng, (23, 9), dtype)
    x = make_array(rng, (23, 9), dtype)
    out = poisoned((23, 9), dtype)
    keep = Unchanged(g, x)
    res = fastnn.relu_backward(g, x, out=out)
    keep.check()
    assert res is out
    assert_exact(out, ref.relu_backward(*f64(g, x)), dtype)


def test_relu_out_errors():
    x = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="out"):
        fastnn.relu(x, out=np.empty((5, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        fastnn.relu(x, out=np.empty(20, np.float32))
    with pytest.raises(TypeError, match="out"):
        fastnn.relu(x, out=np.empty((4, 5), np.float64))
    ro = np.empty((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        fastnn.relu(x, out=ro)
    with pytest.raises(ValueError, match="out"):
        fastnn.relu_backward(x, x, out=np.empty((4, 4), np.float32))
    with pytest.raises(TypeError, match="out"):
        fastnn.relu_backward(x, x, out=np.empty((4, 5), np.float64))


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.int16, np.complex64, np.bool_, object])
def test_relu_bad_dtype(bad):
    x = np.ones((3, 4), dtype=bad)
    good = np.ones((3, 4), np.float32)
    with pytest.raises(TypeError):
        fastnn.relu(x)
    with pytest.raises(TypeError):
        fastnn.relu_backward(x, good)
    with pytest.raises(TypeError):
        fastnn.relu_backward(good, x)


def test_relu_backward_errors():
    with pytest.raises(TypeError):
        fastnn.relu_backward(np.ones(5, np.float32), np.ones(5, np.float64))
    with pytest.raises(ValueError):
        fastnn.relu_backward(np.ones(5, np.float32), np.ones(6, np.float32))
    with pytest.raises(ValueError):
        fastnn.relu_backward(np.ones((2, 3), np.float64), np.ones((3, 2), np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_zero_dim(dtype):
    # 0-d arrays are ordinary elementwise inputs (only matmul rejects them): a 0-d ndarray comes back.
    got = fastnn.relu(np.array(-2.0, dtype))
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == dtype and float(got) == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_out_overlapping_input(rng, dtype):
    # out overlaps x without being x: NumPy semantics, the result is relu of the original x.
    x = make_array(rng, (101,), dtype)
    expected = ref.relu(f64(x))
    res = fastnn.relu(x, out=x[::-1])
    assert_exact(x[::-1], expected, dtype)
    assert res.shape == (101,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["F", "step", "neg"])
def test_relu_in_place_views(rng, dtype, layout):
    base = make_array(rng, (9, 14), dtype)
    x = {"F": np.asfortranarray(base), "step": base[:, ::2], "neg": base[::-1]}[layout]
    untouched = base[:, 1::2].copy()
    expected = ref.relu(f64(x))
    res = fastnn.relu(x, out=x)
    assert res is x
    assert_exact(x, expected, dtype)
    if layout == "step":
        assert np.array_equal(base[:, 1::2], untouched), "wrote outside the view"


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4097, 1 << 20])
def test_relu_gpu(rng, variant, dtype, n):
    x = rand(rng, n, dtype)
    if n > 7:
        x[::7] = np.nan
    gpu_check(fastnn.relu(gpu(x)), ref.relu(f64(x)), dtype)
    g = rand(rng, n, dtype)
    gpu_check(fastnn.relu_backward(gpu(g), gpu(x)), ref.relu_backward(f64(g), f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_relu_views_out_and_in_place_gpu(rng, variant, dtype):
    base = rand(rng, (33, 70), dtype)
    x = gpu(base)[:, 3:68:2]               # strided view, misaligned start
    want = ref.relu(f64(base[:, 3:68:2]))
    gpu_check(fastnn.relu(x), want, dtype)
    out = cp.full(x.shape, cp.nan, dtype)   # poisoned out=
    assert fastnn.relu(x, out=out) is out
    gpu_check(out, want, dtype)
    y = gpu(base)
    assert fastnn.relu(y, out=y) is y       # in place
    gpu_check(y, ref.relu(f64(base)), dtype)
    xt = gpu(base).T                        # Fortran-ordered view
    gpu_check(fastnn.relu(xt), ref.relu(f64(base.T)), dtype)
    g = rand(rng, (33, 70), dtype)
    dout = cp.full((33, 70), cp.nan, dtype)
    gpu_check(fastnn.relu_backward(gpu(g), gpu(base), out=dout), ref.relu_backward(f64(g), f64(base)), dtype)
