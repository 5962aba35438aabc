"""The op table the cross-backend, aliasing and property tests share: one line per op (its name, an input
builder, the float64 oracle, the reduction length for the tolerance, which argument is an out=).

A new op joins every table-driven test by adding its line here."""
from collections import namedtuple

import numpy as np

from fastnn import reference as ref
from conftest import make_array

# build(rng, dtype) -> (args, kwargs): numpy arrays in `dtype` (labels int64); oracle(*float64 args, **kwargs).
# k: the terms each output element reduces over (tolerance); out: whether the op takes out=.
Op = namedtuple("Op", "name build oracle k out")


def _a(rng, dtype, *shape, scale=1.0):
    return make_array(rng, shape, dtype, scale=scale)


def _softmax_pair(rng, dtype, log):
    y = ref.log_softmax(_a(rng, np.float64, 6, 13)) if log else ref.softmax(_a(rng, np.float64, 6, 13))
    return (_a(rng, dtype, 6, 13), y.astype(dtype)), {}


def _attention(rng, dtype):
    q, k, v = _a(rng, dtype, 2, 3, 5, 8), _a(rng, dtype, 2, 3, 7, 8), _a(rng, dtype, 2, 3, 7, 6)
    return (q, k, v), {"is_causal": True}


def _attention_backward(rng, dtype):
    (q, k, v), kw = _attention(rng, dtype)
    o, lse = ref.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)), return_lse=True, **kw)
    return (_a(rng, dtype, 2, 3, 5, 6), q, k, v, o.astype(dtype), lse.astype(dtype)), kw


def _cross_entropy(rng, dtype):
    return (_a(rng, dtype, 6, 10), rng.integers(0, 10, 6).astype(np.int64)), {}


def _linear_backward(rng, dtype):
    return (_a(rng, dtype, 3, 5, 4), _a(rng, dtype, 3, 5, 9), _a(rng, dtype, 9, 4)), {}


OPS = [
    Op("relu", lambda r, d: ((_a(r, d, 7, 33),), {}), ref.relu, 1, True),
    Op("relu_backward", lambda r, d: ((_a(r, d, 7, 33), _a(r, d, 7, 33)), {}), ref.relu_backward, 1, True),
    Op("softmax", lambda r, d: ((_a(r, d, 7, 33, scale=3.0),), {"axis": 0}), ref.softmax, 7, True),
    Op("log_softmax", lambda r, d: ((_a(r, d, 7, 33, scale=3.0),), {}), ref.log_softmax, 33, True),
    Op("softmax_backward", lambda r, d: _softmax_pair(r, d, False), ref.softmax_backward, 13, False),
    Op("log_softmax_backward", lambda r, d: _softmax_pair(r, d, True), ref.log_softmax_backward, 13, False),
    Op("matmul", lambda r, d: ((_a(r, d, 2, 5, 9), _a(r, d, 9, 4)), {}), ref.matmul, 9, True),
    Op("linear", lambda r, d: ((_a(r, d, 3, 5, 9), _a(r, d, 9, 4), _a(r, d, 4)), {"activation": "relu"}),
       ref.linear, 9, False),
    Op("linear_backward", _linear_backward, ref.linear_backward, 15, False),
    Op("cross_entropy", _cross_entropy, ref.cross_entropy, 10, False),
    Op("scaled_dot_product_attention", _attention, ref.scaled_dot_product_attention, 8 * 7, False),
    Op("scaled_dot_product_attention_backward", _attention_backward, ref.scaled_dot_product_attention_backward,
       8 * 7 * 6, False),
]
OP_IDS = [op.name for op in OPS]
