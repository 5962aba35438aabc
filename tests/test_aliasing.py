"""out= overlapping an input. Exact identity (out is x) is the documented in-place use; any other overlap
(a shifted or strided view into the same buffer) is detected with np.may_share_memory and the result is
computed into a temporary, then copied into out: the result is always the one computed from the inputs
as they were before the call."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, assert_close, f64
from op_table import OPS

SHIFTS = [1, -1, 7, -13, 64, -64]  # elements: partial overlap from either side, a row, more


def shifted(buf, start, shape):
    """The C-contiguous view of `shape` starting at element `start` of the flat buffer."""
    n = int(np.prod(shape))
    return buf[start:start + n].reshape(shape)


def setup(rng, dtype, shape, shift, n_inputs=1):
    """A buffer holding the inputs back to back, and an output view shifted by `shift` elements from the
    first input (so it overlaps it, and possibly the next)."""
    n = int(np.prod(shape))
    pad = max(abs(s) for s in SHIFTS)
    buf = rng.standard_normal(n * n_inputs + 2 * pad).astype(dtype)
    inputs = [shifted(buf, pad + i * n, shape) for i in range(n_inputs)]
    out = shifted(buf, pad + shift, shape)
    return inputs, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", SHIFTS)
def test_relu_out_overlaps_input(rng, dtype, shift):
    (x,), out = setup(rng, dtype, (9, 64), shift)
    expected = ref.relu(f64(x))
    assert fastnn.relu(x, out=out) is out
    assert np.array_equal(out, expected.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("which", [0, 1])
def test_relu_backward_out_overlaps_input(rng, dtype, shift, which):
    (a, b), out = setup(rng, dtype, (9, 64), shift + which * 9 * 64, n_inputs=2)
    expected = ref.relu_backward(*f64(a, b))
    assert fastnn.relu_backward(a, b, out=out) is out
    assert np.array_equal(out, expected.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_out_overlaps_input(rng, dtype, shift, op, axis):
    (x,), out = setup(rng, dtype, (9, 64), shift)
    expected = getattr(ref, op)(f64(x), axis=axis)
    assert getattr(fastnn, op)(x, axis=axis, out=out) is out
    assert_close(out, expected, dtype, k=x.shape[axis])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("which", [0, 1])
def test_matmul_out_overlaps_input(rng, dtype, shift, which):
    (a, b), out = setup(rng, dtype, (24, 24), shift + which * 24 * 24, n_inputs=2)
    expected = ref.matmul(*f64(a, b))
    assert fastnn.matmul(a, b, out=out) is out
    assert_close(out, expected, dtype, k=24)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_out_is_an_input(rng, dtype):
    a = rng.standard_normal((33, 33)).astype(dtype)
    b = rng.standard_normal((33, 33)).astype(dtype)
    expected = ref.matmul(*f64(a, b))
    assert fastnn.matmul(a, b, out=a) is a
    assert_close(a, expected, dtype, k=33)
    a = rng.standard_normal((2, 33, 33)).astype(dtype)  # batched (the general path)
    expected = ref.matmul(*f64(a, a))
    assert fastnn.matmul(a, a, out=a) is a
    assert_close(a, expected, dtype, k=33)


@pytest.mark.parametrize("dtype", DTYPES)
def test_out_strided_view_of_input(rng, dtype):
    """out a non-contiguous view interleaved with the input (every other element of one buffer)."""
    buf = rng.standard_normal((16, 128)).astype(dtype)
    x, out = buf[:, 0::2], buf[:, 1::2]
    expected = ref.relu(f64(x))
    assert fastnn.relu(x, out=out) is out
    assert np.array_equal(out, expected.astype(dtype))
    buf = rng.standard_normal((16, 128)).astype(dtype)
    x, out = buf[:, 0::2], buf[:, ::-2]  # reversed and interleaved
    expected = ref.softmax(f64(x))
    fastnn.softmax(x, out=out)
    assert_close(out, expected, dtype, k=64)
    buf = rng.standard_normal((64, 64)).astype(dtype)
    a, out = buf[:32, :32], buf[16:48, 16:48].T  # a transposed block overlapping a
    expected = ref.matmul(*f64(a, a))
    fastnn.matmul(a, a, out=out)
    assert_close(out, expected, dtype, k=32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_in_place_exact_identity(rng, dtype):
    """out is the input itself: the documented in-place use, written directly (no temporary)."""
    x = rng.standard_normal((7, 65)).astype(dtype)
    for op in ("relu", "softmax", "log_softmax"):
        y = x.copy()
        expected = getattr(ref, op)(f64(y))
        assert getattr(fastnn, op)(y, out=y) is y
        assert_close(y, expected, dtype, k=65)
    g, y = x.copy(), rng.standard_normal((7, 65)).astype(dtype)
    expected = ref.relu_backward(*f64(g, y))
    assert fastnn.relu_backward(g, y, out=g) is g
    assert np.array_equal(g, expected.astype(dtype))


# ---- every op with out= (tests/op_table.py) -----------------------------------------------------------

@pytest.mark.parametrize("op", [op for op in OPS if op.out], ids=[op.name for op in OPS if op.out])
@pytest.mark.parametrize("shift", [1, -7, 64])
def test_table_out_overlapping_the_first_input(rng, op, shift):
    """For every op of the table that takes out=: out a shifted view of the buffer holding the first input."""
    args, kw = op.build(rng, np.float64)
    want = op.oracle(*(f64(a) for a in args), **kw)
    x, pad = args[0], 128
    buf = rng.standard_normal(pad + max(x.size, want.size) + 2 * pad)
    x_view = shifted(buf, pad, x.shape)
    x_view[...] = x
    out = shifted(buf, pad + shift, want.shape)
    assert getattr(fastnn, op.name)(x_view, *args[1:], out=out, **kw) is out
    assert_close(out, want, np.float64, k=op.k)
