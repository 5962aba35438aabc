"""Hypothesis property tests: any shape and any strides (steps, negative steps, transposes) give the
oracle's result for matmul, relu and softmax."""
import numpy as np
from hypothesis import given, settings, strategies as st

import fastnn
from fastnn import reference as ref
from conftest import Unchanged, assert_close, f64, softmax_backward_scale
from op_table import OPS

SETTINGS = settings(max_examples=50, deadline=None)
dtypes = st.sampled_from([np.float32, np.float64])
dim = st.integers(0, 40)


@st.composite
def strided(draw, shape, dtype, scale=1.0):
    """A random array of `shape` seen through arbitrary steps (possibly negative) and a random axis order."""
    ndim = len(shape)
    perm = draw(st.permutations(range(ndim))) if ndim > 1 else list(range(ndim))
    steps = [draw(st.sampled_from([1, 1, 2, 3, -1, -2])) for _ in range(ndim)]
    # Build the base in permuted order, slice it, then transpose back to `shape`.
    pshape = [shape[p] for p in perm]
    base_shape = [n * abs(s) + draw(st.integers(0, 2)) for n, s in zip(pshape, steps)]
    seed = draw(st.integers(0, 2**32 - 1))
    base = (np.random.default_rng(seed).standard_normal(base_shape) * scale).astype(dtype)
    view = base[tuple(slice(None, n * s if s > 0 else None, s) if n else slice(0, 0)
                      for n, s in zip(pshape, steps))]
    view = view[tuple(slice(0, n) for n in pshape)]
    out = np.transpose(view, np.argsort(perm))
    assert out.shape == tuple(shape)
    return out


@st.composite
def matmul_operands(draw):
    dtype = draw(dtypes)
    m, k, n = draw(dim), draw(dim), draw(dim)
    batch = draw(st.lists(st.integers(1, 3), max_size=2))
    a_batch = [draw(st.sampled_from([b, 1])) for b in batch]
    b_batch = [draw(st.sampled_from([b, 1])) for b in batch][draw(st.integers(0, len(batch))):]
    a_shape = tuple(a_batch) + ((m, k) if draw(st.booleans()) or batch else (k,))
    b_shape = tuple(b_batch) + ((k, n) if draw(st.booleans()) or batch else (k,))
    return dtype, draw(strided(a_shape, dtype)), draw(strided(b_shape, dtype))


@SETTINGS
@given(matmul_operands())
def test_matmul_property(args):
    dtype, a, b = args
    keep = Unchanged(a, b)
    got = np.asarray(fastnn.matmul(a, b))
    keep.check()
    # relative to |a| @ |b|: a dot product that cancels is only accurate relative to its terms
    terms = float(np.linalg.norm(ref.matmul(*(np.abs(x) for x in f64(a, b)))))
    assert_close(got, ref.matmul(*f64(a, b)), dtype, k=a.shape[-1], scale=terms)


@st.composite
def elementwise_operand(draw):
    dtype = draw(dtypes)
    shape = tuple(draw(st.lists(st.integers(0, 70), min_size=1, max_size=3)))
    return dtype, draw(strided(shape, dtype))


@SETTINGS
@given(elementwise_operand(), st.booleans())
def test_relu_property(args, in_place):
    dtype, x = args
    expected = ref.relu(f64(x))
    if in_place:
        res = fastnn.relu(x, out=x)
        assert res is x
        got = x
    else:
        keep = Unchanged(x)
        got = fastnn.relu(x)
        keep.check()
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(got, expected.astype(dtype))


@SETTINGS
@given(elementwise_operand(), st.data())
def test_relu_backward_property(args, data):
    dtype, x = args
    g = data.draw(strided(x.shape, dtype))
    keep = Unchanged(g, x)
    got = fastnn.relu_backward(g, x)
    keep.check()
    assert np.array_equal(got, ref.relu_backward(*f64(g, x)).astype(dtype))


@st.composite
def softmax_operand(draw):
    dtype = draw(dtypes)
    shape = tuple(draw(st.lists(st.integers(1, 70), min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    return dtype, draw(strided(shape, dtype, scale)), axis


@SETTINGS
@given(softmax_operand(), st.sampled_from(["softmax", "log_softmax"]))
def test_softmax_property(args, name):
    dtype, x, axis = args
    keep = Unchanged(x)
    got = getattr(fastnn, name)(x, axis=axis)
    keep.check()
    assert_close(got, getattr(ref, name)(f64(x), axis=axis), dtype, k=x.shape[axis])


@SETTINGS
@given(softmax_operand(), st.data())
def test_softmax_backward_property(args, data):
    dtype, x, axis = args
    y = ref.softmax(f64(x), axis=axis).astype(dtype)
    g = data.draw(strided(x.shape, dtype))
    got = fastnn.softmax_backward(g, y, axis=axis)
    assert_close(got, ref.softmax_backward(*f64(g, y), axis=axis), dtype, k=x.shape[axis],
                 scale=softmax_backward_scale(g, y, axis))


# ---- every op of tests/op_table.py ----------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(data=st.data(), op=st.sampled_from(OPS), dtype=dtypes)
def test_table_any_strides_give_the_oracle(data, op, dtype):
    """Every op of the table: each float array argument seen through arbitrary steps and axis orders gives
    the oracle's result, and no input changes."""
    args, kw = op.build(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), dtype)
    views = []
    for a in args:
        if a.dtype.kind == "f":
            v = data.draw(strided(a.shape, dtype))
            v[...] = a
            a = v
        views.append(a)
    want = op.oracle(*(f64(a) if a.dtype.kind == "f" else a for a in views), **kw)
    keep = Unchanged(*views)
    got = getattr(fastnn, op.name)(*views, **kw)
    keep.check()
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        if isinstance(g, float):
            assert abs(g - float(w)) <= 1e-4 * max(1.0, abs(float(w)))
        else:
            assert_close(g, w, dtype, k=op.k)
