"""matmul and linear against the NumPy oracle: awkward sizes, views, broadcasting, out=, NaN/inf, errors."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, LAYOUTS, Unchanged, assert_close, f64, make_array, poisoned
from gpu_helpers import GPU_DTYPES, cp, gpu, gpu_check, needs_gpu, rand

SIZES_2D = [
    (1, 1, 1), (1, 7, 1), (7, 1, 13), (13, 31, 7), (15, 16, 17), (16, 16, 16), (17, 15, 16),
    (31, 32, 33), (33, 65, 31), (63, 64, 65), (65, 63, 64), (127, 61, 3), (3, 127, 61),
    (1, 257, 255), (255, 1, 257), (257, 33, 1), (129, 300, 97),
    (13, 385, 17),  # one past the K block of float32 on AVX2 (384; 256 elsewhere): two K blocks on every path
]


def check_matmul(rng, a_shape, b_shape, dtype, a_layout="C", b_layout="C"):
    a = make_array(rng, a_shape, dtype, a_layout)
    b = make_array(rng, b_shape, dtype, b_layout)
    keep = Unchanged(a, b)
    got = fastnn.matmul(a, b)
    keep.check()
    expected = ref.matmul(*f64(a, b))
    k = a_shape[-1]
    assert_close(got, expected, dtype, k=k)  # vector . vector: a 0-d ndarray (check_dtype asserts ndarray)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SIZES_2D)
def test_matmul_2d_sizes(rng, dtype, m, k, n):
    check_matmul(rng, (m, k), (k, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 5), (16, 17, 15), (33, 64, 31), (65, 31, 129)])
def test_matmul_core_every_isa(isa, rng, dtype, m, k, n):
    check_matmul(rng, (m, k), (k, n), dtype)
    check_matmul(rng, (3, m, k), (k, n), dtype, "step", "T")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_layout", LAYOUTS)
@pytest.mark.parametrize("b_layout", LAYOUTS)
def test_matmul_layouts(rng, dtype, a_layout, b_layout):
    check_matmul(rng, (37, 19), (19, 23), dtype, a_layout, b_layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_batched_layouts(rng, dtype, layout):
    check_matmul(rng, (3, 17, 9), (3, 9, 11), dtype, layout, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,b_shape", [
    ((7,), (7, 5)),            # 1-D a: prepended dimension removed
    ((9, 7), (7,)),            # 1-D b: appended dimension removed
    ((13,), (13,)),            # vector . vector -> 0-d
    ((1,), (1,)),
    ((4, 7), (3, 7, 5)),       # 2-D a broadcast against a batch
    ((3, 9, 7), (7, 5)),
    ((2, 1, 9, 7), (3, 7, 5)),  # batch dims broadcast 1 -> 3 and prepended
    ((2, 3, 9, 7), (1, 3, 7, 5)),
    ((6,), (2, 3, 6, 4)),
    ((2, 3, 5, 6), (6,)),
    ((1, 1, 1), (1, 1, 1)),
])
def test_matmul_promotion_and_broadcast(rng, dtype, a_shape, b_shape):
    check_matmul(rng, a_shape, b_shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,b_shape", [
    ((5, 0), (0, 7)),          # K = 0 -> zeros
    ((0, 5), (5, 7)),
    ((5, 7), (7, 0)),
    ((0, 0), (0, 0)),
    ((0,), (0,)),
    ((3, 0, 4), (4, 2)),
    ((0, 4, 5), (5, 2)),
    ((2, 4, 0), (2, 0, 3)),
    ((0,), (0, 6)),
])
def test_matmul_empty(rng, dtype, a_shape, b_shape):
    a = make_array(rng, a_shape, dtype)
    b = make_array(rng, b_shape, dtype)
    got = np.asarray(fastnn.matmul(a, b))
    expected = np.matmul(a, b)
    assert got.shape == expected.shape
    assert got.dtype == np.dtype(dtype)
    assert np.all(got == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_k0_writes_zeros_into_out(dtype):
    out = poisoned((4, 6), dtype)
    res = fastnn.matmul(np.ones((4, 0), dtype), np.ones((0, 6), dtype), out=out)
    assert res is out
    assert np.all(out == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("a_shape,b_shape", [((33, 17), (17, 65)), ((2, 5, 7), (7, 3)), ((7,), (7, 4))])
def test_matmul_out(rng, dtype, a_shape, b_shape):
    a = make_array(rng, a_shape, dtype)
    b = make_array(rng, b_shape, dtype)
    out = poisoned(np.matmul(a, b).shape, dtype)
    res = fastnn.matmul(a, b, out=out)
    assert res is out
    assert_close(out, ref.matmul(*f64(a, b)), dtype, k=a_shape[-1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_out_noncontiguous_or_rejected(rng, dtype):
    a = make_array(rng, (9, 5), dtype)
    b = make_array(rng, (5, 7), dtype)
    base = poisoned((9, 14), dtype)
    view = base[:, ::2]
    res = fastnn.matmul(a, b, out=view)  # a strided out= is written in place, as np.matmul does
    assert res is view
    assert_close(view, ref.matmul(*f64(a, b)), dtype, k=5)
    assert np.all(np.isnan(base[:, 1::2])), "wrote outside the out view"


def test_matmul_out_errors(rng):
    a = make_array(rng, (4, 3), np.float32)
    b = make_array(rng, (3, 5), np.float32)
    with pytest.raises(ValueError, match="out"):
        fastnn.matmul(a, b, out=np.zeros((5, 4), np.float32))
    with pytest.raises(ValueError, match="out"):
        fastnn.matmul(a, b, out=np.zeros((4, 5, 1), np.float32))
    with pytest.raises(TypeError, match="out"):
        fastnn.matmul(a, b, out=np.zeros((4, 5), np.float64))
    ro = np.zeros((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        fastnn.matmul(a, b, out=ro)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_large_random_vector_check(rng, dtype):
    # C t == A (B t): an O(n^2) check of an O(n^3) product.
    m, k, n = 515, 384, 449
    a = make_array(rng, (m, k), dtype)
    b = make_array(rng, (k, n), dtype)
    c = fastnn.matmul(a, b)
    assert c.shape == (m, n) and c.dtype == np.dtype(dtype)
    t = rng.standard_normal(n)
    assert_close(c.astype(np.float64) @ t, f64(a) @ (f64(b) @ t), dtype, k=k, check_dtype=False)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 on purpose
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_nan_inf_propagate(rng, dtype):
    a = make_array(rng, (19, 23), dtype)
    b = make_array(rng, (23, 17), dtype)
    a[3, 5] = np.nan
    a[7, :] = 0
    a[7, 2] = np.inf          # row 7: inf * b[2, j], sign follows b
    b[4, 9] = -np.inf         # column 9: -inf * a[i, 4]
    b[:, 11] = np.nan
    got = fastnn.matmul(a, b)
    expected = np.matmul(*f64(a, b))
    assert np.isnan(expected).any() and np.isinf(expected).any()
    assert_close(got, expected, dtype, k=23)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_large_magnitudes(rng, dtype):
    big = 1e18 if dtype == np.float32 else 1e150
    a = make_array(rng, (21, 13), dtype, scale=big)
    b = make_array(rng, (13, 9), dtype, scale=1.0 / big)
    assert_close(fastnn.matmul(a, b), ref.matmul(*f64(a, b)), dtype, k=13)


@pytest.mark.parametrize("bad", [np.int32, np.int64, np.int16, np.complex64, np.complex128, np.bool_, object])
def test_matmul_bad_dtype(bad):
    good = np.ones((3, 3), np.float32)
    x = np.ones((3, 3), dtype=bad)
    with pytest.raises(TypeError):
        fastnn.matmul(x, good)
    with pytest.raises(TypeError):
        fastnn.matmul(good, x)


def test_matmul_mixed_dtype():
    with pytest.raises(TypeError):
        fastnn.matmul(np.ones((3, 3), np.float32), np.ones((3, 3), np.float64))


@pytest.mark.parametrize("a_shape,b_shape", [
    ((3, 4), (5, 6)), ((4,), (5,)), ((3, 4), (3,)), ((2, 3, 4), (3, 4, 5)), ((2, 3, 4), (2, 5, 6)),
])
def test_matmul_shape_errors(a_shape, b_shape):
    with pytest.raises(ValueError):
        fastnn.matmul(np.ones(a_shape), np.ones(b_shape))


def test_matmul_zero_dim_rejected():
    with pytest.raises(ValueError):
        fastnn.matmul(np.array(2.0), np.ones((3,)))
    with pytest.raises(ValueError):
        fastnn.matmul(np.ones((3, 3)), np.ones(()))


# ---------------------------------------------------------------- linear


def check_linear(rng, m, k, n, dtype, use_bias, activation, x_layout="C", w_layout="C"):
    x = make_array(rng, (m, k), dtype, x_layout)
    w = make_array(rng, (k, n), dtype, w_layout)
    bias = make_array(rng, (n,), dtype) if use_bias else None
    keep = Unchanged(x, w, bias)
    got = fastnn.linear(x, w, bias, activation=activation)
    keep.check()
    assert_close(got, ref.linear(*f64(x, w, bias), activation=activation), dtype, k=k + 1)
    if activation == "relu":
        assert np.all(got >= 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 13, 31), (16, 17, 15), (64, 784, 128), (33, 63, 65)])
def test_linear(rng, dtype, use_bias, activation, m, k, n):
    check_linear(rng, m, k, n, dtype, use_bias, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_core_every_isa(isa, rng, dtype, activation):
    for m, k, n in [(1, 1, 1), (15, 17, 33), (31, 64, 65)]:
        check_linear(rng, m, k, n, dtype, True, activation)
        check_linear(rng, m, k, n, dtype, False, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_layouts(rng, dtype, layout):
    check_linear(rng, 29, 19, 23, dtype, True, "relu", layout, layout)
    check_linear(rng, 29, 19, 23, dtype, True, None, "C", layout)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bias_view(rng, dtype):
    x = make_array(rng, (11, 7), dtype)
    w = make_array(rng, (7, 9), dtype)
    bias = make_array(rng, (18,), dtype)[::-2]
    assert_close(fastnn.linear(x, w, bias), ref.linear(*f64(x, w, bias)), dtype, k=8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_empty(rng, dtype):
    bias = make_array(rng, (5,), dtype)
    got = fastnn.linear(np.ones((0, 3), dtype), np.ones((3, 5), dtype), bias)
    assert got.shape == (0, 5) and got.dtype == np.dtype(dtype)
    got = fastnn.linear(np.ones((4, 0), dtype), np.ones((0, 5), dtype), bias, activation="relu")
    assert_close(got, np.broadcast_to(np.maximum(f64(bias), 0), (4, 5)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_relu_nan(rng, dtype):
    x = make_array(rng, (5, 4), dtype)
    x[2, 1] = np.nan
    w = make_array(rng, (4, 3), dtype)
    got = fastnn.linear(x, w, None, activation="relu")
    assert_close(got, ref.linear(*f64(x, w), activation="relu"), dtype, k=4)


def test_linear_errors():
    x = np.ones((4, 3), np.float32)
    w = np.ones((3, 5), np.float32)
    b = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="weight"):
        fastnn.linear(x, np.ones((4, 5), np.float32), b)
    with pytest.raises(ValueError, match="weight"):
        fastnn.linear(x, np.ones(3, np.float32), b)
    with pytest.raises(ValueError, match="bias"):
        fastnn.linear(x, w, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="bias"):
        fastnn.linear(x, w, np.ones((1, 5), np.float32))
    for bad in ("gelu", "RELU", "\ud800", 1, b"relu"):   # a lone surrogate cannot even be encoded
        with pytest.raises(ValueError, match="activation"):
            fastnn.linear(x, w, b, activation=bad)
    with pytest.raises(TypeError):
        fastnn.linear(x, w.astype(np.float64), b)
    with pytest.raises(TypeError):
        fastnn.linear(x, w, b.astype(np.float64))
    with pytest.raises(TypeError):
        fastnn.linear(x.astype(np.int32), w, b)
    with pytest.raises(TypeError):
        fastnn.linear(x, w, b.astype(np.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_out_aliases_input(rng, dtype):
    # out overlapping an operand: the result is the product of the original operands, as in NumPy.
    a = make_array(rng, (17, 17), dtype)
    b = make_array(rng, (17, 17), dtype)
    expected = ref.matmul(*f64(a, b))
    res = fastnn.matmul(a, b, out=a)
    assert res is a
    assert_close(a, expected, dtype, k=17)
    a = make_array(rng, (9, 9), dtype)
    expected = ref.matmul(*f64(a, a))
    fastnn.matmul(a, a, out=a)
    assert_close(a, expected, dtype, k=9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape", [(7,), (2, 5, 7), (3, 1, 4, 7)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_batched_input(rng, dtype, x_shape, activation):
    # x (..., in) @ weight (in, out) + bias, with matmul's handling of the leading dimensions.
    x = make_array(rng, x_shape, dtype, "step")
    w = make_array(rng, (7, 13), dtype)
    bias = make_array(rng, (13,), dtype)
    keep = Unchanged(x, w, bias)
    got = fastnn.linear(x, w, bias, activation=activation)
    keep.check()
    assert_close(got, ref.linear(*f64(x, w, bias), activation=activation), dtype, k=8)


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

MATMUL_SHAPES = [  # (a shape, b shape)
    ((1, 1), (1, 1)), ((7, 13), (13, 5)), ((127, 129), (129, 65)), ((128, 128), (128, 128)),
    ((129, 257), (257, 33)), ((64, 784), (784, 128)), ((3, 17, 19), (3, 19, 23)), ((3, 1, 17, 19), (4, 19, 23)),
    ((19,), (19, 7)), ((5, 19), (19,)), ((19,), (19,)), ((8, 0), (0, 9)), ((256, 512), (512, 136)),
]


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_gpu(rng, variant, dtype, shapes):
    a, b = rand(rng, shapes[0], dtype), rand(rng, shapes[1], dtype)
    want = np.matmul(f64(a), f64(b))
    gpu_check(fastnn.matmul(gpu(a), gpu(b)), want, dtype)
    out = cp.full(want.shape, cp.nan, dtype)
    assert fastnn.matmul(gpu(a), gpu(b), out=out) is out
    gpu_check(out, want, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layout", ["T", "TT", "neg", "step", "offset"])
def test_matmul_views_gpu(rng, variant, dtype, layout):
    A, B = rand(rng, (130, 97), dtype), rand(rng, (97, 71), dtype)
    if layout == "T":        # column-major a (unit stride down the rows)
        a, b = gpu(np.ascontiguousarray(A.T)).T, gpu(B)
    elif layout == "TT":     # both transposed
        a, b = gpu(np.ascontiguousarray(A.T)).T, gpu(np.ascontiguousarray(B.T)).T
    elif layout == "neg":    # reversed rows and columns
        a, b = gpu(A[::-1].copy())[::-1], gpu(B[:, ::-1].copy())[:, ::-1]
    elif layout == "step":   # every other element
        a, b = gpu(np.repeat(A, 2, axis=1))[:, ::2], gpu(np.repeat(B, 2, axis=0))[::2]
    else:                    # a start that is not 16-byte aligned (scalar loads in the float16 kernel)
        a = gpu(np.concatenate([np.zeros((130, 1), dtype), A], axis=1))[:, 1:]
        b = gpu(B)
    gpu_check(fastnn.matmul(a, b), np.matmul(f64(A), f64(B)), dtype)


@needs_gpu
def test_matmul_large_by_random_vector_gpu(rng):
    """A 1024^3 float32 product checked cheaply: C t against A (B t) in float64."""
    n = 1024
    a, b = rand(rng, (n, n), np.float32), rand(rng, (n, n), np.float32)
    c = cp.asnumpy(fastnn.matmul(gpu(a), gpu(b))).astype(np.float64)
    t = rng.standard_normal(n)
    want = f64(a) @ (f64(b) @ t)
    assert np.linalg.norm(c @ t - want) / np.linalg.norm(want) <= 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (64, 784, 128), (2, 33, 70, 129), (5, 8, 8)])
def test_linear_gpu(rng, variant, dtype, activation, shape):
    *lead, n_in, n_out = shape
    x = rand(rng, tuple(lead) + (n_in,), dtype)
    w = rand(rng, (n_in, n_out), dtype)
    bias = rand(rng, n_out, dtype)
    gpu_check(fastnn.linear(gpu(x), gpu(w), gpu(bias), activation=activation),
          ref.linear(f64(x), f64(w), f64(bias), activation), dtype)
    gpu_check(fastnn.linear(gpu(x), gpu(w)), ref.linear(f64(x), f64(w)), dtype)


@needs_gpu
def test_matmul_argument_errors_gpu():
    a = gpu(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="^b: got a numpy.ndarray"):
        fastnn.matmul(a, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="^b: got a cupy.ndarray in a call whose a is a numpy.ndarray"):
        fastnn.matmul(np.ones((3, 4), np.float32), gpu(np.ones((4, 2), np.float32)))
    with pytest.raises(TypeError, match="float32 or float16"):
        fastnn.matmul(a.astype(cp.float64), a.T.astype(cp.float64))
    with pytest.raises(TypeError, match="dtype"):
        fastnn.matmul(a, a.T.astype(cp.float16))
    with pytest.raises(ValueError, match="inner dimensions"):
        fastnn.matmul(a, a)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_linear_backward_matches_the_cpu_gpu(rng, dtype):
    x, w, g = rand(rng, (3, 7, 33), dtype), rand(rng, (33, 20), dtype), rand(rng, (3, 7, 20), dtype)
    want = fastnn.linear_backward(f64(g), f64(x), f64(w))
    got = fastnn.linear_backward(gpu(g), gpu(x), gpu(w))
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.dtype == dtype
        gpu_check(a, b, dtype)
    gx, gw, gb = fastnn.linear_backward(gpu(g), gpu(x), gpu(w), bias=False, x_grad=False)
    assert gx is None and gb is None
    gpu_check(gw, want[1], dtype)
