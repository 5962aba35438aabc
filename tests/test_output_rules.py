"""Fixed cases of the rules the fuzz (tests/test_fuzz.py) enforces on outputs and inputs: an out= (or an
adam_update state) that is read-only, has zero strides or overlaps itself is a ValueError naming it, with
nothing written and no input modified; unaligned inputs and outputs give the oracle's result."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import Unchanged, assert_close, f64

as_strided = np.lib.stride_tricks.as_strided


def bad_out(kind, shape, dtype):
    if kind == "readonly":
        a = np.zeros(shape, dtype)
        a.flags.writeable = False
        return a
    if kind == "zero_stride":  # writable, every element of a row the same memory
        return as_strided(np.zeros(shape[-1:], dtype), shape, (0,) * (len(shape) - 1) + (np.dtype(dtype).itemsize,))
    if kind == "self_overlap":  # neighbouring rows share memory
        base = np.zeros(sum(n - 1 for n in shape) + 1, dtype)
        return as_strided(base, shape, (np.dtype(dtype).itemsize,) * len(shape))
    raise ValueError(kind)


def unaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    u = buf[1:].view(a.dtype).reshape(a.shape)
    u[...] = a
    return u


OUT_OPS = {
    "matmul": (lambda x, out: fastnn.matmul(x, x.T.copy(), out=out), lambda x: ref.matmul(x, x.T), (6, 6)),
    "relu": (lambda x, out: fastnn.relu(x, out=out), ref.relu, (6, 5)),
    "relu_backward": (lambda x, out: fastnn.relu_backward(x, -x, out=out), lambda x: ref.relu_backward(x, -x),
                      (6, 5)),
    "softmax": (lambda x, out: fastnn.softmax(x, out=out), ref.softmax, (6, 5)),
    "log_softmax": (lambda x, out: fastnn.log_softmax(x, out=out), ref.log_softmax, (6, 5)),
}


@pytest.mark.parametrize("kind", ["readonly", "zero_stride", "self_overlap"])
@pytest.mark.parametrize("name", list(OUT_OPS))
def test_bad_out_is_value_error(rng, name, kind):
    run, _, shape = OUT_OPS[name]
    x = rng.standard_normal((6, 5)).astype(np.float32)
    out = bad_out(kind, shape, np.float32)
    before = np.array(out)
    keep = Unchanged(x)
    with pytest.raises(ValueError, match="out"):
        run(x, out)
    keep.check()
    assert np.array_equal(np.array(out), before), "a refused out= was written"


@pytest.mark.parametrize("name", list(OUT_OPS))
def test_unaligned_input_and_out(rng, name):
    run, oracle, shape = OUT_OPS[name]
    x = unaligned(rng.standard_normal((6, 5)).astype(np.float32))
    out = unaligned(np.full(shape, np.nan, np.float32))
    keep = Unchanged(x)
    res = run(x, out)
    keep.check()
    assert res is out
    assert_close(out, oracle(f64(x)), np.float32, k=5)


@pytest.mark.parametrize("kind", ["zero_stride", "self_overlap"])
@pytest.mark.parametrize("which", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_adam_state_overlap_is_value_error(rng, which, kind):
    state = {n: rng.random((4, 5)).astype(np.float32) for n in ("param", "grad", "exp_avg", "exp_avg_sq",
                                                                 "max_exp_avg_sq")}
    state[which] = bad_out(kind, (4, 5), np.float32)
    before = {n: np.array(a) for n, a in state.items()}
    with pytest.raises(ValueError, match=which):
        fastnn.adam_update(state["param"], state["grad"], state["exp_avg"], state["exp_avg_sq"], step=1,
                           max_exp_avg_sq=state["max_exp_avg_sq"])
    for n, a in state.items():
        assert np.array_equal(np.array(a), before[n]), f"{n} was modified by a refused call"
